"""A label-efficiency sweep: ``python launch/sweep.py --help``; the code is :mod:`mri_ssl.cli.sweep`.

A thin file over the installed command (``mri-ssl sweep``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
