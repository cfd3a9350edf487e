"""The exported-model file: what pretraining hands to finetuning and finetuning hands to prediction.

``export/model.pt`` (pretraining) and ``<out_dir>/model.pt`` (finetuning) are one format, a dict
loadable with ``torch.load(path, weights_only=True)``:

=================  ==========================================================================
key                value
=================  ==========================================================================
format_version     :data:`EXPORT_FORMAT_VERSION`
task               a pretext task of the task table (``"contrastive"``, ``"regression"``, ...),
                   ``"random"`` or ``"segmentation"``
model_config       :meth:`UNetConfig.to_dict`
encoder            encoder state dict
decoder            decoder state dict, or ``None`` when the task did not train it
head               segmentation head state dict, or ``None``
num_classes        classes of the head (background included), or ``None``
preprocessing      ``PreprocessParams.to_dict()``: how the data the model saw was prepared
info               free-form JSON-able facts: pretraining budget (steps, samples_seen,
                   wall_time_s, final_loss, world_size), label names, metrics
=================  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ssl_pretrain.config import ConfigError
from ssl_pretrain.fileio import atomic_path
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.registry import TASKS

__all__ = ["EXPORT_FORMAT_VERSION", "ExportError", "save_export", "load_export"]

EXPORT_FORMAT_VERSION = 1
_OTHER_TASKS = ("random", "segmentation")  # besides the pretext tasks of the table: finetuning's


def _tasks() -> tuple[str, ...]:
    """Task names an export may carry: the pretext tasks of the task table, then finetuning's."""
    return (*TASKS, *_OTHER_TASKS)


_REQUIRED = ("format_version", "task", "model_config", "encoder", "decoder", "head", "num_classes",
             "preprocessing", "info")


class ExportError(ValueError):
    """An export file that cannot be used; the message names the file and the problem."""


def _cpu_state(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if state is None:
        return None
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def save_export(
    path: str | os.PathLike[str],
    *,
    task: str,
    model_config: UNetConfig,
    encoder_state: dict[str, torch.Tensor],
    decoder_state: dict[str, torch.Tensor] | None,
    preprocessing: dict[str, Any],
    head_state: dict[str, torch.Tensor] | None = None,
    num_classes: int | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write an export atomically (temporary name in the same directory, then rename).

    Args:
        path: Destination, e.g. ``runs/c1/export/model.pt``.
        task: What produced the weights (see the module docstring).
        model_config: The UNet architecture.
        encoder_state: ``UNet.encoder.state_dict()``.
        decoder_state: ``UNet.decoder.state_dict()`` or ``None``.
        preprocessing: ``PreprocessParams.to_dict()``.
        head_state: Segmentation head weights (finetuned models).
        num_classes: Output classes of ``head_state``.
        info: JSON-able facts about the run.

    Returns:
        The written path.
    """
    if task not in _tasks():
        raise ValueError(f"task: must be one of {', '.join(_tasks())}; got {task!r}")
    payload = {
        "format_version": EXPORT_FORMAT_VERSION,
        "task": task,
        "model_config": model_config.to_dict(),
        "encoder": _cpu_state(encoder_state),
        "decoder": _cpu_state(decoder_state),
        "head": _cpu_state(head_state),
        "num_classes": num_classes,
        "preprocessing": dict(preprocessing),
        "info": dict(info or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    p = Path(path)
    return p


def load_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check an export written by :func:`save_export`.

    Returns:
        The export dict, with ``model_config`` turned into a :class:`UNetConfig`.

    Raises:
        ExportError: Missing or unreadable file, not an export, wrong format version, bad model config.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: export file not found")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or truncated files
        raise ExportError(f"{p}: not a loadable model export ({type(e).__name__})") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise ExportError(f"{p}: not an mri-ssl model export (no format_version key)")
    if data["format_version"] != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{p}: export format version {data['format_version']!r}, this mri-ssl reads version "
            f"{EXPORT_FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ExportError(f"{p}: export lacks keys {', '.join(missing)}")
    if data["task"] not in _tasks():
        raise ExportError(f"{p}: unknown task {data['task']!r}; expected one of {', '.join(_tasks())}")
    try:
        data["model_config"] = UNetConfig.from_dict(data["model_config"])
    except ConfigError as e:
        raise ExportError(f"{p}: {e}") from None
    return data
