"""Weights out to nnU-Net v2: ``python launch/export_nnunet.py --help``; the code is :mod:`mri_ssl.cli.export_nnunet`.

A thin file over the installed command (``mri-ssl export-nnunet``), for a source checkout.
"""

import sys

from mri_ssl.cli.export_nnunet import main

if __name__ == "__main__":
    sys.exit(main())
