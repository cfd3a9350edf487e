"""Shard writer: SPEC contract, plain tar + stock webdataset readable, manifest, split, atomic replace."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import TINY, write_msd

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.data.shardformat import read_manifest
from ssl_pretrain.data.shards import write_shards


def test_contract_and_manifest(shard_dir: Path, msd_cohort: Path) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["preprocess"] == TINY.to_dict()
    assert manifest["num_samples"] == 63 == sum(s["samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(7)]
    assert manifest["has_labels"] and manifest["channels"] == 1 and manifest["size"] == [16, 20]
    assert manifest["label_names"] is None and manifest["skipped"] == []
    assert {s["id"] for s in manifest["subjects"]} == {f"case_{i:02d}" for i in range(10)}
    seen = set()
    for shard in manifest["shards"]:
        path = shard_dir / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:  # plain tar
            names = tar.getnames()
            assert len(names) == 3 * shard["samples"]
            for name in names:
                key, ext = name.split(".", 1)
                assert ext in ("image.npy", "label.npy", "meta.json")
                data = tar.extractfile(name).read()
                if ext == "image.npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    assert arr.dtype == np.float16 and arr.shape == (1, 16, 20)
                elif ext == "label.npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    assert arr.dtype == np.uint8 and arr.shape == (16, 20) and set(np.unique(arr)) <= {0, 1}
                else:
                    meta = json.loads(data)
                    assert set(meta) == {"subject", "slice", "num_slices", "position", "spacing", "source",
                                         "preprocess"}
                    assert key == f"{meta['subject']}_{meta['slice']:04d}"
                    assert 0.0 <= meta["position"] <= 1.0 and meta["source"].startswith("imagesTr/")
                    assert meta["preprocess"] == TINY.to_dict() and meta["spacing"][2] == 6.0
                    seen.add(key)
    assert len(seen) == 63


def test_stock_webdataset_reads_shards(shard_dir: Path) -> None:
    ds = wds.WebDataset(str(shard_dir / "shard-{000000..000006}.tar"), shardshuffle=False, empty_check=False)
    samples = list(ds.decode().to_tuple("image.npy", "label.npy", "meta.json"))
    assert len(samples) == 63
    img, lab, meta = samples[0]
    assert img.shape == (1, 16, 20) and img.dtype == np.float16 and lab.dtype == np.uint8
    assert isinstance(meta["subject"], str)


def test_split_is_subject_level(msd_cohort: Path, tmp_path: Path) -> None:
    subjects, _ = discover(msd_cohort)
    top = write_shards(subjects, tmp_path / "s", TINY, samples_per_shard=16, val_fraction=0.3, seed=1,
                       workers=1, progress=False)
    train_dir, train = read_manifest(tmp_path / "s", "train")
    val_dir, val = read_manifest(tmp_path / "s", "val")
    assert train_dir == tmp_path / "s" / "train" and val_dir == tmp_path / "s" / "val"
    tr = {s["id"] for s in train["subjects"]}
    va = {s["id"] for s in val["subjects"]}
    assert len(va) == 3 and not tr & va and len(tr | va) == 10
    assert train["num_samples"] + val["num_samples"] == 63
    assert top["splits"]["val"]["subjects"] == sorted(va) or set(top["splits"]["val"]["subjects"]) == va
    with pytest.raises(ValueError, match="split 'test' not found"):
        read_manifest(tmp_path / "s", "test")


def test_deterministic_bytes(msd_cohort: Path, shard_dir: Path, tmp_path: Path) -> None:
    subjects, _ = discover(msd_cohort)
    m = write_shards(subjects, tmp_path / "again", TINY, samples_per_shard=10, workers=1, progress=False)
    first = json.loads((shard_dir / "manifest.json").read_text())
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in first["shards"]]


def test_existing_output_refused_or_replaced_whole(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "c", 4)
    subjects, _ = discover(root)
    out = tmp_path / "out"
    write_shards(subjects, out, TINY, samples_per_shard=3, workers=1, progress=False)
    n_before = len(list(out.glob("shard-*.tar")))
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        write_shards(subjects[:1], out, TINY, workers=1, progress=False)
    assert len(list(out.glob("shard-*.tar"))) == n_before  # untouched
    m = write_shards(subjects[:1], out, TINY, samples_per_shard=100, workers=1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]  # no stale shards
    assert m["num_subjects"] == 1 and n_before > 1
    assert not list(tmp_path.glob(".out*"))  # no temporary leftovers
    user = tmp_path / "user_data"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a shard directory"):
        write_shards(subjects, user, TINY, workers=1, overwrite=True, progress=False)
    assert (user / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_process_pool_gives_same_shards(msd_cohort: Path, shard_dir: Path, tmp_path: Path) -> None:
    subjects, _ = discover(msd_cohort)
    m = write_shards(subjects, tmp_path / "pool", TINY, samples_per_shard=10, workers=2, progress=False)
    first = json.loads((shard_dir / "manifest.json").read_text())
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in first["shards"]]


def test_make_shards_flags_are_the_preprocess_fields(msd_cohort: Path, tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(Path(__file__).resolve().parents[3] / "launch" / "make_shards.py"))["main"]
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    for f in dataclasses.fields(PreprocessParams):
        if f.name == "field_of_view":  # shards are always fixed-size crops: no flag
            assert "--field-of-view" not in usage and "--field_of_view" not in usage
            continue
        assert f"--{f.name.replace('_', '-')} " in usage and f.metadata["help"].split()[0] in usage
    out = tmp_path / "cli"
    common = ["--input", str(msd_cohort), "--spacing", "2.5", "2.0", "--workers", "1", "--samples-per-shard", "10"]
    assert main([*common, "--output", str(out), "--size", "16", "20", "--channels", "0", "--norm", "minmax"]) == 0
    recorded = json.loads((out / "manifest.json").read_text())["preprocess"]
    assert recorded == {**TINY.to_dict(), "channels": [0], "norm": "minmax"}
    with pytest.raises(SystemExit) as exc:
        main([*common, "--output", str(tmp_path / "bad"), "--size", "0", "20"])
    assert exc.value.code == 2 and "preprocess.size: [0, 20] must be two positive ints" in capsys.readouterr().err


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    subjects, _ = discover(write_msd(tmp_path / "c", 2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / f".out.tmp-{dead.pid}"
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a run that still works (our parent process)
    other = tmp_path / f".other.tmp-{dead.pid}"  # another output's temporary
    for d in (stale, live, other):
        d.mkdir()
        (d / "shard-000000.tar.tmp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="ssl_pretrain.data.shards"):
        write_shards(subjects, tmp_path / "out", TINY, workers=1, progress=False)
    assert not stale.exists() and live.exists() and other.exists()
    assert [r.getMessage() for r in caplog.records if "partial shards" in r.getMessage()] == [
        f"removed {stale}: partial shards of an interrupted run (process {dead.pid} no longer exists)"
    ]
