"""Run the Triton kernels on the CPU: TRITON_INTERPRET must be set before ``triton.jit`` runs.

``triton.jit`` decides between compiling and interpreting when the kernel is decorated, i.e.
when ``kernels.ntxent_triton`` is imported. If another test package imported ``kernels`` first, the
modules are reloaded here so the kernels tested below are the interpreted ones.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

if "kernels.ntxent" in sys.modules:  # imported before this conftest, compiled mode: reload
    importlib.reload(sys.modules["kernels.ntxent_triton"])
    importlib.reload(sys.modules["kernels.ntxent"])
    importlib.reload(sys.modules["kernels"])
