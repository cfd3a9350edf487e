"""Safe writes and output locks: atomic replace, no writing through planted links, one run per directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_pretrain.fileio import atomic_path, atomic_write_text


def test_replaces_whole_and_cleans_up_on_failure(tmp_path):
    dest = tmp_path / "sub" / "manifest.json"
    atomic_write_text(dest, "old")
    assert dest.read_text() == "old" and oct(dest.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in dest.parent.iterdir()] == ["manifest.json"]
    with atomic_path(dest, suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == dest.parent
        tmp.write_text("new")
    assert dest.read_text() == "new"


def test_append_and_figures_do_not_write_through_planted_links(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ssl_pretrain.fileio import append_text, atomic_savefig

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    log = tmp_path / "metrics.jsonl"
    append_text(log, "1\n")
    append_text(log, "2\n")
    assert log.read_text() == "1\n2\n" and oct(log.stat().st_mode & 0o777) == "0o644"
    link = tmp_path / "planted.jsonl"
    link.symlink_to(victim)
    with pytest.raises(ValueError, match=r"planted\.jsonl is a symbolic link"):
        append_text(link, "3\n")
    png = tmp_path / "loss.png"
    png.symlink_to(victim)
    fig = plt.figure()
    atomic_savefig(fig, png)
    plt.close(fig)
    assert not png.is_symlink() and png.read_bytes()[:4] == b"\x89PNG" and victim.read_text() == "keep"


# ---- pretraining outputs ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "launch/configs/debug.yaml"


def _pretrain_args(shards, out, *more):
    return ["--config", str(DEBUG), f"data.shards={shards}", f"out_dir={out}",
            "data.num_workers=0", "track=false", *more]


def test_pretraining_does_not_write_through_planted_symlinks(pretrain_shards, tmp_path):
    from ssl_pretrain.config import load_config
    from ssl_pretrain.engine.config import PretrainConfig
    from ssl_pretrain.engine.trainer import run_pretraining

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").symlink_to(victim)
    cfg = load_config(PretrainConfig, DEBUG, _pretrain_args(pretrain_shards, out, "train.max_steps=3")[2:])
    run_pretraining(cfg)
    assert victim.read_text() == "keep"
    assert not (out / "summary.json").is_symlink() and json.loads((out / "summary.json").read_text())["steps"] == 3

    out2 = tmp_path / "run2"
    out2.mkdir()
    (out2 / "metrics.jsonl").symlink_to(victim)
    cfg = load_config(PretrainConfig, DEBUG, _pretrain_args(pretrain_shards, out2, "train.max_steps=3")[2:])
    with pytest.raises(ValueError, match=r"run2/metrics\.jsonl is a symbolic link"):
        run_pretraining(cfg)
    assert victim.read_text() == "keep"


# ---- one run per output directory ----------------------------------------------------------------


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_two_pretraining_processes_on_one_out_dir(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "launch/pretrain.py"),
                              *_pretrain_args(pretrain_shards, out, "train.max_steps=100000",
                                              "train.ckpt_every=100000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").is_file() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"),
                                 *_pretrain_args(pretrain_shards, out, "train.max_steps=4")],
                                capture_output=True, text=True, env=_env(), timeout=300)
        assert first.poll() is None  # still training, undisturbed
    finally:
        first.kill()
        first.wait(timeout=60)
    assert second.returncode == 2
    assert f"{out} is in use by another run (pid {first.pid} holds {out / '.lock'})" in _error_line(second)
    # the kernel dropped the killed run's lock: the next run proceeds
    third = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"),
                            *_pretrain_args(pretrain_shards, out, "train.max_steps=3")],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]


def test_make_shards_refuses_while_another_writes_the_output(tmp_path):
    from ssl_pretrain.data.phantoms import make_cohort

    raw = make_cohort("liver", 2, tmp_path / "raw", seed=0, labels=False)
    out = tmp_path / "shards"
    # holds the lock beside the output as make_shards does (flock, pid inside): the test states the protocol
    hold = (
        "import fcntl, os, sys\n"
        f"f = open({str(tmp_path / '.shards.lock')!r}, 'w')\n"
        "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        r = subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "--input", str(raw), "--output",
                            str(out), "--size", "32", "32", "--workers", "1"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert r.returncode == 1
    assert f"{out} is in use by another run (pid {holder.pid} " in _error_line(r)
    assert not out.exists()


def test_lock_output_dir_names_a_file_in_the_way_and_a_planted_lock_link(tmp_path):
    from ssl_pretrain.fileio import lock_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file is not a directory; expected an output directory there"), \
            lock_output_dir(tmp_path / "file"):
        pass
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "file")
    with pytest.raises(ValueError, match=r"run/\.lock is a symbolic link"), lock_output_dir(tmp_path / "run"):
        pass
    assert (tmp_path / "file").read_text() == "x"
    with lock_output_dir(tmp_path / "new") as lock:
        assert lock == tmp_path / "new" / ".lock" and lock.read_text() == f"{os.getpid()}\n"


def test_a_killed_holders_forked_children_are_waited_for(tmp_path):
    """kill -9 of a run leaves its forked data-loader workers holding the lock for a moment: the next
    run waits for them (the recorded holder is dead) instead of refusing."""
    import signal

    from ssl_pretrain.fileio import lock_output_dir

    out, ready = tmp_path / "run", tmp_path / "ready"
    holder = (
        "import os, sys, time\n"
        "from ssl_pretrain.fileio import lock_output_dir\n"
        f"with lock_output_dir({str(out)!r}):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(2.0)\n"  # the orphaned child keeps the inherited lock for 2 s
        "        os._exit(0)\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    with lock_output_dir(out) as lock:
        assert lock is not None and (out / ".lock").read_text().strip() == str(os.getpid())
    assert time.monotonic() - t0 > 0.5  # it did wait for the child rather than find the lock free
