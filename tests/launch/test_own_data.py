"""The README's *Using your own data* walkthrough, run line by line as a user would (issue 26)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- own-data-walkthrough -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, "README.md: no ```bash block after <!-- own-data-walkthrough -->"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_walkthrough_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mydata").mkdir()
    for line in _walkthrough():
        # the README's commands as written; only the interpreter and the checkout's launch/ are filled in
        cmd = line.replace("python launch/", f"{shlex.quote(sys.executable)} {ROOT}/launch/")
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    data = tmp_path / "mydata"
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["excluded"] == ["prostate_s11_006", "prostate_s11_007", "prostate_s11_008", "prostate_s11_009"]
    assert manifest["num_subjects"] == 12 and manifest["channels"] == 2
    report = (data / "sweep" / "report" / "report.md").read_text()
    assert "none of the 3 test subjects among its 12 pretraining subjects" in report and "WARNING" not in report
    assert len(list((data / "masks").glob("*_mask.nii.gz"))) == 10
    assert len(list((data / "masks_champion").glob("*_mask.nii.gz"))) == 10
