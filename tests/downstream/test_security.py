"""Untrusted references and careless inputs: MLflow artifact paths, temporary downloads, mask names, locks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream.inference import load_segmentation_model
from downstream.model_refs import resolve_model_file
from downstream.predict import predict
from ssl_pretrain.export import save_export
from ssl_pretrain.models.unet import UNet, UNetConfig

from .conftest import BUDGET, PARAMS32, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _finetuned_export(path: Path) -> Path:
    """A segmentation export (encoder, decoder, 2-class head), as finetuning writes it."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, widths=(8, 16)), 2)
    return save_export(path, task="contrastive", model_config=net.cfg, encoder_state=net.encoder.state_dict(),
                       decoder_state=net.decoder.state_dict(), head_state=net.head.state_dict(), num_classes=2,
                       preprocessing=PARAMS32.to_dict(), info=BUDGET)


@pytest.fixture
def logged_run(tmp_path: Path, mlflow_uri: str) -> tuple[str, Path]:
    """A run in a local SQLite store whose artifacts (``export/model.pt``) live under tmp_path/artifacts."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("security", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, str(_finetuned_export(tmp_path / "model.pt")), "export")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, tmp_path / "artifacts" / run.info.run_id / "artifacts"


def test_artifact_paths_with_dotdot_are_refused(tmp_path: Path, logged_run: tuple[str, Path]) -> None:
    run_id, artifacts = logged_run
    secret = tmp_path / "secret.txt"  # outside the run's artifact root
    secret.write_text("not an artifact")
    assert (artifacts / ".." / ".." / ".." / "secret.txt").resolve() == secret.resolve()
    dst = tmp_path / "dl"
    for ref in (f"runs:/{run_id}/../../../secret.txt", f"runs:/{run_id}/export/%2E%2E/%2e%2e/../../secret.txt"):
        with pytest.raises(ValueError, match=r"'\.\.' is not allowed") as e:
            resolve_model_file(ref, dst)
        assert len(str(e.value).splitlines()) == 1
    assert not dst.exists()
    # the run's own artifacts still resolve, into the folder named, replaced whole on the next download
    got = resolve_model_file(f"runs:/{run_id}/export/model.pt", dst)
    assert got.is_file() and got.parent == dst
    (dst / "stale.pt").write_bytes(b"old")
    assert resolve_model_file(f"runs:/{run_id}", dst).is_file() and not (dst / "stale.pt").exists()


def test_model_uris_leave_no_temporary_folder(tmp_path: Path, logged_run: tuple[str, Path], monkeypatch) -> None:
    run_id, _ = logged_run
    tmp = tmp_path / "system_tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where mkdtemp / TemporaryDirectory go
    model, export = load_segmentation_model(f"runs:/{run_id}/export/model.pt")
    assert export["num_classes"] == 2 and model.cfg.widths == (8, 16)
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 3)).astype(np.float32), np.eye(4)), vol)
    [mask] = predict(f"runs:/{run_id}", vol, tmp_path / "m.nii.gz")
    assert nib.load(mask).shape == (20, 20, 3)
    assert list(tmp.iterdir()) == []


def test_predict_never_writes_two_masks_to_one_name(tmp_path: Path) -> None:
    model = _finetuned_export(tmp_path / "model.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.nii", "a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(rng.random((20, 20, 3)).astype(np.float32), np.eye(4)), folder / name)
    out = tmp_path / "masks"
    with pytest.raises(ValueError, match=r"a\.nii and .*a\.nii\.gz would both be written to .*a_mask\.nii\.gz"):
        predict(model, folder, out)
    assert not out.exists()  # refused before anything was written
    (folder / "a.nii").unlink()
    assert sorted(p.name for p in predict(model, folder, out)) == ["a_mask.nii.gz", "b_mask.nii.gz"]
    # a mask over one of the inputs (output folder = input folder, an input named like a mask)
    (folder / "b_mask.nii.gz").write_bytes((folder / "b.nii.gz").read_bytes())
    before = (folder / "b_mask.nii.gz").read_bytes()
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict(model, folder, folder)
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict(model, folder / "b.nii.gz", folder / "b.nii.gz")
    assert (folder / "b_mask.nii.gz").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# one run per output directory (finetune and sweep CLIs; pretrain and make_shards: tests/ssl_pretrain)
# ---------------------------------------------------------------------------------------------

# holds out_dir/.lock as a run does (flock, pid inside); plain fcntl, so the test states the protocol
_HOLD = """
import fcntl, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"{os.getpid()}\\n")
    f.flush()
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("script,config", [("finetune", "finetune.yaml"), ("sweep", "sweep_debug.yaml")])
def test_a_second_run_on_a_locked_out_dir_refuses(cohort: Path, tmp_path: Path, script: str, config: str) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline() == "locked\n"
        r = subprocess.run([sys.executable, str(ROOT / "launch" / f"{script}.py"), "--config",
                            str(ROOT / "launch" / "configs" / config), *tiny_overrides(cohort, out, size=32)],
                           capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert f"{out} is in use by another run (pid {holder.pid} " in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
