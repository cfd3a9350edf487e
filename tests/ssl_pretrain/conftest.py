"""Fixtures of the pretraining tests: one small synthetic shard directory per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic liver volumes as 32×32 slices (115 samples in 8 shards of ≤ 16), no labels."""
    from ssl_pretrain.data.ingest import discover
    from ssl_pretrain.data.phantoms import make_cohort
    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.data.shards import write_shards

    root = tmp_path_factory.mktemp("pretrain_data")
    raw = make_cohort("liver", 4, root / "raw", seed=0, labels=False)
    subjects, _ = discover(raw)
    out = root / "shards"
    write_shards(subjects, out, PreprocessParams(size=(32, 32), spacing=(8.0, 8.0)), samples_per_shard=16,
                 workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 labeled synthetic liver volumes (MSD layout; another cohort seed than the shards): the probe's set."""
    from ssl_pretrain.data.phantoms import make_cohort

    return make_cohort("liver", 6, tmp_path_factory.mktemp("probe") / "liver", seed=1)


@pytest.fixture(scope="session")
def volume_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic liver volumes as 3D shards at 8 × 6 × 6 mm (≈ 24 × 64 × 64 voxels), one per shard, no labels."""
    from ssl_pretrain.data.ingest import discover
    from ssl_pretrain.data.phantoms import make_cohort
    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.data.shards import write_shards

    root = tmp_path_factory.mktemp("volume_data")
    raw = make_cohort("liver", 4, root / "raw", seed=0, labels=False)
    subjects, _ = discover(raw)
    out = root / "shards"
    write_shards(subjects, out, PreprocessParams(spacing=(8.0, 6.0, 6.0)), samples_per_shard=1, workers=1,
                 progress=False)
    return out
