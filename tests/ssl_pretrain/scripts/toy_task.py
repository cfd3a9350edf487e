"""A toy pretext task added through the registry and pretrained by the real CLI (``launch/pretrain.py``).

Rotation prediction (Gidaris et al. 2018): each slice is turned by k × 90° and the encoder's
pooled bottleneck predicts k. It is the whole cost of a new task: this file's config and task
class plus one :func:`register_task` call (a line of the table for a task inside the package).

    python toy_task.py --config launch/configs/debug.yaml task=rotation data.shards=DIR out_dir=OUT
"""

from __future__ import annotations

import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_pretrain.config import ConfigError, option
from ssl_pretrain.models.unet import UNet, UNetConfig
from ssl_pretrain.tasks.figures import image_grid
from ssl_pretrain.tasks.registry import register_task


@dataclass
class RotationConfig:
    """Options of the rotation task."""

    turns: int = option(4, "number of rotations to tell apart (k × 360° / turns; 2 or 4)")

    def validate(self) -> None:
        """Raise ConfigError for out-of-range values."""
        if self.turns not in (2, 4):
            raise ConfigError(f"rotation.turns: must be 2 or 4, got {self.turns}")


class RotationTask(nn.Module):
    """UNet encoder + linear classifier of the rotation (see :class:`~ssl_pretrain.tasks.registry.PretextTask`)."""

    needs_position = False

    def __init__(self, model_cfg: UNetConfig, cfg: RotationConfig, *, seed: int, distributed: bool,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = UNet(model_cfg, out_channels=1).encoder
        self.decoder: nn.Module | None = None
        self.classifier = nn.Linear(model_cfg.widths[-1], cfg.turns)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _turn(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        step = 4 // self.cfg.turns  # quarter turns per class
        turned = torch.stack([torch.rot90(x, i * step, (2, 3)) for i in range(self.cfg.turns)], 1)
        return turned[torch.arange(x.shape[0], device=x.device), k]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the predicted rotation; metric ``accuracy``."""
        param = next(self.parameters())
        x = batch["image"].to(param.device, torch.float32)
        k = torch.randint(self.cfg.turns, (x.shape[0],), generator=self.generator, device=x.device)
        logits = self.classifier(self.encoder(self._turn(x, k).to(param.dtype))[-1].mean((2, 3))).float()
        return F.cross_entropy(logits, k), {"accuracy": (logits.argmax(1) == k).float().mean().detach()}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`loss`."""
        return self.loss(batch)

    @torch.no_grad()
    def figure(self, batch: dict[str, Any], n: int = 4) -> Any:
        """The first ``n`` slices and each turned once."""
        x = batch["image"][:n].float().cpu()
        return image_grid([("original", x), ("turned", self._turn(x, torch.ones(len(x), dtype=torch.long)))])

    def export_parts(self) -> tuple[str, ...]:
        """Only the encoder is trained."""
        return ("encoder",)

    def rng_state(self) -> torch.Tensor:
        """State of the rotation generator."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)


if __name__ == "__main__":
    register_task("rotation", RotationConfig, RotationTask, "rotation task options (toy)")
    sys.argv = [str(Path(__file__).resolve().parents[3] / "launch" / "pretrain.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
