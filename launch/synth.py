"""Synthetic cohorts: ``python launch/synth.py --help``; the code is :mod:`mri_ssl.cli.synth`.

A thin file over the installed command (``mri-ssl synth``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
