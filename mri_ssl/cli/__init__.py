"""``python -m mri_ssl.cli COMMAND [ARGS…]`` / ``mri-ssl COMMAND [ARGS…]``: every command of mri-ssl.

Each command is a module of this package with a ``main(argv) -> int``; ``launch/<command>.py`` is
the same ``main`` behind a file path (what ``deepspeed`` and ``torchrun`` take). For several
processes use the launchers with the module: ``deepspeed --num_gpus G --module mri_ssl.cli.pretrain
…`` or ``torchrun --nproc_per_node G -m mri_ssl.cli.pretrain …``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import TypeVar

from mri_ssl import CONFIG_DIR
from ssl_pretrain.config import parse_config

T = TypeVar("T")
COMMANDS = {
    "pretrain": "self-supervised pretraining (DeepSpeed)",
    "finetune": "finetune one model on a few labeled volumes",
    "sweep": "Ray Tune label-efficiency sweep and report",
    "predict": "segment NIfTI volumes with a finetuned model",
    "export-nnunet": "a 3D export as nnU-Net v2 plans + pretrained weights",
    "make-shards": "NIfTI volumes to WebDataset shards",
    "synth": "synthetic MRI cohorts",
    "demo": "the whole label-efficiency experiment on synthetic MRI",
}

__all__ = ["COMMANDS", "main", "parse_run_config"]


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s command with the rest of ``argv``. Returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
        text = "usage: mri-ssl COMMAND [ARGS...]   (COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n{text}", file=sys.stderr)
            return 2
        print(text)
        return 0
    module = importlib.import_module(f"mri_ssl.cli.{argv[0].replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)


def parse_run_config(cls: type[T], argv: list[str] | None, doc: str | None) -> T:
    """A training command's config: ``--config FILE_OR_SHIPPED_NAME``, ``key=value`` words, ``--resume`` and
    (commands whose config has ``trust_checkpoint``) ``--trust-checkpoint``.

    ``--resume`` is the same as ``resume=auto``, ``--trust-checkpoint`` as ``trust_checkpoint=true``; a bad key
    or value exits 2 with one line naming it.
    """
    trusting = "trust_checkpoint" in {f.name for f in dataclasses.fields(cls)}

    def flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--resume", action="store_true", help="same as resume=auto")
        if trusting:
            p.add_argument("--trust-checkpoint", action="store_true", help="same as trust_checkpoint=true")

    cfg, args = parse_config(cls, argv, doc=doc, config_dir=CONFIG_DIR, add_flags=flags)
    if getattr(args, "resume", False):
        cfg.resume = "auto"  # type: ignore[attr-defined]
    if getattr(args, "trust_checkpoint", False):
        cfg.trust_checkpoint = True  # type: ignore[attr-defined]
    return cfg
