"""Hostile and damaged shards (issue 12, items 6 and 7): verified against the manifest, every read
failure a CorruptShardError naming shard and member, no hang, and a byte-level fuzz of the reader."""

from __future__ import annotations

import json
import random
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from data_helpers import TINY, rewrite_tar, write_msd

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.loader import LoaderConfig, build_pretrain_loader
from ssl_pretrain.data.shardformat import CorruptShardError
from ssl_pretrain.data.shards import write_shards


def _epoch(shards: str, **kw: Any) -> list[tuple[str, int]]:
    """Every valid (subject, slice) of one epoch, in-process."""
    cfg = LoaderConfig(shards=shards, batch_size=4, num_workers=0, shuffle_buffer=0, mode="epoch", **kw)
    loader = build_pretrain_loader(cfg, 0, 1)
    out = []
    for b in loader:
        assert b["image"].shape[1:] == (1, 16, 20) and b["label"].shape[1:] == (16, 20)
        out += [(s, z) for s, z, v in zip(b["subject"], b["slice"].tolist(), b["valid"].tolist(), strict=True) if v]
    return out


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


# ---- item 6: size and sha256 against the manifest ------------------------------------------------


def test_verify_catches_a_flipped_bit_and_a_wrong_size(broken: Path) -> None:
    victim = broken / "shard-000002.tar"
    with tarfile.open(victim) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".image.npy"))
    _flip(victim, image.offset_data + 200)  # inside an image payload: the tar still parses
    assert len(_epoch(str(broken), verify="size")) == 63  # same size: only the digest can tell
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tar: sha256 \w+… differs from the manifest's"):
        _epoch(str(broken))  # sha256 is the default
    pattern = f"pipe:cat {broken}/shard-{{000000..000006}}.tar"  # a streamed shard is checked too
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tar: sha256"):
        _epoch(pattern, manifest=str(broken / "manifest.json"))
    cfg = LoaderConfig(shards=str(broken), batch_size=4, num_workers=0, mode="epoch", skip_corrupt=True)
    loader = build_pretrain_loader(cfg, 0, 1)
    assert sum(int(b["valid"].sum()) for b in loader) == 53 and loader.corrupt_skipped == 1
    with victim.open("ab") as f:
        f.write(b"\0" * 512)  # one more zero block: a valid tar, the wrong size
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tar: \d+ bytes, but the manifest records \d+"):
        _epoch(str(broken), verify="size")
    assert len(_epoch(str(broken), verify="none")) == 63


# ---- item 7: every failure names the shard and the member, never another exception ---------------


def _pax_first(info: Any, data: bytes) -> bytes:
    if not hasattr(_pax_first, "done"):  # an explicit PAX path record on the first member only
        info.pax_headers = {"path": info.name}
        _pax_first.done = True  # type: ignore[attr-defined]
    return data


def _damage_pax(raw: bytearray, record: bytes) -> None:
    """Replace the first PAX record (data block after the first header) by ``record``, same length."""
    end = raw.index(b"\n", 512) + 1
    raw[512:end] = record.ljust(end - 512, b"x")[: end - 512]


@pytest.mark.timeout(30)  # the length-0 record used to loop forever
@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda raw: _damage_pax(raw, b"0 path="), r"corrupt PAX header before the member after the start"),
        (lambda raw: _damage_pax(raw, b"9999 path="), r"corrupt PAX header .*malformed record"),
        (lambda raw: _damage_pax(raw, b"zz path="), r"corrupt PAX header .*malformed record"),
        (lambda raw: raw.__setitem__(slice(1024, 1025), b"\xff"),
         r"corrupt tar header after the start: member name b'\\xffase.* is not UTF-8"),
        (lambda raw: raw.__setitem__(slice(1024 + 124, 1024 + 136), b"\x80" + b"\xff" * 11),
         r"corrupt tar header after .*member size"),
    ],
    ids=["pax-length-0", "pax-too-long", "pax-not-a-number", "name-not-utf8", "size-huge"],
)
def test_reader_failures_name_shard_and_member(broken: Path, damage: Any, message: str) -> None:
    victim = broken / "shard-000000.tar"
    if hasattr(_pax_first, "done"):
        del _pax_first.done
    rewrite_tar(victim, _pax_first)
    raw = bytearray(victim.read_bytes())
    assert raw[156:157] == b"x" and raw[1024 + 156 : 1024 + 157] == b"0"  # PAX header, then a plain one
    assert len(_epoch(str(broken), verify="none")) == 63  # the rewritten shard reads before the damage
    damage(raw)
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=r"shard-000000\.tar: " + message) as exc:
        _epoch(str(broken), verify="none")
    assert "\n" not in str(exc.value)
    keys = _epoch(str(broken), verify="none", skip_corrupt=True)
    assert 53 <= len(keys) < 63


@pytest.mark.parametrize("field,value", [("position", "abc"), ("position", float("nan")), ("slice", "3"),
                                         ("subject", 7), ("slice", True)])
def test_meta_values_of_the_wrong_type_are_corrupt(broken: Path, field: str, value: Any) -> None:
    victim = broken / "shard-000004.tar"
    bad: list[str] = []

    def edit(info: Any, data: bytes) -> bytes:
        if info.name.endswith(".meta.json") and not bad:
            bad.append(info.name.split(".")[0])
            return json.dumps({**json.loads(data), field: value}).encode()
        return data

    rewrite_tar(victim, edit)
    with pytest.raises(CorruptShardError, match=rf"shard-000004\.tar: corrupt {bad[0]}\.meta\.json \({field} "):
        _epoch(str(broken), verify="none")
    assert len(_epoch(str(broken), verify="none", skip_corrupt=True)) == 62


@pytest.mark.timeout(60)  # it used to redraw the broken shards forever
def test_no_readable_shard_stops_the_resampled_stream(broken: Path) -> None:
    for shard in broken.glob("shard-*.tar"):
        shard.write_bytes(shard.read_bytes()[:700])
    cfg = LoaderConfig(shards=str(broken), batch_size=4, num_workers=0, skip_corrupt=True)
    with pytest.raises(CorruptShardError, match=r"data.skip_corrupt: none of the 7 shard\(s\) of rank 0 worker 0"):
        next(iter(build_pretrain_loader(cfg, 0, 1)))


# ---- the fuzz test -------------------------------------------------------------------------------


def _corrupt(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "splice", "splice-insert"])
    out = bytearray(raw)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    else:  # a chunk of the shard copied over (or into) another place: headers where payloads were
        n = rng.choice([1, 7, 100, 512, 1024, 3000])
        src, dst = rng.randrange(len(raw)), rng.randrange(len(raw))
        chunk = raw[src : src + n]
        out[dst : dst + (len(chunk) if kind == "splice" else 0)] = chunk
    return bytes(out)


@pytest.mark.timeout(60)
def test_fuzz_reader_ends_in_batches_or_corrupt_shard_error(tmp_path: Path) -> None:
    subjects, _ = discover(write_msd(tmp_path / "c", 2))
    shards = tmp_path / "s"
    write_shards(subjects, shards, TINY, samples_per_shard=100, workers=1, progress=False)
    shard = shards / "shard-000000.tar"
    raw = shard.read_bytes()
    ref = _epoch(str(shards))
    rng = random.Random(12)
    outcomes = {"clean": 0, "corrupt": 0}
    for trial in range(200):
        bad = _corrupt(raw, rng)
        shard.write_bytes(bad)
        t0 = time.monotonic()
        try:
            keys = _epoch(str(shards), verify="none")
            outcomes["clean"] += 1
            assert len(keys) <= len(ref), trial
        except CorruptShardError as exc:
            outcomes["corrupt"] += 1
            assert "shard-000000.tar" in str(exc) and "\n" not in str(exc), (trial, str(exc))
        assert len(_epoch(str(shards), verify="none", skip_corrupt=True)) <= len(ref), trial
        if bad != raw:  # the digest catches every change
            with pytest.raises(CorruptShardError, match="shard-000000.tar"):
                _epoch(str(shards))
        assert time.monotonic() - t0 < 10, trial
    assert outcomes["corrupt"] > 50 and outcomes["clean"] > 5, outcomes
