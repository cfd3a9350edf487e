"""3D networks from ``dynamic_network_architectures``, the library nnU-Net and nnssl build theirs with.

A network is named and configured exactly as an nnU-Net v2 plans file does it
(``plans["configurations"][c]["architecture"]``): ``network_class_name`` and ``arch_kwargs``,
whose ``conv_op``, ``norm_op``, ``dropout_op`` and ``nonlin`` are dotted names imported by
:func:`pydoc.locate` (nnU-Net's ``_kw_requires_import``). The network is built as nnU-Net builds it
(``input_channels``, ``num_classes``, ``deep_supervision`` added to the kwargs; the class's own
``initialize`` applied), so its ``state_dict`` keys are the library's: ``encoder.stages…``,
``decoder.stages…``, ``decoder.seg_layers…`` — what nnU-Net's ``load_pretrained_weights`` and
nnssl's checkpoints use.

Example:
    >>> net = build_network("PlainConvUNet", TINY_ARCH, input_channels=1, num_classes=2)
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 2, 16, 16, 16])
"""

from __future__ import annotations

import pydoc
from typing import Any

import torch
from torch import nn

from ssl_pretrain.config import FieldError

__all__ = ["NETWORKS", "REQUIRES_IMPORT", "TINY_ARCH", "Segmenter3D", "build_network", "check_arch",
           "deep_supervision_weights", "patch_divisor", "without_deep_supervision"]

# the classes an ``arch`` may name (short or full), by their full dotted name
NETWORKS = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")  # nnU-Net's "_kw_requires_import"

# a three-stage PlainConvUNet with nnU-Net's defaults (instance norm, leaky ReLU), for examples and tests
TINY_ARCH: dict[str, Any] = {
    "n_stages": 3,
    "features_per_stage": [8, 16, 32],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def full_name(network_class_name: str) -> str:
    """The full dotted class name of a short (``PlainConvUNet``) or full one.

    Raises:
        FieldError: not one of :data:`NETWORKS`.
    """
    if network_class_name in NETWORKS:
        return NETWORKS[network_class_name]
    if network_class_name in NETWORKS.values():
        return network_class_name
    raise FieldError(f"network_class_name: {network_class_name!r} must be one of {', '.join(NETWORKS)} "
                     f"(or its dotted name in dynamic_network_architectures)")


def _resolved(arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(arch_kwargs)
    for key in REQUIRES_IMPORT:
        value = kwargs.get(key)
        if isinstance(value, str):
            kwargs[key] = pydoc.locate(value)
            if kwargs[key] is None:
                raise FieldError(f"arch.{key}: {value!r} cannot be imported (expected a dotted name such as "
                                 f"torch.nn.modules.conv.Conv3d)")
    return kwargs


def build_network(network_class_name: str, arch_kwargs: dict[str, Any], *, input_channels: int, num_classes: int,
                  deep_supervision: bool = False, initialize: bool = True) -> nn.Module:
    """Build the network as nnU-Net's ``get_network_from_plans`` does.

    Raises:
        FieldError: unknown class, a dotted name that does not import, or kwargs the class rejects
            (its message, one line).
    """
    cls = pydoc.locate(full_name(network_class_name))
    if cls is None:
        raise FieldError(f"network_class_name: {network_class_name!r}: dynamic_network_architectures is not installed")
    kwargs = _resolved(arch_kwargs)
    for key in ("input_channels", "num_classes", "deep_supervision"):
        if key in kwargs:
            raise FieldError(f"arch.{key}: set by mri-ssl (from the data and the task), not by arch")
    try:
        net = cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs)
    except (TypeError, AssertionError, ValueError, IndexError) as exc:
        line = " ".join(str(exc).split())
        raise FieldError(f"arch: {network_class_name} rejects these arch_kwargs: {line}") from None
    if initialize and hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def without_deep_supervision(net: nn.Module) -> nn.Module:
    """Freeze the decoder's lower-resolution output layers: the library builds one per stage, but without
    deep supervision only the last is used, and parameters without gradients stall DDP (and cost
    optimizer state). They stay in the state dict, so the keys remain the library's."""
    for layer in list(net.decoder.seg_layers)[:-1]:
        layer.requires_grad_(False)
    return net


def check_arch(network_class_name: str, arch_kwargs: dict[str, Any], input_channels: int) -> None:
    """Build the network on the meta device and run it on a smallest patch (no memory, no time) to reject a
    bad ``arch`` early: kwargs the class rejects, and values only a forward pass checks (a YAML ``1e-5`` is
    the string "1e-5", not a float: write ``1.0e-5``)."""
    with torch.device("meta"):
        net = build_network(network_class_name, arch_kwargs, input_channels=input_channels, num_classes=1,
                            initialize=False)
        try:
            net.eval()(torch.zeros(1, input_channels, *(2 * d for d in patch_divisor(arch_kwargs))))
        except (TypeError, RuntimeError, ValueError) as exc:
            line = " ".join(str(exc).split())
            raise FieldError(f"arch: {network_class_name} fails on these arch_kwargs: {line}") from None
    if _resolved(arch_kwargs).get("conv_op") is not nn.Conv3d:
        raise FieldError(f"arch.conv_op: {arch_kwargs.get('conv_op')!r}: a 3D network needs "
                         f"torch.nn.modules.conv.Conv3d")


def patch_divisor(arch_kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """What each patch side must be a multiple of: the product of the strides along that axis."""
    div = [1, 1, 1]
    for s in arch_kwargs.get("strides", []):
        s = [s] * 3 if isinstance(s, int) else list(s)
        div = [d * int(x) for d, x in zip(div, s, strict=True)]
    return tuple(div)  # type: ignore[return-value]


def feature_channels(arch_kwargs: dict[str, Any]) -> list[int]:
    """Channels of each encoder stage (finest first)."""
    f = arch_kwargs["features_per_stage"]
    return [int(f)] * int(arch_kwargs["n_stages"]) if isinstance(f, int) else [int(x) for x in f]


class Segmenter3D(nn.Module):
    """A ``dynamic_network_architectures`` network as the segmentation model of 3D finetuning and prediction.

    It has the parts finetuning works with, as the 2D :class:`~ssl_pretrain.models.unet.UNet` does:
    ``encoder`` and ``decoder`` are the library's own modules (their ``state_dict`` keys are the
    library's, as in exports and nnU-Net checkpoints); the segmentation head is the decoder's
    ``seg_layers``. With ``deep_supervision`` a training forward returns the outputs of every decoder
    stage (full resolution first), as nnU-Net trains; otherwise, and always in eval mode, the
    full-resolution logits ``(B, K, D, H, W)``.

    Args:
        cfg: A 3D model config (``spatial_dims=3``, ``network_class_name``, ``arch``).
        num_classes: Output classes (background included).
        deep_supervision: Train every decoder stage's output.
    """

    def __init__(self, cfg: Any, num_classes: int, deep_supervision: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.deep_supervision = deep_supervision
        self.net = build_network(cfg.network_class_name, cfg.arch, input_channels=cfg.in_channels,
                                 num_classes=num_classes, deep_supervision=deep_supervision)
        if not deep_supervision:
            without_deep_supervision(self.net)

    @property
    def encoder(self) -> nn.Module:
        """The library's encoder (``encoder.…`` keys)."""
        return self.net.encoder

    @property
    def decoder(self) -> nn.Module:
        """The library's decoder, its ``seg_layers`` (the head) included (``decoder.…`` keys)."""
        return self.net.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.net.decoder.deep_supervision = self.deep_supervision and self.training
        return self.net(x)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's loss weights of ``n`` deep-supervision outputs (full resolution first): halved per stage,
    the coarsest one not trained, normalised to sum 1."""
    w = [0.5**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]
