"""Patch streaming from 3D shards: patch content and padding, foreground oversampling, split, exact resume."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from data_helpers import take

from ssl_pretrain.data.loader import LoaderConfig, build_pretrain_loader


def _volumes(shard_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every subject's (image float16 (C, D, H, W), label (D, H, W)) read straight from the tars."""
    parts: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for url in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                parts[key][ext] = tar.extractfile(m).read()
    return {json.loads(p["meta.json"])["subject"]: (np.load(io.BytesIO(p["image.npy"])),
                                                    np.load(io.BytesIO(p["label.npy"]))) for p in parts.values()}


def _cut(vol: np.ndarray, origin: list[int], patch: tuple[int, ...], fill: Any) -> np.ndarray:
    """The reference patch: ``vol`` padded with ``fill`` on every side, then sliced (slow and obvious)."""
    pad = max(patch)
    padded = np.pad(vol, [(0, 0)] * (vol.ndim - 3) + [(pad, pad)] * 3, constant_values=fill)
    sl = tuple(slice(o + pad, o + pad + p) for o, p in zip(origin, patch, strict=True))
    return padded[(Ellipsis, *sl)]


def _keys(batches: list[dict[str, Any]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(s, tuple(o)) for b in batches for s, o, v in zip(b["subject"], b["origin"].tolist(),
                                                               b["valid"].tolist(), strict=True) if v]


@pytest.mark.parametrize("patch", [(4, 16, 16), (8, 24, 28)], ids=["inside", "larger-than-volume"])
def test_patches_are_the_volume_at_their_origin_padded_with_background(volume_shard_dir: Path, patch) -> None:
    cfg = LoaderConfig(shards=str(volume_shard_dir), batch_size=5, num_workers=0, patch_size=patch,
                       patches_per_volume=3, shuffle_buffer=4)
    loader = build_pretrain_loader(cfg, 0, 1)
    assert loader.manifest["layout"] == "volume"
    volumes = _volumes(volume_shard_dir)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "subject", "origin", "spacing", "valid"}
    assert batch["image"].shape == (5, 1, *patch) and batch["label"].shape == (5, *patch)
    for i, (sid, origin) in enumerate(zip(batch["subject"], batch["origin"].tolist(), strict=True)):
        image, label = volumes[sid]
        fill = image.min()
        np.testing.assert_array_equal(batch["image"][i].numpy(), _cut(image, origin, patch, fill).astype(np.float32))
        np.testing.assert_array_equal(batch["label"][i].numpy(), _cut(label, origin, patch, 0))
        for n, o, p in zip(image.shape[1:], origin, patch, strict=True):
            assert (0 <= o <= n - p) if n >= p else (n - p <= o <= 0)  # whole volume or whole patch covered


def test_foreground_oversampling_centres_patches_on_labels(volume_shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(volume_shard_dir), batch_size=8, num_workers=0, patch_size=(2, 4, 4),
                       foreground_fraction=1.0)
    batch = next(iter(build_pretrain_loader(cfg, 0, 1)))
    assert (batch["label"][:, 1, 2, 2] == 1).all()  # the centre voxel of every patch is foreground
    uniform = next(iter(build_pretrain_loader(LoaderConfig(**{**cfg.__dict__, "foreground_fraction": 0.0}), 0, 1)))
    assert (uniform["label"][:, 1, 2, 2] == 0).any()  # negative control: uniform patches also hit background


def test_epoch_splits_volumes_by_rank_and_worker_without_overlap(volume_shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(volume_shard_dir), batch_size=2, num_workers=2, patch_size=(4, 8, 8),
                       patches_per_volume=3, mode="epoch", shuffle_buffer=5)
    seen = [_keys(list(build_pretrain_loader(cfg, rank, 2))) for rank in range(2)]
    subjects = [collections.Counter(s for s, _ in keys) for keys in seen]
    assert not set(subjects[0]) & set(subjects[1])  # a volume goes to one rank only
    total = subjects[0] + subjects[1]
    assert sorted(total) == sorted(_volumes(volume_shard_dir)) and set(total.values()) == {3}


def test_a_resume_on_another_number_of_ranks_cuts_each_volume_s_remaining_patches(volume_shard_dir: Path) -> None:
    """Issue 25.2 for volumes: after 2 ranks delivered some patches, 1 rank delivers the rest of the epoch: every
    volume gives patches_per_volume patches in all (the new ones placed afresh), the next epoch starts whole."""
    def loader(world: int, rank: int, batch: int) -> Any:
        cfg = LoaderConfig(shards=str(volume_shard_dir), batch_size=batch, num_workers=1, patch_size=(4, 8, 8),
                           patches_per_volume=3, mode="epoch", shuffle_buffer=5, seed=2)
        return build_pretrain_loader(cfg, rank, world)

    seen: collections.Counter[str] = collections.Counter()
    for rank in range(2):
        before = loader(2, rank, 2)
        stream = iter(before)
        seen.update(s for s, _ in _keys([next(stream) for _ in range(2)]))
        state = before.state_dict()
        del stream
    after = loader(1, 0, 4)
    after.load_state_dict(state)
    seen.update(s for s, _ in _keys(list(after)))
    assert sorted(seen) == sorted(_volumes(volume_shard_dir)) and set(seen.values()) == {3}
    assert collections.Counter(s for s, _ in _keys(list(after))) == collections.Counter(dict.fromkeys(seen, 3))


@pytest.mark.parametrize("workers,rank,world", [(0, 0, 1), (2, 1, 2)])
def test_resume_repeats_the_same_patches(volume_shard_dir: Path, workers: int, rank: int, world: int) -> None:
    cfg = LoaderConfig(shards=str(volume_shard_dir), batch_size=3, num_workers=workers, patch_size=(4, 8, 8),
                       patches_per_volume=2, shuffle_buffer=6, seed=3, foreground_fraction=0.5)
    full = take(build_pretrain_loader(cfg, rank, world), 14)  # several resampled rounds
    interrupted = build_pretrain_loader(cfg, rank, world)
    take(interrupted, 9)
    resumed = build_pretrain_loader(cfg, rank, world)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    after = take(resumed, 5)
    assert _keys(after) == _keys(full[9:])
    for a, b in zip(after, full[9:], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other = LoaderConfig(**{**cfg.__dict__, "patches_per_volume": 3})
    with pytest.raises(ValueError, match="patches_per_volume=2 in the checkpoint but 3 now"):
        build_pretrain_loader(other, rank, world).load_state_dict(interrupted.state_dict())
