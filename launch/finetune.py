"""Finetuning: ``python launch/finetune.py --help``; the code is :mod:`mri_ssl.cli.finetune`.

A thin file over the installed command (``mri-ssl finetune``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
