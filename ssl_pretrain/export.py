"""The exported-model file: what pretraining hands to finetuning and finetuning hands to prediction.

``export/model.pt`` (pretraining) and ``<out_dir>/model.pt`` (finetuning) are one format, a dict
loadable with ``torch.load(path, weights_only=True)``:

=================  ==========================================================================
key                value
=================  ==========================================================================
format_version     :data:`EXPORT_FORMAT_VERSION`
task               what produced the weights, a plain string: a pretext task's name
                   (``"contrastive"``, ``"regression"``, a task registered outside the package),
                   ``"random"`` or ``"segmentation"``; only pretraining checks it against the task
                   table, so loading an export never needs the pretext tasks
model_config       :meth:`UNetConfig.to_dict`; a 3D model's holds ``network_class_name`` and
                   ``arch`` (nnU-Net's ``arch_kwargs``), from which :func:`network_state_dict`'s
                   keys load into ``dynamic_network_architectures``' network as they are
encoder            encoder state dict (3D: ``net.encoder.state_dict()``, the library's keys)
decoder            decoder state dict, or ``None`` when the task did not train it
head               segmentation head state dict, or ``None``
num_classes        classes of the head (background included), or ``None``
preprocessing      ``PreprocessParams.to_dict()``: how the data the model saw was prepared
info               free-form JSON-able facts: pretraining budget (steps, samples_seen,
                   wall_time_s, final_loss, world_size), label names, metrics
=================  ==========================================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ssl_pretrain.config import ConfigError
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.fileio import atomic_path
from ssl_pretrain.models.dna import Segmenter3D
from ssl_pretrain.models.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ExportError",
    "LoadReport",
    "save_export",
    "load_export",
    "checked_export",
    "build_unet",
    "network_state_dict",
    "choose_preprocessing",
]

EXPORT_FORMAT_VERSION = 1
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
    if not isinstance(task, str) or not task:
        raise ValueError(f"task: a non-empty name of what produced the weights, got {task!r}")
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
    return checked_export(data, p)


def checked_export(data: Any, p: Path) -> dict[str, Any]:
    """The checks of :func:`load_export` on a loaded file's content (``p`` names it in messages).

    Raises:
        ExportError: Not an export, wrong format version, missing keys, bad task or model config.
    """
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
    if not isinstance(data["task"], str) or not data["task"]:
        raise ExportError(f"{p}: task must be a non-empty string, got {data['task']!r}")
    try:
        data["model_config"] = UNetConfig.from_dict(data["model_config"])
    except ConfigError as e:
        raise ExportError(f"{p}: {e}") from None
    return data


def network_state_dict(export: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A 3D export's weights under the network's own keys (``encoder.…``, ``decoder.…``): what
    ``net.load_state_dict`` of the ``dynamic_network_architectures`` network built from the export's
    ``network_class_name`` and ``arch`` takes (with ``strict=False`` when the export has no decoder)."""
    parts = {"encoder": export["encoder"], "decoder": export["decoder"]}
    return {f"{part}.{k}": v for part, state in parts.items() if state is not None for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# export -> model, and whose preprocessing a run uses
# ---------------------------------------------------------------------------------------------

_PARTS = ("encoder", "decoder", "head")


@dataclass
class LoadReport:
    """Which tensors of a UNet came from an export.

    Args:
        source: The export file (or ``"random"``).
        loaded: ``part.key`` names copied from the export.
        missing: Model tensors the export did not provide (trained from scratch).
        unexpected: Export tensors the model has no place for.
        reshaped: Loaded tensors adapted to the model's shape: the input projection of an nnU-Net / nnssl
            checkpoint when the data has other channels (see :func:`adapt_input_projection`).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``init_load_report.json``)."""
        return asdict(self)

    def counts(self) -> dict[str, Any]:
        """``{"source": …, "loaded": n, "missing": n, "unexpected": n, "reshaped": n}``."""
        return {k: len(v) if isinstance(v, list) else v for k, v in asdict(self).items()}


def _load_part(
    module: torch.nn.Module, state: dict[str, torch.Tensor] | None, part: str, source: str, report: LoadReport
) -> None:
    """Load ``state`` into ``module`` non-strictly into ``report``; a shape mismatch is one line."""
    own = module.state_dict()
    if state is None:
        report.missing += [f"{part}.{k}" for k in own]
        return
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ExportError(
                f"{source}: {part}.{k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)} "
                "(export widths / channels do not match its weights)"
            )
    res = module.load_state_dict(state, strict=False)
    report.loaded += [f"{part}.{k}" for k in state if k in own]
    report.missing += [f"{part}.{k}" for k in res.missing_keys]
    report.unexpected += [f"{part}.{k}" for k in res.unexpected_keys]


def build_unet(
    export: dict[str, Any] | None,
    num_classes: int,
    *,
    source: str,
    strict: bool,
    model_config: UNetConfig | None = None,
    in_channels: int | None = None,
    parts: Sequence[Literal["encoder", "decoder", "head"]] = _PARTS,
    deep_supervision: bool = False,
) -> tuple[torch.nn.Module, LoadReport]:
    """Build a segmentation UNet from an export (or at random) and report what was loaded.

    The one place that turns an export into a model, for finetuning (``strict=False``: a
    pretraining export brings an encoder, maybe a decoder, no head; what it lacks starts from
    scratch) and for prediction (``strict=True``: every part must be there and match exactly).

    Args:
        export: A :func:`load_export` dict, or ``None`` for a random init.
        num_classes: Output classes of the head (background included).
        source: The export's file name, used in messages and the report.
        strict: Refuse an export that lacks a part or whose keys differ from the model's.
        model_config: Architecture of a random init (ignored when ``export`` is given).
        in_channels: When given, the export's input channels must equal it (the data's channels).
        parts: The parts copied from the export; the others start from scratch (finetuning's
            transfer choice). A head is only copied when its ``num_classes`` matches.
        deep_supervision: 3D models: train every decoder stage's output (nnU-Net's deep supervision).

    Returns:
        ``(model, report)``: a 2D :class:`~ssl_pretrain.models.unet.UNet`, or for a 3D model config a
        :class:`~ssl_pretrain.models.dna.Segmenter3D` whose head is the library decoder's ``seg_layers``
        (a 3D export keeps them in its ``decoder``; they load as the head: only with ``head`` in
        ``parts`` and a matching ``num_classes``).

    Raises:
        ExportError: One line naming ``source``: channel mismatch, tensor shape mismatch, or (strict)
            a missing part or differing keys.
    """
    mcfg = export["model_config"] if export is not None else model_config
    if mcfg is None:
        raise ValueError("build_unet: a random init needs model_config")
    report = LoadReport(source)
    if export is not None and in_channels is not None and mcfg.in_channels != in_channels:
        if not export["info"].get("in_proj"):
            raise ExportError(
                f"{source}: export has in_channels={mcfg.in_channels}, the data has {in_channels} channel(s)"
            )
        export = adapt_input_projection(export, in_channels)
        mcfg, report.reshaped = export["model_config"], [f"encoder.{k}" for k in export["info"]["in_proj"]]
    model: torch.nn.Module = (Segmenter3D(mcfg, num_classes, deep_supervision) if mcfg.spatial_dims == 3
                              else UNet(mcfg, num_classes))
    if export is None:
        return model, report
    head_in_decoder = mcfg.spatial_dims == 3
    if strict and (not export["num_classes"] or (export["head"] is None and not head_in_decoder)):
        raise ExportError(f"{source}: export of task {export['task']!r} has no segmentation head; finetune it first")
    with_head = "head" in parts and export["num_classes"] == num_classes
    for part in ("encoder", "decoder") if head_in_decoder else _PARTS:
        state = export[part] if part in parts else None
        if part == "head" and not with_head:
            state = None
        if head_in_decoder and part == "decoder" and state is not None and not with_head:
            state = {k: v for k, v in state.items() if not k.startswith("seg_layers.")}  # a new head
        _load_part(getattr(model, part), state, part, source, report)
    if strict and (report.missing or report.unexpected):
        raise ExportError(
            f"{source}: export does not match its model config "
            f"(missing {report.missing[:3]}, unexpected {report.unexpected[:3]})"
        )
    log.info(
        "%s: loaded %d tensors, missing %d (trained from scratch), unexpected %d",
        source, len(report.loaded), len(report.missing), len(report.unexpected),
    )
    if report.unexpected:
        log.warning("%s: unexpected keys %s", source, report.unexpected[:8])
    return model, report


def adapt_input_projection(export: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """A copy of ``export`` whose input projection (the encoder weights ``info["in_proj"]`` names, set for nnU-Net
    and nnssl checkpoints) takes ``in_channels`` channels: each new channel gets the sum of the old channels'
    kernels divided by ``in_channels``, so ``in_channels`` identical channels give the old activations."""
    encoder = dict(export["encoder"])
    for k in export["info"]["in_proj"]:
        w = encoder[k]
        encoder[k] = (w.sum(dim=1, keepdim=True) / in_channels).repeat(1, in_channels, *[1] * (w.dim() - 2))
    return {**export, "encoder": encoder, "model_config": replace(export["model_config"], in_channels=in_channels)}


def choose_preprocessing(
    configured: PreprocessParams, exports: Sequence[tuple[str, dict[str, Any]]], *, key: str = "data.preprocess"
) -> PreprocessParams:
    """Whose preprocessing a finetuning run (and the models it writes) uses: the rule, in one place.

    A pretrained export was trained on data prepared its own way, so its parameters win over the
    config's. A random init with pretrained inits beside it (a sweep) takes the first pretrained
    init's, so every init of a comparison sees exactly the same data. Only without any export does
    the configured preprocessing apply. A warning says when the configured value is overridden.
    The field of view is always ``"pad"``: finetuning, evaluation and prediction keep the whole
    slice (``size`` is the patch size); only pretraining shards crop.

    Args:
        configured: The config's preprocessing (``data.preprocess``).
        exports: ``(source, export)`` of the pretrained inits that set the data, in order.
        key: The config key named in the log line.

    Returns:
        The parameters to prepare the data with.

    Raises:
        ExportError: The export's preprocessing record is unusable.
    """
    configured = replace(configured, field_of_view="pad")
    if not exports:
        return configured
    source, export = exports[0]
    try:
        params = replace(PreprocessParams.from_dict(export["preprocessing"]), field_of_view="pad")
    except ValueError as e:
        raise ExportError(f"{source}: {e}") from None
    if params.volumetric != configured.volumetric:
        dims = {True: "3D (a Z Y X spacing)", False: "2D (slices, an H W spacing)"}
        raise ExportError(f"{source}: a {dims[params.volumetric]} export cannot initialise a "
                          f"{dims[configured.volumetric]} model ({key}.spacing: {list(configured.spacing)}); use an "
                          f"export of the same dimensionality, or a config of the export's (finetune3d / sweep3d for "
                          f"3D exports)")
    if params != configured:
        log.warning("%s ignored: the preprocessing of %s is used (%s)", key, source, params.to_dict())
    return params
