"""A non-editable install runs without the source tree: the wheel holds every command and the shipped configs.

The wheel is built from this checkout and unpacked into a folder that stands first on ``PYTHONPATH``;
every command then runs from another directory, so nothing can be read from the checkout (a module
imported from it would fail the ``__file__`` check).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, cwd=wheels)
    (wheel,) = wheels.glob("mri_ssl-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_holds_commands_and_configs_not_tooling(installed: Path) -> None:
    names = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert {"mri_ssl/cli/pretrain.py", "mri_ssl/configs/debug.yaml", "mri_ssl/configs/sweep_debug.yaml",
            "experiments/recipe_study.py"} <= names
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/", "launch/"))]
    assert not [n for n in names if n.endswith(("bench.py", "gpu_check.py", "ntxent_reference.py"))]


@pytest.mark.slow
def test_installed_package_runs_the_demo_stages_from_elsewhere(installed: Path, tmp_path: Path) -> None:
    where = _run(installed, tmp_path, "-c", "import mri_ssl, ssl_pretrain, downstream, experiments, kernels; "
                 "print('\\n'.join(m.__file__ for m in (mri_ssl, ssl_pretrain, downstream, experiments, kernels)))")
    assert all(Path(f).is_relative_to(installed) for f in where.stdout.split())
    assert "--budget" in _run(installed, tmp_path, "-m", "experiments.recipe_study", "--help").stdout
    assert "--sites" in _run(installed, tmp_path, "-m", "mri_ssl.cli", "demo", "--help").stdout
    cli = ("-m", "mri_ssl.cli")
    _run(installed, tmp_path, *cli, "synth", "--kind", "liver", "--n", "6", "--out", "data")
    _run(installed, tmp_path, *cli, "make-shards", "--input", "data", "--output", "shards",
         "--size", "32", "32", "--spacing", "6", "6")
    # --config by name: the shipped debug.yaml, found inside the installed package
    out = _run(installed, tmp_path, *cli, "pretrain", "--config", "debug", "data.shards=shards", "out_dir=pre",
               "train.max_steps=3", "track=false", "data.num_workers=0", "probe.root=").stdout
    assert "export: pre/export/model.pt" in out
    out = _run(installed, tmp_path, *cli, "finetune", "--config", "finetune.yaml", "data.root=data", "out_dir=ft",
               "init=pre/export/model.pt", "n_labeled=1", "data.n_val=1", "data.n_test=1", "train.max_steps=2",
               "train.eval_every=2", "train.batch_size=2", "train.warmup_steps=0", "tracking.enabled=false").stdout
    assert "test Dice" in out
    _run(installed, tmp_path, *cli, "predict", "--model", "ft/model.pt", "--input", "data/imagesTr",
         "--output", "masks")
    assert list((tmp_path / "masks").glob("*_mask.nii.gz"))
