"""Segmentation probe during pretraining: how useful is the current encoder for segmentation?

Every ``probe.every`` steps rank 0 freezes the network, computes per-pixel features of a few
labeled volumes once, trains a light head on them and reports its Dice on held-out volumes:

* **Volumes** (3D shards and models): the same on whole preprocessed volumes, with encoder
  hypercolumns (trilinear) for every task — a 3D network's decoder ends in its own output layer.
* **Features.** When the task trained the decoder: the decoder's full-resolution output
  (``widths[0]`` channels). Encoder-only tasks: hypercolumns — every encoder level upsampled
  (bilinear) to full resolution and concatenated (``sum(widths)`` channels). Each channel is
  standardised with the mean / std of the training features, so that the head's optimisation does
  not depend on the feature scale (random and trained encoders are compared fairly).
* **Head.** A 1×1 convolution (a per-pixel linear classifier) trained with class-balanced
  cross-entropy for ``probe.steps`` Adam steps, each on ``probe.pixels`` pixels drawn from all
  training slices (pixels, not slices: the cost stays small for wide hypercolumns).
* **Score.** Mean over the evaluation volumes and the foreground classes of the 3D Dice of the
  argmax prediction (a class absent from both prediction and label scores 1).

The labeled volumes are a labeled dataset (MSD ``dataset.json`` or ``imagesTr/`` + ``labelsTr/``)
read with :func:`ssl_pretrain.data.ingest.discover` and prepared by
:func:`ssl_pretrain.data.preprocess.preprocess` with the parameters recorded in the shard manifest,
so the probe sees data prepared exactly like the pretraining slices. Subjects are split into
``n_train`` + ``n_eval`` by ``probe.seed`` (subject level); every random choice of the probe comes
from its own generators, so it never changes the training randomness and gives the same value for
the same weights (a resumed run reproduces it).

Example:
    >>> probe = SegmentationProbe(ProbeConfig(root="data/liver"), preprocessing, in_channels=1)  # doctest: +SKIP
    >>> probe.evaluate(task.encoder, task.decoder)["dice"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_pretrain.config import FieldError, option

__all__ = ["ProbeConfig", "SegmentationProbe", "dice_per_class"]

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """The segmentation probe during pretraining (off while ``root`` is empty)."""

    root: str = option("", "labeled dataset (MSD dataset.json or its folder) for the probe; empty = no probe")
    every: int = option(500, "steps between probes (and one at step 0: the random-init reference)", ge=1)
    steps: int = option(100, "Adam steps of the probe head", ge=1)
    lr: float = option(0.05, "learning rate of the probe head", gt=0)
    pixels: int = option(8192, "training pixels per head step, drawn from all training slices", ge=1)
    n_train: int = option(2, "labeled volumes the head is trained on", ge=1)
    n_eval: int = option(4, "held-out labeled volumes it is scored on", ge=1)
    seed: int = option(0, "seed of the subject split, the head's initialisation and its mini-batches", ge=0)

    def check_fields(self) -> None:
        """A given ``root`` must exist (the bounds are checked by the config loader)."""
        if self.root and not Path(self.root).exists():
            raise FieldError(f"root: {self.root} not found (expected a labeled dataset folder or dataset.json)")

    @property
    def enabled(self) -> bool:
        """Whether the probe runs."""
        return bool(self.root)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """3D Dice of each foreground class of one volume.

    Args:
        pred: ``(S, H, W)`` int class map.
        label: ``(S, H, W)`` int class map.
        num_classes: Classes including background (0).

    Returns:
        ``(num_classes - 1,)`` float64; a class absent from both scores 1.
    """
    out = torch.empty(num_classes - 1, dtype=torch.float64)
    for c in range(1, num_classes):
        p, t = pred == c, label == c
        denom = int(p.sum()) + int(t.sum())
        out[c - 1] = 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


class SegmentationProbe:
    """The probe's labeled volumes (loaded and preprocessed once) and its evaluation.

    Args:
        cfg: Probe options.
        preprocessing: The shard manifest's preprocessing parameters (``PreprocessParams.to_dict()``).
        in_channels: The model's input channels (the volumes must match).
        device: Where features and the head are computed.

    Raises:
        ValueError: ``probe.root`` without labeled volumes, fewer than ``n_train + n_eval`` of them,
            shards without recorded preprocessing, or volumes whose channels differ from the model's
            (one line naming the dataset and what was expected).
    """

    def __init__(self, cfg: ProbeConfig, preprocessing: dict[str, Any], in_channels: int,
                 device: torch.device | str = "cpu", divisor: tuple[int, ...] | None = None) -> None:
        from ssl_pretrain.data.ingest import discover
        from ssl_pretrain.data.preprocess import InputError, PreprocessParams, first_file, preprocess
        from ssl_pretrain.data.volumes import preprocess_volume

        self.cfg = cfg
        self.device = torch.device(device)
        root = Path(cfg.root)
        if not preprocessing:
            raise ValueError(
                f"probe.root={root}: the shard manifest records no preprocessing, so the probe cannot prepare "
                f"its volumes like the shards; re-shard with launch/make_shards.py"
            )
        try:
            params = PreprocessParams.from_dict(preprocessing)
        except ValueError as e:
            raise ValueError(f"probe.root={root}: the shards' preprocessing is unusable: {e}") from None
        try:
            subjects, _ = discover(root, labels=True)
        except InputError as e:
            raise ValueError(f"probe.root: {e}") from None
        need = cfg.n_train + cfg.n_eval
        if not subjects:
            raise ValueError(f"probe.root={root}: no labeled volumes (expected MSD training entries with labels)")
        if len(subjects) < need:
            raise ValueError(
                f"probe.root={root}: {len(subjects)} labeled volumes, but probe.n_train + probe.n_eval = {need}"
            )
        order = list(range(len(subjects)))
        random.Random(f"probe-{cfg.seed}").shuffle(order)
        chosen = [subjects[i] for i in order[:need]]
        volumes = []
        self.divisor = divisor  # 3D: volumes are padded to multiples of it for the network
        prepare = preprocess_volume if params.volumetric else preprocess
        for s in chosen:
            try:
                vol = prepare(s.image, params, s.label, allowed_labels=s.allowed_labels)
            except InputError as e:
                raise ValueError(f"probe.root: {e}") from None
            channels = vol.image.shape[0 if params.volumetric else 1]
            if channels != in_channels:
                raise ValueError(
                    f"probe.root={root}: {first_file(s.image)} has {channels} channels after the shards' "
                    f"preprocessing ({preprocessing}), the model takes model.in_channels={in_channels}"
                )
            volumes.append((torch.from_numpy(vol.image), torch.from_numpy(vol.label.astype("int64"))))
        self.subjects = [s.id for s in chosen]
        self.train = volumes[: cfg.n_train]
        self.eval = volumes[cfg.n_train :]
        self.num_classes = max(2, 1 + max(int(lab.max()) for _, lab in volumes))
        log.info("probe: %d training + %d evaluation volumes from %s (%d classes)", cfg.n_train, cfg.n_eval,
                 root, self.num_classes)

    @torch.no_grad()
    def _features(self, encoder: nn.Module, decoder: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel features ``(S, F, H, W)`` float32 of slices ``(S, C, H, W)``, in chunks."""
        param = next(encoder.parameters())
        out = []
        for chunk in images.split(32):
            x = chunk.to(param.device, param.dtype)
            feats = encoder(x)
            if decoder is not None:
                f = decoder(feats)[-1]
            else:  # hypercolumns: every encoder level at full resolution
                f = torch.cat([F.interpolate(level.float(), size=x.shape[-2:], mode="bilinear",
                                             align_corners=False) for level in feats], 1)
            out.append(f.float().to(self.device))
        return torch.cat(out)

    def evaluate(self, encoder: nn.Module, decoder: nn.Module | None) -> dict[str, float]:
        """Probe Dice of these network parts (their train / eval mode is restored afterwards).

        Args:
            encoder: The UNet encoder.
            decoder: The UNet decoder when the task trained it, else ``None`` (hypercolumn features).

        Returns:
            ``dice`` (mean over evaluation volumes and foreground classes), ``dice/class<c>`` per
            class, and ``time_s``.
        """
        t0 = time.perf_counter()
        if self.divisor is not None:
            return {**self._evaluate_volumes(encoder), "time_s": time.perf_counter() - t0}
        modes = [(m, m.training) for m in (encoder, decoder) if m is not None]
        for m, _ in modes:
            m.eval()  # normalisation layers must not update running statistics on probe data
        try:
            train_x = torch.cat([self._features(encoder, decoder, img) for img, _ in self.train])
            eval_x = [self._features(encoder, decoder, img) for img, _ in self.eval]
        finally:
            for m, mode in modes:
                m.train(mode)
        train_y = torch.cat([lab for _, lab in self.train]).to(self.device)
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        train_x = (train_x - mean) / std
        head = self._train_head(train_x, train_y)
        scores = []
        with torch.no_grad():
            for x, (_, lab) in zip(eval_x, self.eval, strict=True):
                pred = head((x - mean) / std).argmax(1).cpu()
                scores.append(dice_per_class(pred, lab, self.num_classes))
        per_class = torch.stack(scores).mean(0)
        result = {"dice": float(per_class.mean())}
        result.update({f"dice/class{c + 1}": float(v) for c, v in enumerate(per_class)})
        result["time_s"] = time.perf_counter() - t0
        return result

    @torch.no_grad()
    def _volume_features(self, encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Hypercolumns ``(voxels, F)`` of one volume ``(C, D, H, W)``: every encoder stage, trilinear to full
        resolution (the volume is padded with its minimum to multiples of the network's divisor, then cropped)."""
        assert self.divisor is not None
        param = next(encoder.parameters())
        size = image.shape[1:]
        pad = [(-n) % d for n, d in zip(size, self.divisor, strict=True)]
        x = F.pad(image[None], [v for p in reversed(pad) for v in (0, p)], value=float(image.min()))
        feats = encoder(x.to(param.device, param.dtype))
        f = torch.cat([F.interpolate(level.float(), size=x.shape[2:], mode="trilinear", align_corners=False)
                       for level in feats], 1)[0, :, : size[0], : size[1], : size[2]]
        return f.flatten(1).T.to(self.device)

    def _evaluate_volumes(self, encoder: nn.Module) -> dict[str, float]:
        """The 3D probe: a linear head on encoder hypercolumns of whole volumes (the decoder of a 3D
        network ends in its own output layer, so the encoder is what is probed, for every task)."""
        mode = encoder.training
        encoder.eval()
        try:
            train_x = torch.cat([self._volume_features(encoder, img) for img, _ in self.train])
            eval_x = [self._volume_features(encoder, img) for img, _ in self.eval]
        finally:
            encoder.train(mode)
        train_y = torch.cat([lab.flatten() for _, lab in self.train]).to(self.device)
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        head = self._train_head(((train_x - mean) / std)[:, :, None, None], train_y)
        scores = []
        with torch.no_grad():
            for x, (_, lab) in zip(eval_x, self.eval, strict=True):
                logits = F.linear((x - mean) / std, head.weight[:, :, 0, 0], head.bias)
                scores.append(dice_per_class(logits.argmax(1).cpu().view(lab.shape), lab, self.num_classes))
        per_class = torch.stack(scores).mean(0)
        return {"dice": float(per_class.mean()), **{f"dice/class{c + 1}": float(v) for c, v in enumerate(per_class)}}

    def _train_head(self, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        """A 1×1 convolution fitted to features ``x`` ``(N, F, H, W)`` and labels ``y`` ``(N, H, W)``."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        head = nn.Conv2d(x.shape[1], self.num_classes, 1)
        with torch.no_grad():  # seeded init from the probe's own generator, not the global RNG
            bound = 1.0 / x.shape[1] ** 0.5
            head.weight.copy_((torch.rand(head.weight.shape, generator=g) * 2 - 1) * bound)
            head.bias.zero_()
        head = head.to(self.device)
        pix_x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (pixels, F): a 1×1 conv is a linear map per pixel
        pix_y = y.reshape(-1)
        opt = torch.optim.Adam(head.parameters(), lr=self.cfg.lr)
        # class-balanced cross-entropy: a small organ would otherwise be drowned by the background
        counts = torch.bincount(pix_y.cpu(), minlength=self.num_classes).double().clamp_min(1)
        weight = (counts.sum() / (self.num_classes * counts)).float().to(self.device)
        n = pix_x.shape[0]
        with torch.enable_grad():
            for _ in range(self.cfg.steps):
                idx = torch.randint(n, (min(self.cfg.pixels, n),), generator=g).to(self.device)
                logits = F.linear(pix_x[idx], head.weight[:, :, 0, 0], head.bias)
                loss = F.cross_entropy(logits, pix_y[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return head
