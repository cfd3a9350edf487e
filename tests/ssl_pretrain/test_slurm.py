"""The SLURM recipe (launch/slurm/pretrain.sbatch): its numbers are the cluster config's. That its command line
runs — two "nodes" started by a stand-in ``srun``, torchrun's c10d rendezvous on 127.0.0.1 — and trains exactly
as one node of two ranks is tested in test_pretrain_distributed.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

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
