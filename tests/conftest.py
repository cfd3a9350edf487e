"""Project-wide test settings: no test writes to the working directory's MLflow store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Ray's single-node switch (local Ray on 127.0.0.1 only) is read when ray is first imported; some tests
# import ray.tune in this process before the shared Ray session starts, so set it for the whole session
# (the sweep sets it itself: tests/downstream/test_sweep.py checks that in subprocesses without it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# pytest-xdist workers share the cores: each worker, and every process it starts, gets its share of intra-op
# threads (set before torch is imported). More OpenMP threads than cores spin against each other: on 2 cores
# with 2 workers the parallel part took 770 s with torch's default (2 threads per process) and 729 s with 1.
# A value set outside wins; a run without workers (the serial tests) keeps torch's default.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    # macOS has no sched_getaffinity
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))


@pytest.fixture(autouse=True)
def _triton_interpret_only_in_kernel_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TRITON_INTERPRET=1`` is the kernel tests' (tests/kernels/conftest.py sets it before triton imports).

    Every other test runs without it, and so do the processes it starts: on a machine with a GPU a
    training subprocess compiles the kernels instead of interpreting them.
    """
    if "kernels" not in request.path.relative_to(request.config.rootpath).parts[:2]:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _session_tracking_store(tmp_path_factory) -> None:
    """Point MLflow at a session-wide temporary store unless a test sets its own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow tracking store in the test's temporary directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Only the variable: mlflow.set_tracking_uri would outlive the test in this process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _sigterm_when(cmd: list[str], ready, *, env: dict[str, str] | None = None, cwd=None,
                  timeout: float = 240.0) -> tuple[int, str, float]:
    """Start ``cmd``, send it SIGTERM once ``ready()`` holds; return (exit code, stderr, seconds it took to exit)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    try:
        t0 = time.monotonic()
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[:3]} ended before the signal: {proc.stderr.read()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{cmd[:3]}: not ready within {timeout} s")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def sigterm_when():
    """:func:`_sigterm_when`: run a command and send it SIGTERM when a condition holds."""
    return _sigterm_when
