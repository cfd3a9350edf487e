"""The pretraining config tree (``launch/configs/*.yaml``) and the DeepSpeed JSON derived from it.

Batch sizes: ``data.batch_size`` is the micro batch of one rank (what the loader yields).
``train.batch_size``, when set, is the global batch per optimizer step; it must divide into
``world_size × train.grad_accum`` micro batches, and then it decides the micro batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ssl_pretrain.config import ConfigError, FieldError, option
from ssl_pretrain.data.loader import LoaderConfig
from ssl_pretrain.engine.probe import ProbeConfig
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.registry import TASKS

__all__ = ["PretrainTrainConfig", "PretrainConfig", "BatchPlan", "batch_plan", "resolve_precision", "deepspeed_config"]

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class PretrainTrainConfig:
    """Optimisation, precision, parallelism and the rhythm of logs / checkpoints / figures."""

    max_steps: int = option(1000, "optimizer steps of the whole run", ge=1)
    batch_size: int | None = option(
        None, "global batch per optimizer step; null = data.batch_size × grad_accum × world size", ge=1
    )
    grad_accum: int = option(1, "micro batches accumulated per optimizer step", ge=1)
    optimizer: Literal["AdamW", "LAMB"] = option("AdamW", "AdamW (torch) or LAMB (DeepSpeed FusedLamb, GPU only)")
    lr: float = option(1e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = option(0.01, "cosine decay ends at lr × min_lr_ratio", ge=0, le=1)
    warmup_steps: int = option(100, "linear warmup steps", ge=0)
    weight_decay: float = option(1e-4, "decoupled weight decay", ge=0)
    betas: tuple[float, ...] = option((0.9, 0.999), "Adam / LAMB betas", ge=0, lt=1, length=2,
                                     rule="need two values in [0, 1)")
    grad_clip: float = option(1.0, "gradient norm clipping; 0 turns it off", ge=0)
    zero_stage: int = option(0, "DeepSpeed ZeRO stage 0, 1 or 2", choices=(0, 1, 2))
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 on GPUs that support it, else fp32")
    cpu_threads: int | None = option(
        None, "intra-op threads per CPU rank; null = OMP_NUM_THREADS or cores / ranks on the node", ge=1
    )
    peer_timeout_s: int = option(
        600, "seconds a rank waits for the others in a collective before it stops with one line naming the "
        "silent peer (a lost or hung node); torch's own default is 30 minutes", ge=1,
    )
    deepspeed_config: str | None = option(
        None, "your own DeepSpeed JSON; replaces the derived one (its batch keys must agree with this config)"
    )
    log_every: int = option(10, "steps between metric logs", ge=1)
    ckpt_every: int = option(500, "steps between checkpoints (one is always written at the end)", ge=1)
    keep_checkpoints: int = option(2, "how many checkpoints to keep", ge=1)
    image_every: int = option(500, "steps between task figures (PNG)", ge=1)
    export_every: int = option(0, "steps between intermediate exports export/step-NNNNNNN/model.pt; 0 = none", ge=0)
    collapse_std: float = option(
        0.1,
        "collapse warning when health/std_norm (std of the normalised projections × √d, ≈ 1 healthy) is below this",
        ge=0,
    )
    collapse_logs: int = option(3, "consecutive logs below collapse_std before the collapse warning", ge=1)
    check_replicas: bool = option(True, "at the end, check that every rank holds identical parameters")
    track_samples: bool = option(False, "record which slices each rank saw (summary.json; for small test runs)")

    def check_fields(self) -> None:
        """The rule no bound can say: a user DeepSpeed JSON must exist."""
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise FieldError(f"deepspeed_config: file not found: {self.deepspeed_config}")


def _task_sections(cls: type) -> type:
    """Give ``cls`` its ``task`` choices and one ``<name>:`` section per task, from the task table."""
    cls.__annotations__["task"] = Literal[tuple(TASKS)]  # the allowed values and the --help text
    for name, spec in TASKS.items():
        cls.__annotations__[name] = spec.config
        setattr(cls, name, option(factory=spec.config, help=spec.help))
    return cls


@dataclass
@_task_sections
class PretrainConfig:
    """Self-supervised pretraining of the UNet on a shard directory.

    Besides the fields below it has one section per pretext task of
    :data:`~ssl_pretrain.tasks.registry.TASKS` (``contrastive``, ``regression``, ...), named like
    the task and typed by the task's config class; ``task`` must be one of those names.
    """

    out_dir: str = option("runs/pretrain", "everything the run writes goes under it")
    seed: int = option(0, "random seed (model init; augmentations use seed + rank)", ge=0)
    task: str = option("contrastive", "pretext task")
    resume: Literal["never", "auto"] = option(
        "auto", "auto: continue from out_dir's latest checkpoint if there is one; never: out_dir must hold none"
    )
    experiment: str = option("mri-ssl/pretrain", "MLflow experiment")
    run_name: str | None = option(None, "MLflow run name (default: MLflow's)")
    track: bool = option(True, "log to MLflow on rank 0 (honours MLFLOW_TRACKING_URI)")
    data: LoaderConfig = option(factory=LoaderConfig, help="shards and streaming")
    model: UNetConfig = option(factory=UNetConfig, help="UNet architecture")
    train: PretrainTrainConfig = option(factory=PretrainTrainConfig, help="optimisation and rhythm")
    probe: ProbeConfig = option(factory=ProbeConfig, help="segmentation probe on a few labeled volumes")

    def check_fields(self) -> None:
        """Rules across sections (each field's bounds are checked by the loader)."""
        if self.train.warmup_steps >= self.train.max_steps and self.train.max_steps > 1:
            raise FieldError(
                f"train.warmup_steps: must be < train.max_steps ({self.train.max_steps}), got {self.train.warmup_steps}"
            )
        dims = TASKS[self.task].dims
        if self.model.spatial_dims not in dims:
            raise FieldError(f"task: {self.task} runs on model.spatial_dims {' or '.join(map(str, dims))}, "
                             f"not {self.model.spatial_dims}")
        check_model = getattr(self.task_config, "check_model", None)
        if callable(check_model):  # task options that depend on the UNet architecture
            check_model(self.model)

    @property
    def task_config(self) -> Any:
        """The config section of the selected task (e.g. ``self.contrastive``)."""
        return getattr(self, self.task)


@dataclass(frozen=True)
class BatchPlan:
    """Batch sizes of one run."""

    micro: int  # per rank per forward
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.micro * self.grad_accum * self.world_size


def batch_plan(cfg: PretrainConfig, world_size: int) -> BatchPlan:
    """Work out the micro batch for ``world_size`` ranks.

    Raises:
        ConfigError: ``train.batch_size`` does not divide into ``world_size × grad_accum`` micro batches.
    """
    gas = cfg.train.grad_accum
    if cfg.train.batch_size is None:
        return BatchPlan(cfg.data.batch_size, gas, world_size)
    if cfg.train.batch_size % (world_size * gas):
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} does not divide across {world_size} ranks × "
            f"{gas} accumulation steps; use a multiple of {world_size * gas}"
        )
    return BatchPlan(cfg.train.batch_size // (world_size * gas), gas, world_size)


def resolve_precision(cfg: PretrainConfig) -> Literal["fp32", "bf16"]:
    """``auto`` → bf16 on GPUs that support it, else fp32.

    Raises:
        ConfigError: bf16 asked for without a GPU.
    """
    cuda = torch.cuda.is_available()
    if cfg.train.precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.train.precision == "bf16" and not cuda:
        raise ConfigError("train.precision: bf16 needs a GPU; use auto or fp32 on the CPU")
    return cfg.train.precision


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (or the user's ``train.deepspeed_config`` with our batch keys).

    Args:
        cfg: The validated run config.
        world_size: Number of ranks.

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ConfigError: Batch does not divide, LAMB or bf16 without a GPU, a user JSON whose batch keys disagree.
    """
    plan = batch_plan(cfg, world_size)
    t = cfg.train
    batch = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.grad_accum,
    }
    if t.deepspeed_config is not None:
        try:
            user = json.loads(Path(t.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{t.deepspeed_config}: not valid JSON (line {e.lineno})") from None
        for key, value in batch.items():
            if key in user and user[key] != value:
                raise ConfigError(
                    f"{t.deepspeed_config}: {key}={user[key]} disagrees with the run config ({value})"
                )
        return {**user, **batch}
    if t.optimizer == "LAMB" and not torch.cuda.is_available():
        raise ConfigError("train.optimizer: LAMB uses DeepSpeed's FusedLamb, which needs a GPU; use AdamW on the CPU")
    params: dict[str, Any] = {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay}
    if t.optimizer == "AdamW":
        # torch's AdamW: no JIT-compiled DeepSpeed op, on the CPU or the GPU
        optimizer = {"type": "AdamW", "params": {**params, "torch_adam": True, "adam_w_mode": True}}
    else:
        optimizer = {"type": "Lamb", "params": params}
    return {
        **batch,
        "optimizer": optimizer,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": max(1, t.warmup_steps),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": resolve_precision(cfg) == "bf16"},
        "steps_per_print": 10**9,  # progress and metrics are ours (rank 0 only)
        "wall_clock_breakdown": False,
    }
