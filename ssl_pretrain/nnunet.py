"""mri-ssl in the nnU-Net ecosystem: nnU-Net v2 and nnssl checkpoints in as inits, exports out to nnU-Net.

**In** (:func:`load_init_file`): an nnU-Net v2 ``checkpoint_final.pth`` (its plans from the ``plans.json`` of
the training folder, else from the checkpoint's ``init_args``) or an nnssl checkpoint (network weights plus
``nnssl_adaptation_plan``, the adaptation plan nnssl's finetuning uses) becomes an export dict as
:func:`~ssl_pretrain.export.load_export` returns it: the network's class and ``arch_kwargs``, its weights
split into encoder and decoder (nnssl: the encoder, stem included, which is what its adaptation plan hands
on), no head (the segmentation head is always new), and preprocessing from the plan (spacing, patch size).
Both files are pickles: they are read with ``torch.load(weights_only=True)``, and a file holding more than
tensors and plain values is refused unless ``trust`` is given (loading it can run code from the file).

**Out** (:func:`plans_for_export`, :func:`nnunet_checkpoint`): nnU-Net's planner plans the dataset as
usual; the configuration's ``architecture`` becomes the export's (the patch size rounded up to what its
strides divide; everything else — spacing, normalisation, batch size, preprocessed data — stays nnU-Net's),
and the export's weights are written under the network's own keys in a file that
``nnUNetv2_train … -pretrained_weights FILE`` loads with nnU-Net's ``load_pretrained_weights``. An
encoder-only export gets the decoder nnU-Net initialises itself (nnU-Net's loader needs every key).

Only 3D models cross: mri-ssl's 2D model is its own UNet, which nnU-Net cannot build (one line says so).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.export import EXPORT_FORMAT_VERSION, ExportError, checked_export
from ssl_pretrain.models.dna import NETWORKS, REQUIRES_IMPORT, full_name, patch_divisor
from ssl_pretrain.models.unet import UNetConfig

log = logging.getLogger(__name__)

__all__ = ["checkpoint_to_export", "is_foreign", "load_init_file", "nnunet_checkpoint", "plans_for_export",
           "read_checkpoint"]

_TRUST = "pass --trust-checkpoint (trust_checkpoint=true) only for a file from a source you trust"


def read_checkpoint(path: str | Path, *, trust: bool = False) -> Any:
    """``torch.load`` a checkpoint safely: ``weights_only=True``; with ``trust`` also a full pickle.

    Raises:
        ExportError: an unreadable file, or (without ``trust``) one that holds Python objects beyond tensors.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle of objects: a damaged or foreign file
            raise ExportError(f"{path}: not a loadable model export or checkpoint (UnpicklingError)") from None
        if not trust:
            raise ExportError(f"{path}: holds Python objects beyond tensors ({found[1]}); loading it can run code "
                              f"from the file: {_TRUST}") from None
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise ExportError(f"{path}: not a loadable model export or checkpoint ({type(exc).__name__})") from None
    log.warning("%s: loaded as a full pickle (trust_checkpoint): it could run code from the file", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ExportError(f"{path}: not a loadable model export or checkpoint ({type(exc).__name__}: {exc})") from None


def is_foreign(ckpt: Any) -> bool:
    """Whether a loaded file is an nnU-Net / nnssl checkpoint (``network_weights``), not an mri-ssl export."""
    return isinstance(ckpt, dict) and "network_weights" in ckpt and "format_version" not in ckpt


def load_init_file(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """An init file as an export dict, the file read once: an mri-ssl export (checked as
    :func:`~ssl_pretrain.export.load_export` checks it), or an nnU-Net v2 / nnssl checkpoint turned into one.

    Raises:
        ExportError: one line naming the file: unreadable or untrusted, neither an export nor such a
            checkpoint, a 2D or non-UNet architecture, or plans that cannot be found.
    """
    path = Path(path)
    data = read_checkpoint(path, trust=trust)
    return checkpoint_to_export(path, data) if is_foreign(data) else checked_export(data, path)


def checkpoint_to_export(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """A loaded nnU-Net v2 or nnssl checkpoint (``path`` names it) as an mri-ssl export dict (module docstring)."""
    weights = {_plain_key(k): v for k, v in ckpt["network_weights"].items()}
    if "nnssl_adaptation_plan" in ckpt:
        task, network, arch, channels, spacing, patch = _from_nnssl(path, ckpt["nnssl_adaptation_plan"])
        encoder = _under(weights, "encoder.")  # stem and stages: what nnssl's adaptation plan hands on
        decoder = None
    else:
        task, network, arch, channels, spacing, patch = _from_nnunet(path, ckpt)
        encoder = _under(weights, "encoder.")
        decoder = {k: v for k, v in _under(weights, "decoder.").items() if not k.startswith("seg_layers.")}
    if not encoder:
        raise ExportError(f"{path}: no encoder.* weights; the network is not a dynamic_network_architectures UNet")
    try:
        mcfg = UNetConfig.from_dict({"in_channels": channels, "spatial_dims": 3, "network_class_name": network,
                                     "arch": arch})
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from None
    params = PreprocessParams(spacing=tuple(float(s) for s in spacing), norm="zscore")
    return {"format_version": EXPORT_FORMAT_VERSION, "task": task, "model_config": mcfg, "encoder": encoder,
            "decoder": decoder, "head": None, "num_classes": None, "preprocessing": params.to_dict(),
            "info": {"source": str(path), "patch_size": [int(p) for p in patch], "in_proj": _in_proj(encoder)}}


def _in_proj(encoder: dict[str, torch.Tensor]) -> list[str]:
    """The encoder keys of the input projection: the first convolution's weight and its aliases (the library
    registers each conv twice, ``convs.0.conv`` and ``convs.0.all_modules.0``)."""
    first = next(v for v in encoder.values() if v.dim() == 5)
    return [k for k, v in encoder.items() if v.shape == first.shape and torch.equal(v, first)]


def _plain_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        key = key.removeprefix(prefix)
    return key


def _under(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _short(path: Path, network: str) -> str:
    names = {v: k for k, v in NETWORKS.items()}
    short = names.get(network, network.rsplit(".", 1)[-1])
    if short not in NETWORKS:
        raise ExportError(f"{path}: architecture {network!r}: mri-ssl loads the dynamic_network_architectures "
                          f"UNets {', '.join(NETWORKS)}")
    return short


def _three_d(path: Path, arch: dict[str, Any]) -> None:
    if not str(arch.get("conv_op", "")).endswith("Conv3d"):
        raise ExportError(f"{path}: a {arch.get('conv_op')} network; mri-ssl takes 3D nnU-Net / nnssl networks only "
                          "(its 2D model is its own UNet): use a 3d_fullres checkpoint")


def _original_order(spacing: list[float], transpose_forward: list[int]) -> list[float]:
    """A plans spacing (axes after nnU-Net's ``transpose_forward``) in the image's own axis order."""
    out = [0.0] * len(spacing)
    for i, axis in enumerate(transpose_forward):
        out[axis] = float(spacing[i])
    return out


def _from_nnunet(path: Path, ckpt: dict[str, Any]) -> tuple[str, str, dict, int, list[float], list[int]]:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    init_args = ckpt.get("init_args") or {}
    folder = next((d for d in (path.parent.parent, path.parent) if (d / "plans.json").is_file()), None)
    plans = json.loads((folder / "plans.json").read_text()) if folder else init_args.get("plans")
    dataset_json = json.loads((folder / "dataset.json").read_text()) if folder and (folder / "dataset.json").is_file() \
        else init_args.get("dataset_json")
    configuration = init_args.get("configuration") or (folder.name.rsplit("__", 1)[-1] if folder else None)
    if not plans or not dataset_json or not configuration:
        raise ExportError(f"{path}: an nnU-Net checkpoint needs its training folder's plans.json and dataset.json "
                          "(or init_args holding them)")
    plans = copy.deepcopy(plans)
    plans.pop("continue_training", None)
    manager = PlansManager(plans)
    conf = manager.get_configuration(configuration)
    arch = dict(conf.network_arch_init_kwargs)
    _three_d(path, arch)
    channels = determine_num_input_channels(manager, conf, dataset_json)
    spacing = _original_order(conf.spacing, manager.transpose_forward)
    patch = _original_order(conf.patch_size, manager.transpose_forward)
    return "nnunet", _short(path, conf.network_arch_class_name), arch, channels, spacing, [int(p) for p in patch]


def _from_nnssl(path: Path, plan: dict[str, Any]) -> tuple[str, str, dict, int, list[float], list[int]]:
    arch_plans = plan.get("architecture_plans") or {}
    arch = arch_plans.get("arch_kwargs")
    if not arch:
        raise ExportError(f"{path}: nnssl architecture {arch_plans.get('arch_class_name')!r} has no arch_kwargs; "
                          f"mri-ssl loads the dynamic_network_architectures UNets {', '.join(NETWORKS)}")
    network = _short(path, str(arch_plans.get("arch_class_name")))
    arch = dict(arch)
    if network == "PlainConvUNet" and "n_blocks_per_stage" in arch:  # nnssl's one name for both classes
        arch["n_conv_per_stage"] = arch.pop("n_blocks_per_stage")
    _three_d(path, arch)
    if plan.get("key_to_encoder", "encoder.stages").split(".")[0] != "encoder":
        raise ExportError(f"{path}: nnssl key_to_encoder {plan['key_to_encoder']!r} is not the UNet's encoder")
    pretrain = plan.get("pretrain_plan") or {}
    configs = pretrain.get("configurations") or {}
    conf = next(iter(configs.values()), {}) if isinstance(configs, dict) else {}
    spacing = conf.get("spacing") or [1.0, 1.0, 1.0]
    spacing = _original_order(spacing, pretrain.get("transpose_forward") or [0, 1, 2])
    patch = plan.get("recommended_downstream_patchsize") or conf.get("patch_size") or [64, 64, 64]
    return "nnssl", network, arch, int(plan.get("pretrain_num_input_channels", 1)), spacing, [int(p) for p in patch]


# ---------------------------------------------------------------------------------------------
# out: an export as nnU-Net plans + pretrained weights
# ---------------------------------------------------------------------------------------------

def _arch_of(export: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    mcfg = export["model_config"]
    if mcfg.spatial_dims != 3:
        raise ExportError(f"{source}: a 2D export is mri-ssl's own UNet, which nnU-Net cannot build; export a 3D "
                          "model (pretrained with a dynamic_network_architectures arch, e.g. mae3d.yaml)")
    return full_name(mcfg.network_class_name), dict(mcfg.arch)


def plans_for_export(plans: dict[str, Any], export: dict[str, Any], configuration: str, plans_name: str,
                     *, source: str = "export") -> dict[str, Any]:
    """nnU-Net's plans with the export's architecture in ``configuration`` (a new plans identifier).

    The patch size is rounded up, per axis, to a multiple of the export's total stride; the data
    identifier, spacing, normalisation and batch size stay nnU-Net's (no new preprocessing is needed).

    Raises:
        ExportError: a 2D export, or a configuration the plans do not have.
    """
    network, arch = _arch_of(export, source)
    if configuration not in plans.get("configurations", {}):
        raise ExportError(f"--configuration: {configuration!r} is not in the plans (they have "
                          f"{sorted(plans.get('configurations', {}))})")
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    conf = out["configurations"][configuration]
    conf["architecture"] = {"network_class_name": network, "arch_kwargs": arch,
                            "_kw_requires_import": [k for k in REQUIRES_IMPORT if isinstance(arch.get(k), str)]}
    div = patch_divisor(arch)
    patch = [int(math.ceil(p / d) * d) for p, d in zip(conf["patch_size"], div, strict=True)]
    if patch != list(conf["patch_size"]):
        log.info("patch size %s -> %s (multiples of the export's strides %s)", conf["patch_size"], patch, list(div))
    conf["patch_size"] = patch
    return out


def nnunet_checkpoint(export: dict[str, Any], plans: dict[str, Any], configuration: str, *, input_channels: int,
                      source: str = "export") -> dict[str, Any]:
    """A file's content that ``nnUNetv2_train … -pretrained_weights FILE`` loads into the network of ``plans``.

    The network is built by nnU-Net's ``get_network_from_plans`` (its own initialisation); the export's
    encoder (and decoder, when it has one; never the segmentation layers) replace its weights key for key.

    Returns:
        ``{"network_weights": state dict, "mri_ssl": {"task", "loaded", "from_nnunet_init"}}``.

    Raises:
        ExportError: input channels that differ, or an export key the network lacks or shapes differently.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    mcfg = export["model_config"]
    _arch_of(export, source)
    if mcfg.in_channels != input_channels:
        raise ExportError(f"{source}: export has in_channels={mcfg.in_channels}, the nnU-Net dataset has "
                          f"{input_channels} channel(s)")
    conf = PlansManager(copy.deepcopy(plans)).get_configuration(configuration)
    net = get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                 conf.network_arch_init_kwargs_req_import, input_channels, 2, allow_init=True,
                                 deep_supervision=True)
    state = net.state_dict()
    theirs = {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in (export[part] or {}).items()
              if not k.startswith("seg_layers.")}
    for k, v in theirs.items():
        if k not in state or state[k].shape != v.shape:
            found = "missing" if k not in state else f"shape {tuple(state[k].shape)}"
            raise ExportError(f"{source}: {k} {tuple(v.shape)} does not fit nnU-Net's network ({found}): the plans' "
                              "architecture is not the export's")
    state.update(theirs)
    fresh = sorted(k for k in state if k not in theirs)
    return {"network_weights": state,
            "mri_ssl": {"task": export["task"], "loaded": len(theirs), "from_nnunet_init": len(fresh)}}
