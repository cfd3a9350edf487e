"""The shape of the house: imports point one way, loading a model needs no pretext task, functions stay short."""

from __future__ import annotations

import ast
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
