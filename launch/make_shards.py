"""Sharding NIfTI volumes: ``python launch/make_shards.py --help``; the code is :mod:`mri_ssl.cli.make_shards`.

A thin file over the installed command (``mri-ssl make-shards``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
