"""2.5D (issue 23.4): neighbouring slices as channels, made by preprocessing, so shards, finetuning and prediction
see the same stacks."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import TINY

from ssl_pretrain.config import ConfigError
from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.preprocess import PreprocessParams, context_stack, preprocess
from ssl_pretrain.data.shards import write_shards


def test_context_stack_repeats_the_end_slices_at_the_volume_edges() -> None:
    image = np.arange(5 * 2 * 3 * 3, dtype=np.float32).reshape(5, 2, 3, 3)  # (S, C, H, W), every value distinct
    stacked = context_stack(image, 2)
    assert stacked.shape == (5, 10, 3, 3)
    for s in range(5):
        for j, offset in enumerate(range(-2, 3)):
            np.testing.assert_array_equal(stacked[s, 2 * j:2 * j + 2], image[min(max(s + offset, 0), 4)])
    np.testing.assert_array_equal(stacked[0, 0:2], image[0])  # edge: the first slice repeats
    np.testing.assert_array_equal(stacked[4, 8:10], image[4])  # and the last
    np.testing.assert_array_equal(context_stack(image, 0), image)


def test_volume_spacing_refuses_context_slices() -> None:
    with pytest.raises(ConfigError, match=r"^preprocess\.context_slices: 1 stacks neighbouring slices"):
        PreprocessParams.from_dict({"spacing": [6.0, 2.5, 2.0], "context_slices": 1})


def test_shards_hold_each_slice_with_its_neighbours_across_shard_boundaries(msd_cohort: Path, tmp_path: Path) -> None:
    """3-slice shards of interleaved subjects: a slice's neighbours are mostly in other shards, yet every sample
    holds exactly its volume's neighbours (stacked before the slices are split into shards)."""
    subjects, _ = discover(msd_cohort)
    params = dataclasses.replace(TINY, context_slices=1)
    manifest = write_shards(subjects, tmp_path / "s", params, samples_per_shard=3, workers=1, progress=False)
    assert manifest["preprocess"]["context_slices"] == 1 and manifest["channels"] == 3
    plain = {s.id: preprocess(s.image, TINY).image for s in subjects}
    where: dict[str, str] = {}
    seen = 0
    for shard in sorted((tmp_path / "s").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".image.npy"):
                    continue
                key = member.name.removesuffix(".image.npy")
                subject, s = key.rsplit("_", 1)
                s, vol = int(s), plain[subject]
                arr = np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.float32)
                want = np.concatenate([vol[min(max(s + o, 0), len(vol) - 1)] for o in (-1, 0, 1)])
                np.testing.assert_allclose(arr, want, atol=1e-2, rtol=1e-3)  # stored as float16
                where[key] = shard.name
                seen += 1
    assert seen == sum(len(v) for v in plain.values())
    split = [k for k in where if (n := f"{k.rsplit('_', 1)[0]}_{int(k.rsplit('_', 1)[1]) + 1:04d}") in where
             and where[n] != where[k]]
    assert len(split) > seen // 3  # most neighbours live in another shard
