"""3D loader benchmark: patch streaming from volume shards against ``cat`` of the same shard bytes.

Usage::

    python -m benchmarks.loader3d                       # 8 liver volumes at 2 x 1.5 x 1.5 mm, 64³ patches
    python -m benchmarks.loader3d --patch 96 96 96 --patches-per-volume 2 --keep /tmp/bench3d

Everything runs in this process on one core (``torch.set_num_threads(1)``, no workers). The
loader reads each volume from its shard (sha256 off, as the 2D benchmark's ratio row), cuts
``--patches-per-volume`` random patches from it and delivers float32 batches ``(B, 1, D, H, W)``.
Rates are per CPU-second (wall in brackets). MB/s is shard bytes consumed: each volume's bytes
once per ``--patches-per-volume`` patches — the quantity ``cat`` reads too. Prints, never asserts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.loader import _cat_rate
from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.loader import LoaderConfig, build_pretrain_loader
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.data.shardformat import read_manifest
from ssl_pretrain.data.shards import write_shards


def run(work: Path, subjects: int, patch: tuple[int, int, int], ppv: int, batch: int, patches: int) -> dict:
    """Build the cohort and shards under ``work`` (if absent) and print the rates and the ratio."""
    torch.set_num_threads(1)
    cohort, shards = work / "cohort", work / "shards3d"
    if not (cohort / "dataset.json").exists():
        make_cohort("liver", subjects, cohort, seed=0, labels=False)
    if not (shards / "manifest.json").exists():
        subs, skipped = discover(cohort)
        write_shards(subs, shards, PreprocessParams(spacing=(2.0, 1.5, 1.5)), samples_per_shard=2, workers=2,
                     skipped=skipped, progress=False)
    shard_dir, manifest = read_manifest(shards)
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    total_bytes = sum(p.stat().st_size for p in paths)
    per_volume = total_bytes / manifest["num_samples"]
    cat_volumes = _cat_rate(paths, manifest["num_samples"])  # volumes per CPU-second, per wall-second

    cfg = LoaderConfig(shards=str(shard_dir), batch_size=batch, num_workers=0, verify="none", patch_size=patch,
                       patches_per_volume=ppv, shuffle_buffer=4 * ppv)
    it = iter(build_pretrain_loader(cfg, 0, 1))
    next(it)  # warm-up
    done = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while done < patches:
        done += len(next(it)["image"])
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    loader = (done / cpu, done / wall)
    loader_mb = loader[0] / ppv * per_volume / 1e6
    cat_mb = cat_volumes[0] * per_volume / 1e6
    shapes = [s["shape"] for s in manifest["subjects"]]
    print(f"3D loader benchmark: {manifest['num_samples']} volumes (e.g. {shapes[0]} voxels, "
          f"{per_volume / 1e6:.1f} MB each) in {len(paths)} shards; patches {list(patch)}, {ppv} per volume, "
          f"batch {batch}; one core, rates per CPU-second (wall in brackets)")
    print(f"  (c) cat shard bytes > /dev/null      {cat_volumes[0] * ppv:>9,.0f} patches/s-equivalent "
          f"{cat_mb:>7,.0f} MB/s   (wall {cat_volumes[1] * per_volume / 1e6:,.0f} MB/s)")
    print(f"  mri-ssl patch streaming              {loader[0]:>9,.0f} patches/s {loader_mb:>16,.0f} MB/s   "
          f"(wall {loader[1]:,.0f} patches/s)")
    print(f"  ratio loader / cat (shard MB/s)   : {loader_mb / cat_mb:8.2f}x   (goal >= 0.5x)")
    return {"patches_per_s": loader[0], "mb_per_s": loader_mb, "cat_mb_per_s": cat_mb}


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description="3D patch-streaming benchmark (prints, never asserts).")
    ap.add_argument("--subjects", type=int, default=8, help="synthetic liver volumes (default 8)")
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"))
    ap.add_argument("--patches-per-volume", type=int, default=4, help="patches cut per volume read (default 4)")
    ap.add_argument("--batch-size", type=int, default=2, help="batch size (default 2)")
    ap.add_argument("--patches", type=int, default=200, help="patches timed (default 200)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep/reuse (default: temporary)")
    args = ap.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.keep, args.subjects, tuple(args.patch), args.patches_per_volume, args.batch_size, args.patches)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.subjects, tuple(args.patch), args.patches_per_volume, args.batch_size, args.patches)


if __name__ == "__main__":
    main()
