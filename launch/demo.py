"""The label-efficiency demo: ``python launch/demo.py --help``; the code is :mod:`mri_ssl.cli.demo`.

A thin file over the installed command (``mri-ssl demo``), for launchers that take a script path
(``deepspeed``, ``torchrun``) and for a source checkout.
"""

import sys

from mri_ssl.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
