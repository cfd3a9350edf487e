"""Data benchmark: slices/s of the streaming loader on one core against three baselines.

Usage::

    python -m benchmarks.loader                  # 12 liver subjects at 256×256, 4000 slices
    python -m benchmarks.loader --subjects 24 --slices 8000 --keep /tmp/bench

All four readers run in this process, on one core (``torch.set_num_threads(1)``, no workers),
and deliver float32 tensors ``(B, C, H, W)`` batched, before augmentation:

* (a) a naive map-style ``Dataset`` reading each slice through nibabel from the ``.nii.gz``
  files (native 256×256 grid, no preprocessing — a generous baseline);
* (b) webdataset's stock path ``.decode()`` + ``.to_tuple()`` + ``.batched()`` over the same shards;
* (c) the raw read rate of the same shard bytes (``cat`` to ``/dev/null``, page cache warm).

The loader is timed twice: ``data.verify=none`` (the ratios) and ``data.verify=sha256`` (the
default: size and digest of each shard checked against the manifest when a stream first opens it),
the latter timed from its first batch so that every shard's hash is counted.

MB/s counts the float16 image payload delivered (C·H·W·2 bytes per slice). Prints, never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import webdataset as wds

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.loader import LoaderConfig, build_pretrain_loader
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.data.shardformat import read_manifest
from ssl_pretrain.data.shards import write_shards


class NiftiSliceDataset(torch.utils.data.Dataset):
    """Naive map-style baseline: every item opens the ``.nii.gz`` and reads one axial slice."""

    def __init__(self, files: list[Path]) -> None:
        self.index = [(f, z) for f in files for z in range(nib.load(f).shape[2])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        path, z = self.index[i]
        arr = np.asarray(nib.load(path).dataobj[:, :, z], dtype=np.float32)
        return torch.from_numpy(arr)[None]


def _rate(batches: Iterator, n_slices: int, warmup: int = 2) -> tuple[float, float]:
    """(slices per CPU-second of this process, slices per wall-second) over ``n_slices``.

    CPU time is the per-core cost and does not depend on other load on the machine; wall time
    does (both are printed).
    """
    for _ in range(warmup):
        next(batches)
    done = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while done < n_slices:
        done += len(next(batches))
    return done / (time.process_time() - c0), done / (time.perf_counter() - t0)


def _cycle_loader(dl: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from dl


def _stock_wds(urls: list[str], batch: int) -> Iterator[torch.Tensor]:
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple("image.npy", "meta.json")
    ds = ds.batched(batch)
    while True:
        for images, _meta in ds:
            yield torch.from_numpy(np.asarray(images)).to(torch.float32)


def _ours(shard_dir: Path, batch: int, verify: str) -> Iterator[torch.Tensor]:
    cfg = LoaderConfig(shards=str(shard_dir), batch_size=batch, num_workers=0, mode="resampled", verify=verify)
    for b in build_pretrain_loader(cfg, rank=0, world_size=1):
        yield b["image"]


def _sha256_cost(paths: list[Path], samples: int) -> float:
    """Slices per CPU-second of hashing the shards (what an unconditional re-hash per open would bound)."""
    c0 = time.process_time()
    for p in paths:
        hashlib.sha256(p.read_bytes()).hexdigest()
    return samples / max(time.process_time() - c0, 1e-9)


def _cat_rate(paths: list[Path], samples: int, repeats: int = 5) -> tuple[float, float]:
    """(slices per CPU-second of ``cat``, slices per wall-second) reading the shards to /dev/null."""
    cmd = ["cat", *map(str, paths)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    for _ in range(repeats):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    r1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return samples * repeats / max(cpu, 1e-9), samples * repeats / wall


def run(work: Path, subjects: int, slices: int, batch: int, naive_slices: int) -> dict[str, tuple[float, float]]:
    """Build the cohort and shards under ``work`` (if absent) and print the benchmark table."""
    torch.set_num_threads(1)
    cohort, shards = work / "cohort", work / "shards"
    if not (cohort / "dataset.json").exists():
        make_cohort("liver", subjects, cohort, seed=0, labels=False)
    params = PreprocessParams(spacing=(1.5, 1.5), size=(256, 256))
    if not (shards / "manifest.json").exists():
        subs, skipped = discover(cohort)
        write_shards(subs, shards, params, samples_per_shard=256, workers=2, skipped=skipped, progress=False)
    shard_dir, manifest = read_manifest(shards)
    c, h, w = manifest["sample"]["image.npy"]["shape"]
    mb = c * h * w * 2 / 1e6
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    files = sorted((cohort / "imagesTr").glob("*.nii.gz"))

    naive = NiftiSliceDataset(files)
    order = torch.utils.data.RandomSampler(naive, generator=torch.Generator().manual_seed(0))
    dl = torch.utils.data.DataLoader(naive, batch_size=batch, sampler=order, num_workers=0)
    rates = {
        "cat": _cat_rate(paths, manifest["num_samples"]),
        "nibabel": _rate(_cycle_loader(dl), naive_slices, warmup=1),
        "stock": _rate(_stock_wds([str(p) for p in paths], batch), slices),
        "ours": _rate(_ours(shard_dir, batch, "none"), slices),
    }
    verified = _rate(_ours(shard_dir, batch, "sha256"), slices, warmup=0)  # no warm-up: every hash is timed
    print(f"data benchmark: {manifest['num_samples']} slices of {c}x{h}x{w} float16 in {len(paths)} shards, "
          f"batch {batch}, one core (torch threads 1, in-process); rates per CPU-second (wall in brackets)")
    names = {
        "cat": "(c) cat shard bytes > /dev/null",
        "nibabel": "(a) naive nibabel map-style Dataset",
        "stock": "(b) webdataset stock decode/to_tuple/batched",
        "ours": "mri-ssl streaming loader, data.verify=none",
    }
    rows = [*((names[k], rates[k]) for k in ("nibabel", "stock", "cat", "ours")),
            ("mri-ssl streaming loader, data.verify=sha256", verified)]
    for name, (cpu, wall) in rows:
        print(f"  {name:<46s} {cpu:>9,.0f} slices/s {cpu * mb:>7,.0f} MB/s   (wall {wall:>9,.0f} slices/s)")
    ours = rates["ours"][0]
    print(f"  ratio loader / nibabel : {ours / rates['nibabel'][0]:8.1f}x   (goal >= 50x)")
    print(f"  ratio loader / stock   : {ours / rates['stock'][0]:8.2f}x   (goal >= 2.5x and >= 10,000 slices/s)")
    print(f"  ratio loader / cat     : {ours / rates['cat'][0]:8.2f}x   (raw read ceiling)")
    print(f"  ratio verify=sha256 / verify=none : {verified[0] / ours:5.2f}x   (each shard hashed once per "
          f"stream; hashing every open would cost {_sha256_cost(paths, manifest['num_samples']):,.0f} slices/s)")
    return rates


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description="Streaming-loader benchmark (prints, never asserts).")
    ap.add_argument("--subjects", type=int, default=12, help="synthetic liver subjects (default 12)")
    ap.add_argument("--slices", type=int, default=4000, help="slices timed per loader (default 4000)")
    ap.add_argument("--naive-slices", type=int, default=256, help="slices timed for nibabel (default 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep/reuse (default: temporary)")
    args = ap.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep, args.subjects, args.slices, args.batch_size, args.naive_slices)
    else:
        with tempfile.TemporaryDirectory(prefix="mri-ssl-bench-") as tmp:
            run(Path(tmp), args.subjects, args.slices, args.batch_size, args.naive_slices)


if __name__ == "__main__":
    main()
