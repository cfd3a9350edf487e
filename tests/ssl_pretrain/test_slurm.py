"""The SLURM recipe (launch/slurm/pretrain.sbatch): its numbers are the cluster config's, and its command
line runs — two "nodes" started by a stand-in ``srun`` on this machine, torchrun's c10d rendezvous on
127.0.0.1 — as a cluster would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_pretrain.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
CONFIGS = ROOT / "launch" / "configs"


def _directives() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SBATCH.read_text(), re.M))


def test_the_recipe_is_sized_as_its_cluster_config() -> None:
    text, d = SBATCH.read_text(), _directives()
    config_name = re.search(r"^CONFIG=\$\{CONFIG:-(\w+)\}", text, re.M).group(1)
    config = CONFIGS / f"{config_name}.yaml"
    comment = config.read_text()
    gpus, patches = map(int, re.search(r"(\d+) GPUs → (\d+) patches", comment).groups())
    hours = int(re.search(r"≈ (\d+) H100-hours", comment).group(1))
    per_gpu = yaml.safe_load(comment)["data"]["batch_size"]
    nodes, per_node = int(d["nodes"]), int(d["gpus-per-node"])
    assert nodes * per_node == gpus and gpus * per_gpu == patches
    assert f"{gpus} GPUs × {per_gpu} patches = {patches} patches per step" in text
    assert f"≈ {hours} H100-hours" in text and f"{nodes} nodes × {per_node} GPUs ≈ {round(hours / gpus)} h" in text
    assert d["ntasks-per-node"] == "1"  # one torchrun per node, which starts the node's ranks


def _shim(bin_dir: Path) -> None:
    """``scontrol show hostnames`` → 127.0.0.1; ``srun`` → its command once per node, in parallel."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'pids=(); for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)


@pytest.mark.slow
def test_the_recipe_runs_two_nodes_with_torchrun(pretrain_shards: Path, tmp_path: Path) -> None:
    _shim(tmp_path / "bin")
    out = tmp_path / "run"
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env = {**keep, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1",
           "RDZV_PORT": str(free_port()), "CONFIG": str(CONFIGS / "debug.yaml"), "SHARDS": str(pretrain_shards),
           "OUT": str(out), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(["bash", str(SBATCH), "task=regression", "track=false", "train.max_steps=4",
                           "train.warmup_steps=1", "data.num_workers=0", "train.track_samples=true", "probe.root="],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_max_abs_diff"] == 0.0
    rank0, rank1 = (set(s) for s in summary["samples_by_rank"])
    assert rank0 and rank1 and not rank0 & rank1  # each node's rank read its own shards
    assert (out / "export" / "model.pt").is_file()
