"""Run the Triton kernels on the CPU: TRITON_INTERPRET must be set before ``triton.jit`` runs.

``triton.jit`` decides between compiling and interpreting when the kernel is decorated, i.e.
when ``kernels.ntxent_triton`` is imported. If another test package imported ``kernels`` first, the
modules are reloaded here so the kernels tested below are the interpreted ones. The compiled
kernels are tested on CUDA in a fresh interpreter without the variable (``test_ntxent_cuda.py``),
so this session interprets on every machine, with or without a GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

# Imported before this conftest, in compiled mode: reload, dependencies first.
for name in ("kernels.ntxent_triton", "kernels.ntxent", "tests.kernels.ntxent_reference", "benchmarks.ntxent",
             "kernels"):
    if name in sys.modules:
        importlib.reload(sys.modules[name])
