"""Checkpoints: a save that dies half-way never becomes ``latest``; a complete one restores the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_pretrain.config import load_config
from ssl_pretrain.engine.checkpoint import CheckpointDir, CheckpointError
from ssl_pretrain.engine.config import PretrainConfig, deepspeed_config
from ssl_pretrain.engine.distributed import DistInfo, init_distributed, shutdown_distributed
from ssl_pretrain.engine.trainer import build_task

DEBUG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "debug.yaml"


def _engine(cfg: PretrainConfig, info: DistInfo) -> Any:
    import deepspeed

    task = build_task(cfg, info)
    engine, _, _, _ = deepspeed.initialize(model=task, model_parameters=list(task.parameters()),
                                           config=deepspeed_config(cfg, 1), dist_init_required=False)
    return engine


def test_interrupted_save_never_becomes_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(PretrainConfig, DEBUG, ["task=regression", "data.shards=unused"])
    info = init_distributed()
    try:
        engine = _engine(cfg, info)
        batch = {"image": torch.randn(4, 1, 32, 32)}
        ckpt = CheckpointDir(tmp_path / "checkpoints", rank=0, keep=2)
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        ckpt.save(engine, 1, {"step": 1}, {"note": "one"})
        saved = {k: v.clone() for k, v in engine.module.state_dict().items()}

        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

        def crash(*args: object, **kwargs: object) -> None:
            raise OSError("disk full (simulated crash during the save)")

        with monkeypatch.context() as m:
            m.setattr(torch, "save", crash)
            with pytest.raises(OSError, match="simulated crash"):
                ckpt.save(engine, 2, {"step": 2}, {"note": "two"})
        assert ckpt.latest_tag() == "step-00000001"
        assert ckpt.read_meta()["step"] == 1
        assert (tmp_path / "checkpoints" / ".tmp-step-00000002").is_dir()  # the debris is not a checkpoint

        # a fresh engine restores the complete checkpoint exactly
        fresh = _engine(load_config(PretrainConfig, DEBUG, ["task=regression", "data.shards=unused", "seed=7"]), info)
        ckpt.load(fresh, ckpt.latest_tag())
        for k, v in fresh.module.state_dict().items():
            assert torch.equal(v, saved[k]), k
        assert ckpt.read_rank_state("step-00000001") == {"note": "one"}

        ckpt.save(engine, 2, {"step": 2}, {"note": "two"})  # the next save clears the debris
        assert ckpt.latest_tag() == "step-00000002"
        assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

        (tmp_path / "checkpoints" / "latest").write_text("step-00000099")
        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            ckpt.latest_tag()
        (tmp_path / "checkpoints" / "step-00000002" / "meta.json").write_text(json.dumps({"version": 0}))
        with pytest.raises(CheckpointError, match="not an mri-ssl checkpoint"):
            ckpt.read_meta("step-00000002")
    finally:
        shutdown_distributed(info)


class _RunsCode:
    """A pickle payload that creates ``marker`` when it is unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_rank_state_loads_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    from ssl_pretrain.engine.checkpoint import capture_rng, restore_rng

    ckpt = CheckpointDir(tmp_path, rank=0)
    (tmp_path / "step-00000001").mkdir()
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # NumPy's cached Gaussian is part of its state
    state = {"loader": {"epoch": 0, "batches": 7}, "rng": capture_rng(), "task_rng": torch.Generator().get_state()}
    torch.save(state, tmp_path / "step-00000001" / "trainer_rank0.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    restore_rng(ckpt.read_rank_state("step-00000001")["rng"])
    again = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]

    # a rank file that would run code when unpickled is refused, and the code never runs
    marker = tmp_path / "code-ran"
    torch.save({"loader": _RunsCode(marker)}, tmp_path / "step-00000001" / "trainer_rank0.pt")
    with pytest.raises(CheckpointError, match="trainer_rank0.pt: not a readable trainer state"):
        ckpt.read_rank_state("step-00000001")
    assert not marker.exists()


def test_a_checkpoint_deepspeed_cannot_convert_for_other_ranks_is_one_line(tmp_path: Path) -> None:
    """Issue 25.2: resuming on another number of ranks converts ZeRO's partitions (DeepSpeed's universal
    checkpoint); a checkpoint without them stops with one line naming it, not DeepSpeed's traceback."""
    ckpt = CheckpointDir(tmp_path / "checkpoints", rank=0)
    (ckpt.root / "step-00000004").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"checkpoints/step-00000004: DeepSpeed cannot convert it for another "
                                              r"number of ranks \(.+\); resume on the number of ranks that wrote it"):
        ckpt.to_universal("step-00000004")
