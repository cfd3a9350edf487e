"""Self-supervised pretraining: ``python launch/pretrain.py --help``; the code is :mod:`mri_ssl.cli.pretrain`.

A thin file over the installed command (``mri-ssl pretrain``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
