"""Prediction: ``python launch/predict.py --help``; the code is :mod:`mri_ssl.cli.predict`.

A thin file over the installed command (``mri-ssl predict``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
