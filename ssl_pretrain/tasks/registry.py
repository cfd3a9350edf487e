"""The pretext-task registry: what a task provides (:class:`PretextTask`) and the one table of tasks.

Adding a pretext task is one module in ``ssl_pretrain/tasks/`` (a config dataclass and a task
class that follows :class:`PretextTask`) plus one line in :data:`TASKS`. Everything else is
derived from the table:

* the trainer's ``build_task`` builds ``TASKS[cfg.task].task(...)``;
* the pretraining config (:class:`~ssl_pretrain.engine.config.PretrainConfig`) takes its ``task``
  choices and one ``<name>:`` section per task (of the task's config class) from it;
* the exports accept the task names of the table (:mod:`ssl_pretrain.export`).

A task defined outside the package (a plugin, a test) calls :func:`register_task` before
:mod:`ssl_pretrain.engine.config` is imported, since the config tree is built from the table then.

Example:
    >>> sorted(TASKS)
    ['contrastive', 'contrastive3d', 'mim', 'regression']
    >>> TASKS["regression"].config.__name__
    'RegressionConfig'
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ssl_pretrain.tasks.contrastive import ContrastiveConfig, ContrastiveTask
from ssl_pretrain.tasks.contrastive3d import Contrastive3DConfig, Contrastive3DTask
from ssl_pretrain.tasks.mim import MIMConfig, MIMTask
from ssl_pretrain.tasks.regression import RegressionConfig, RegressionTask

__all__ = ["PretextTask", "TaskSpec", "TASKS", "register_task"]


@runtime_checkable
class PretextTask(Protocol):
    """What the trainer needs from a pretext task (an ``nn.Module``; DeepSpeed wraps it as is).

    The constructor is ``Task(model_cfg: UNetConfig, cfg: <its config class>, *, seed: int,
    distributed: bool, device: torch.device)``: ``seed`` seeds the task's own generator (one per
    rank), ``distributed`` says that ``torch.distributed`` is initialised with more than one rank
    (for losses that gather across ranks), ``device`` is where batches and that generator live.
    Its parameters must be initialised from the global torch RNG only (every rank builds the
    same weights).

    Attributes:
        encoder: The UNet encoder (always exported).
        decoder: The UNet decoder, or ``None`` when the task does not train it.
        needs_position: Whether batches must carry ``position`` (the slice's relative position in
            its volume, from ``meta.json``); the trainer checks the shards for it before training.
    """

    encoder: nn.Module
    decoder: nn.Module | None

    @property
    def needs_position(self) -> bool: ...  # noqa: D102

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scalar loss, detached scalar metrics)`` of one micro batch (``forward`` returns the same)."""
        ...

    def figure(self, batch: dict[str, Any]) -> Any:
        """A matplotlib Figure of a few samples, drawn without touching the training randomness."""
        ...

    def export_parts(self) -> tuple[str, ...]:
        """The UNet parts the task trains and the export carries: ``("encoder",)`` or ``("encoder", "decoder")``."""
        ...

    def rng_state(self) -> torch.Tensor:
        """State of the task's own generator (saved with every checkpoint)."""
        ...

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state` (on resume)."""
        ...


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table.

    Args:
        config: The task's config dataclass (``option()`` fields, ``validate()``; optionally
            ``check_model(model_cfg)`` for checks that need the UNet architecture).
        task: The task class (see :class:`PretextTask` for its constructor).
        help: One line for ``--help``.
        dims: The ``model.spatial_dims`` the task runs on.
    """

    config: type
    task: Callable[..., PretextTask]
    help: str
    dims: tuple[int, ...] = (2,)


# the table: one line per pretext task
TASKS: dict[str, TaskSpec] = {
    "contrastive": TaskSpec(ContrastiveConfig, ContrastiveTask, "contrastive task options (SimCLR NT-Xent)"),
    "regression": TaskSpec(RegressionConfig, RegressionTask, "regression task options (restoration; 2D and 3D)",
                           dims=(2, 3)),
    "mim": TaskSpec(MIMConfig, MIMTask, "masked image modelling options (3D, nnssl's pretext)", dims=(3,)),
    "contrastive3d": TaskSpec(Contrastive3DConfig, Contrastive3DTask,
                              "3D contrastive options (global NT-Xent + dense voxel loss)", dims=(3,)),
}


def register_task(name: str, config: type, task: Callable[..., PretextTask], help: str = "") -> None:
    """Add a task defined outside this package to :data:`TASKS`.

    Args:
        name: The ``task`` value and the name of its config section (a Python identifier).
        config: Its config dataclass.
        task: Its task class.
        help: One line for ``--help``.

    Raises:
        ValueError: A bad or taken name, a config that is not a dataclass, or a call after the
            pretraining config tree was built.
    """
    if not name.isidentifier():
        raise ValueError(f"task name {name!r}: must be a Python identifier (it names a config section)")
    if name in TASKS:
        raise ValueError(f"task name {name!r}: already registered ({TASKS[name].task})")
    if not is_dataclass(config):
        raise ValueError(f"task {name!r}: config must be a dataclass, got {config!r}")
    if "ssl_pretrain.engine.config" in sys.modules:
        raise ValueError(
            f"task {name!r}: register it before importing ssl_pretrain.engine.config (its config tree is "
            f"built from the task table at import)"
        )
    TASKS[name] = TaskSpec(config, task, help or f"{name} task options")

