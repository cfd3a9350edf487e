"""The shape of the house: imports point one way, loading a model needs no pretext task, functions stay short."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_export_and_downstream_never_import_the_pretext_tasks() -> None:
    files = [ROOT / "ssl_pretrain" / "export.py", *sorted((ROOT / "downstream").rglob("*.py"))]
    bad = [f"{f.relative_to(ROOT)}: {m}" for f in files for m in _imports(f) if m.startswith("ssl_pretrain.tasks")]
    assert not bad


def test_loading_a_segmentation_model_imports_no_pretext_task() -> None:
    code = ("import sys, downstream.predict, downstream.finetune, downstream.sweep, ssl_pretrain.export; "
            "print(sorted(m for m in sys.modules if m.startswith('ssl_pretrain.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_kernels_import_nothing_of_the_project() -> None:
    for f in sorted((ROOT / "kernels").rglob("*.py")):
        assert not [m for m in _imports(f) if m.split(".")[0] in ("ssl_pretrain", "downstream", "experiments")], f


@pytest.mark.parametrize("package", ["downstream", "ssl_pretrain/engine"])
def test_no_function_over_80_lines(package: str) -> None:
    long = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_triton_interpret_outside_the_kernel_tests() -> None:
    assert "TRITON_INTERPRET" not in os.environ
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None"


def test_triton_interpret_is_scoped_to_the_kernel_tests() -> None:
    """With the kernel tests collected in the same session (their conftest sets the variable), the
    probe above still sees no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_bench.py",
         "tests/test_layout.py::test_no_triton_interpret_outside_the_kernel_tests", "-k", "triton_interpret"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]
