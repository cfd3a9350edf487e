"""mri-ssl's entry points and shipped configs: the installed home of every command.

``python -m mri_ssl.cli COMMAND …`` (or the ``mri-ssl`` console script) runs ``pretrain``,
``finetune``, ``sweep``, ``predict``, ``make-shards``, ``synth`` and ``demo``; ``launch/*.py`` in a
source checkout are thin files over the same ``main`` functions, for ``deepspeed`` and
``torchrun``, which take a script path. ``mri_ssl/configs/*.yaml`` are the shipped configs;
``--config NAME`` (``debug``, ``debug.yaml``) finds them wherever mri-ssl is installed.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (``launch/configs`` in a source checkout links here)."""

__all__ = ["CONFIG_DIR"]
