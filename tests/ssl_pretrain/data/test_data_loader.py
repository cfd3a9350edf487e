"""Streaming loader: batch format, exact epoch over ranks x workers, resume, URLs, corruption."""

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
from data_helpers import rewrite_tar, take

from ssl_pretrain.config import ConfigError, from_dict
from ssl_pretrain.data.epochs import epoch_plan, resume_position
from ssl_pretrain.data.loader import LoaderConfig, build_pretrain_loader
from ssl_pretrain.data.shardformat import CorruptShardError


def _keys(batches: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(s, z) for b in batches for s, z, v in zip(b["subject"], b["slice"].tolist(), b["valid"].tolist(),
                                                          strict=True) if v]


def _assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["subject"] == y["subject"]
        assert torch.equal(x["slice"], y["slice"]) and torch.equal(x["image"], y["image"])


def test_batch_format(shard_dir: Path) -> None:
    loader = build_pretrain_loader(LoaderConfig(shards=str(shard_dir), batch_size=6, num_workers=0), 0, 1)
    assert loader.manifest["channels"] == 1 and loader.manifest["preprocess"]["size"] == [16, 20]
    batch = next(iter(loader))
    assert set(batch) == {"image", "position", "subject", "slice", "label", "valid"}
    assert batch["image"].shape == (6, 1, 16, 20) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (6, 16, 20) and batch["label"].dtype == torch.uint8
    assert batch["position"].dtype == torch.float32 and batch["slice"].dtype == torch.int64
    assert batch["valid"].all() and len(batch["subject"]) == 6
    n_slices = {s["id"]: s["slices"] for s in loader.manifest["subjects"]}
    for s, z, p in zip(batch["subject"], batch["slice"].tolist(), batch["position"].tolist(), strict=True):
        assert p == pytest.approx(z / (n_slices[s] - 1))
    no_labels = LoaderConfig(shards=str(shard_dir), batch_size=6, num_workers=0, labels=False)
    assert "label" not in next(iter(build_pretrain_loader(no_labels, 0, 1)))


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 2), (4, 3), (1, 1)])
def test_epoch_plan_partitions_and_balances(world: int, workers: int) -> None:
    counts = [10, 10, 10, 10, 10, 10, 3]
    shards, batches = epoch_plan(counts, epoch=1, seed=0, world_size=world, num_workers=workers, batch_size=4)
    flat = sorted(i for rank in shards for w in rank for i in w)
    assert flat == list(range(7))  # every shard exactly once
    totals = {sum(b) for b in batches}
    assert len(totals) == 1  # equal batch counts on every rank
    for rank_shards, rank_batches in zip(shards, batches, strict=True):
        for s, b in zip(rank_shards, rank_batches, strict=True):
            assert b >= -(-sum(counts[i] for i in s) // 4)  # room for every real sample


def test_resume_position_matches_round_robin() -> None:
    planned = [3, 0, 5, 1]
    order = []  # what torch's DataLoader yields: round-robin, skipping exhausted workers
    left = list(planned)
    while any(left):
        for w in range(4):
            if left[w]:
                order.append(w)
                left[w] -= 1
    for n in range(len(order) + 1):
        taken, nxt = resume_position(n, planned, 4)
        assert taken == [order[:n].count(w) for w in range(4)]
        rest = order[n:]
        if rest:  # the rotated cycle from `nxt` reproduces the rest
            assert rest[0] == min((w for w in range(4) if taken[w] < planned[w]),
                                  key=lambda w: (w - nxt) % 4)
    assert resume_position(7, None, 3) == ([3, 2, 2], 1)


@pytest.mark.slow
def test_epoch_every_slice_once_over_2_ranks_x_2_workers(shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), batch_size=4, num_workers=2, shuffle_buffer=16, mode="epoch", seed=5)
    per_rank, seen = [], collections.Counter()
    for rank in range(2):
        loader = build_pretrain_loader(cfg, rank, 2)
        planned = len(loader)  # batches of epoch 0 on this rank
        batches = list(loader)
        per_rank.append((len(batches), planned))
        seen.update(_keys(batches))
        for b in batches:
            assert b["valid"].all() or not b["valid"].any()  # only whole padding batches are invalid
        assert loader.epoch == 1 and loader.batches == 0
    assert per_rank[0] == per_rank[1] and per_rank[0][0] == per_rank[0][1]
    assert len(seen) == 63 and set(seen.values()) == {1}
    # the next epoch is another permutation, again exactly once
    again, orders = collections.Counter(), []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, rank, 2)
        loader.load_state_dict({**loader.state_dict(), "epoch": 1})
        keys = _keys(list(loader))
        again.update(keys)
        orders.append(keys)
    assert again == seen and orders[0] + orders[1] != list(seen)


def test_resampled_ranks_and_workers_read_disjoint_shards(shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), batch_size=4, num_workers=2, shuffle_buffer=8, seed=3)
    loaders = [build_pretrain_loader(cfg, rank, 2) for rank in range(2)]
    assert len(loaders[0].urls) >= 4  # enough shards for 2 ranks x 2 workers
    by_rank = [set(_keys(take(loader, 12))) for loader in loaders]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    owner = {}
    for url in loaders[0].urls:  # which rank's split each subject's shard belongs to
        with tarfile.open(url) as tar:
            for name in tar.getnames():
                if name.endswith(".meta.json"):
                    meta = json.load(tar.extractfile(name))
                    owner[(meta["subject"], meta["slice"])] = loaders[0].urls.index(url) % 2
    for rank, keys in enumerate(by_rank):
        assert {owner[k] for k in keys} == {rank}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_resume_continues_with_the_same_next_batches(shard_dir: Path, mode: str) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), batch_size=4, num_workers=2, shuffle_buffer=12, mode=mode, seed=7)
    full = take(build_pretrain_loader(cfg, 1, 2), 9)
    interrupted = build_pretrain_loader(cfg, 1, 2)
    take(interrupted, 5)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = build_pretrain_loader(cfg, 1, 2)
    resumed.load_state_dict(state)
    _assert_same(take(resumed, 4), full[5:])


def test_resume_in_process_and_seed(shard_dir: Path) -> None:
    cfg = LoaderConfig(shards=str(shard_dir), batch_size=5, num_workers=0, shuffle_buffer=20, seed=1)
    full = take(build_pretrain_loader(cfg, 0, 1), 30)  # several resampled rounds
    a = build_pretrain_loader(cfg, 0, 1)
    take(a, 23)
    b = build_pretrain_loader(cfg, 0, 1)
    b.load_state_dict(a.state_dict())
    _assert_same(take(b, 7), full[23:])
    other = take(build_pretrain_loader(LoaderConfig(**{**cfg.__dict__, "seed": 2}), 0, 1), 3)
    assert _keys(other) != _keys(full[:3])


def test_state_mismatch_and_config_errors(shard_dir: Path) -> None:
    a = build_pretrain_loader(LoaderConfig(shards=str(shard_dir), batch_size=4, num_workers=0), 0, 1)
    b = build_pretrain_loader(LoaderConfig(shards=str(shard_dir), batch_size=4, num_workers=0, shuffle_buffer=7), 0, 1)
    with pytest.raises(ValueError, match="loader state: shuffle_buffer=1000 in the checkpoint but 7 now"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="data.batch_size: must be >= 1, got 0"):
        from_dict(LoaderConfig, {"batch_size": 0}, "data.")
    with pytest.raises(ConfigError, match="data.batch_size: must be >= 1"):
        build_pretrain_loader(LoaderConfig(shards=str(shard_dir), batch_size=0), 0, 1)
    with pytest.raises(ConfigError, match="data.mode: must be one of 'resampled', 'epoch'"):
        from_dict(LoaderConfig, {"mode": "once"}, "data.")
    with pytest.raises(ValueError, match="data.shards: empty"):
        build_pretrain_loader(LoaderConfig(), 0, 1)
    with pytest.raises(ValueError, match="not found"):
        build_pretrain_loader(LoaderConfig(shards=str(shard_dir / "shard-{000000..000009}.tar")), 0, 1)
    with pytest.raises(TypeError, match="infinite"):
        len(a)


@pytest.mark.parametrize(("old", "new", "batches"), [((2, 4, 2), (1, 8, 1), 3), ((1, 8, 1), (2, 4, 2), 5),
                                                    ((2, 4, 1), (3, 3, 2), 6), ((1, 8, 2), (2, 4, 0), 0)])
def test_a_resume_on_another_job_shape_ends_the_epoch_without_repeats_or_gaps(
        shard_dir: Path, old: tuple[int, int, int], new: tuple[int, int, int], batches: int) -> None:
    """Issue 25.2: ranks × workers × batch change between the save and the resume (2 → 1 ranks, 1 → 2, 2 → 3):
    the samples the old job delivered of the epoch and those the new job delivers after it are the epoch, once each;
    the epoch after starts whole."""
    def loader(shape: tuple[int, int, int], rank: int) -> Any:
        world, batch, workers = shape
        cfg = LoaderConfig(shards=str(shard_dir), batch_size=batch, num_workers=workers, shuffle_buffer=16,
                           mode="epoch", seed=3)
        return build_pretrain_loader(cfg, rank, world)

    everything = sorted(_keys(list(loader((1, 8, 0), 0))))
    seen: list[tuple[str, int]] = []
    for rank in range(old[0]):
        before = loader(old, rank)
        stream = iter(before)
        seen += _keys([next(stream) for _ in range(batches)])
        state = before.state_dict()
        del stream
    next_epoch: list[tuple[str, int]] = []
    for rank in range(new[0]):
        after = loader(new, rank)
        after.load_state_dict(state)  # any old rank's state: the position is the job's
        seen += _keys(list(after))
        assert after.epoch == 1
        next_epoch += _keys(list(after))
    assert sorted(seen) == everything
    assert sorted(next_epoch) == everything


def _epoch_keys(shards: str, **kw: Any) -> list[tuple[str, int]]:
    cfg = LoaderConfig(shards=shards, batch_size=8, num_workers=0, shuffle_buffer=0, mode="epoch", **kw)
    return _keys(list(build_pretrain_loader(cfg, 0, 1)))


def test_brace_pattern_and_pipe_urls(shard_dir: Path) -> None:
    ref = _epoch_keys(str(shard_dir))
    assert len(ref) == 63
    pattern = str(shard_dir / "shard-{000000..000006}.tar")
    assert _epoch_keys(pattern) == ref
    pipe = f"pipe:cat {pattern}"
    assert _epoch_keys(pipe, manifest=str(shard_dir / "manifest.json")) == ref


def test_truncated_shard_names_the_shard(broken: Path) -> None:
    """The tar reader on its own (verify=none): the manifest check would refuse the shard first."""
    victim = broken / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar: truncated shard"):
        _epoch_keys(str(broken), verify="none")
    cfg = LoaderConfig(shards=str(broken), batch_size=8, num_workers=0, mode="epoch", skip_corrupt=True,
                       verify="none")
    loader = build_pretrain_loader(cfg, 0, 1)
    keys = _keys(list(loader))
    assert 53 <= len(keys) < 63 and len(set(keys)) == len(keys)
    assert loader.corrupt_skipped == 1


def test_corrupt_npy_in_tar_names_the_shard(broken: Path) -> None:
    victim = broken / "shard-000001.tar"
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".image.npy"))
    raw = bytearray(victim.read_bytes())
    raw[member.offset_data : member.offset_data + 6] = b"GARBGE"  # destroy the .npy magic
    victim.write_bytes(bytes(raw))
    key = member.name.split(".")[0]
    with pytest.raises(CorruptShardError, match=rf"shard-000001\.tar: corrupt {key}\.image\.npy"):
        _epoch_keys(str(broken), verify="none")
    cfg = LoaderConfig(shards=str(broken), batch_size=8, num_workers=0, mode="epoch", skip_corrupt=True,
                       verify="none")
    loader = build_pretrain_loader(cfg, 0, 1)
    assert len(_keys(list(loader))) == 62 and loader.corrupt_skipped == 1


def _rewrite_images(path: Path, convert: Any) -> None:
    """Rewrite a tar, passing every image.npy array through ``convert(array) -> npy bytes``."""
    rewrite_tar(path, lambda m, data: convert(np.load(io.BytesIO(data), allow_pickle=False))
                if m.name.endswith(".image.npy") else data)


def _npy(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


def test_other_npy_header_versions_are_read_wrong_dtype_is_corrupt(broken: Path) -> None:
    ref = _epoch_keys(str(broken), verify="none")
    cfg = LoaderConfig(shards=str(broken), batch_size=64, num_workers=0, shuffle_buffer=0, mode="epoch",
                       verify="none")
    images = next(iter(build_pretrain_loader(cfg, 0, 1)))["image"]
    for shard in broken.glob("shard-*.tar"):  # .npy version 2.0 headers (another numpy might write them)
        _rewrite_images(shard, lambda a: _npy(a, (2, 0)))
    assert _epoch_keys(str(broken), verify="none") == ref
    assert torch.equal(next(iter(build_pretrain_loader(cfg, 0, 1)))["image"], images)
    victim = broken / "shard-000002.tar"
    _rewrite_images(victim, lambda a: _npy(a.astype(np.float32)))
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tar: corrupt .*float16 \.npy of shape \(1, 16, 20\)"):
        _epoch_keys(str(broken), verify="none")


@pytest.mark.parametrize("name", ["pipe:touch PWNED; cat shard-000000.tar", "../s/shard-000000.tar",
                                  "sub/shard-000000.tar", "file:///etc/passwd", "..", 7])
def test_manifest_shard_names_must_be_plain_file_names(broken: Path, monkeypatch: pytest.MonkeyPatch,
                                                       name: Any) -> None:
    mpath = broken / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][0]["name"] = name
    mpath.write_text(json.dumps(manifest))
    monkeypatch.chdir(broken)  # data.shards=. : a joined name is the name itself
    with pytest.raises(ValueError, match=r"manifest.json: shards\[0\]\.name .* is not a plain file name") as exc:
        next(iter(build_pretrain_loader(LoaderConfig(shards=".", batch_size=4, num_workers=0), 0, 1)))
    assert "\n" not in str(exc.value) and repr(name) in str(exc.value)
    assert not (broken / "PWNED").exists()


def test_split_manifest_cannot_name_itself_or_split_again(broken: Path, tmp_path: Path) -> None:
    top = {"format": "mri-ssl-shards", "version": 1, "splits": {"train": {"dir": "."}}}
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(ValueError, match=r"splits\.train\.dir '\.' is not a plain directory name"):
        build_pretrain_loader(LoaderConfig(shards=str(tmp_path / "self")), 0, 1)
    (tmp_path / "loop" / "train").mkdir(parents=True)
    for d in (tmp_path / "loop", tmp_path / "loop" / "train"):
        (d / "manifest.json").write_text(json.dumps({**top, "splits": {"train": {"dir": "train"}}}))
    with pytest.raises(ValueError, match="the 'train' split of .* names splits again"):
        build_pretrain_loader(LoaderConfig(shards=str(tmp_path / "loop")), 0, 1)
