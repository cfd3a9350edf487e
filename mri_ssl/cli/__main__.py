"""``python -m mri_ssl.cli COMMAND …``."""

import sys

from mri_ssl.cli import main

sys.exit(main())
