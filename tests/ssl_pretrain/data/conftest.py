"""Fixtures of the data tests: a tiny MSD cohort written directly (fast), and its shards."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.shards import write_shards

sys.path.insert(0, str(Path(__file__).parent))  # the tests import data_helpers by name
from data_helpers import TINY, write_msd  # noqa: E402

from ssl_pretrain.data.preprocess import PreprocessParams


@pytest.fixture(scope="session")
def msd_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 labelled blob subjects (63 slices) in the MSD layout."""
    return write_msd(tmp_path_factory.mktemp("msd"), 10)


@pytest.fixture(scope="session")
def shard_dir(msd_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of ``msd_cohort``: 7 uneven shards of up to 10 slices at 16 x 20."""
    subjects, skipped = discover(msd_cohort)
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(subjects, out, TINY, samples_per_shard=10, workers=1, skipped=skipped, progress=False)
    return out


@pytest.fixture
def broken(shard_dir: Path, tmp_path: Path) -> Path:
    """A private copy of ``shard_dir`` that a test may damage."""
    out = tmp_path / "broken"
    shutil.copytree(shard_dir, out)
    return out


VOLUME = PreprocessParams(spacing=(6.0, 2.5, 2.0))  # the cohort's own voxel size: (D, H, W) = (5..8, 20, 24)


@pytest.fixture(scope="session")
def volume_shard_dir(msd_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3D shards of ``msd_cohort``: 10 volumes, 2 per shard."""
    subjects, skipped = discover(msd_cohort)
    out = tmp_path_factory.mktemp("vshards") / "v"
    write_shards(subjects, out, VOLUME, samples_per_shard=2, workers=1, skipped=skipped, progress=False)
    return out
