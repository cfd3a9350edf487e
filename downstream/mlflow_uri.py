"""Resolve a model reference — a local export file or an MLflow URI — to a local export file.

Accepted: a path to an export ``model.pt``; ``runs:/<run_id>/<artifact path>`` (a file, or a
folder holding one ``model.pt``; ``runs:/<run_id>`` alone looks for ``export/model.pt`` first);
``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (the registered model's artifacts carry
the export as ``extra_files/model.pt``). The tracking store is ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["is_mlflow_uri", "resolve_model_file"]

_PREFERRED = ("extra_files/model.pt", "export/model.pt", "model.pt")


def is_mlflow_uri(ref: str) -> bool:
    """Whether ``ref`` is an MLflow ``runs:/`` or ``models:/`` URI."""
    return ref.startswith(("runs:/", "models:/"))


def _pick_export(folder: Path, ref: str) -> Path:
    for rel in _PREFERRED:
        if (folder / rel).is_file():
            return folder / rel
    found = sorted(folder.rglob("model.pt"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise ValueError(f"{ref}: resolves to MLflow artifacts without an export model.pt")
    return found[0]


def resolve_model_file(ref: str, dst_dir: str | os.PathLike[str] | None = None, *, key: str = "init") -> Path:
    """Return a local export file for a path or an MLflow URI.

    Args:
        ref: Path to an export, ``runs:/…`` or ``models:/…``.
        dst_dir: Where MLflow artifacts are downloaded (default: a new temporary folder).
        key: Config key or flag named in error messages.

    Returns:
        Path of the export file.

    Raises:
        ValueError: The file does not exist or the URI does not resolve (one line naming it).
    """
    if not is_mlflow_uri(ref):
        p = Path(ref).expanduser()
        if not p.is_file():
            raise ValueError(
                f"{key}: {ref} is neither 'random', an existing export file nor an MLflow URI "
                "(runs:/…, models:/…)"
            )
        return p
    import mlflow

    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="mri_ssl_model_"))
    dst.mkdir(parents=True, exist_ok=True)
    candidates = [ref]
    parts = ref[len("runs:/") :].strip("/").split("/") if ref.startswith("runs:/") else []
    if len(parts) == 1:  # a bare run: the pretraining export first, all artifacts otherwise
        candidates = [f"runs:/{parts[0]}/export/model.pt", ref]
    last_error = ""
    for uri in candidates:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except Exception as e:  # mlflow raises MlflowException, OSError, ... for a URI that does not resolve
            last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        path = local if local.is_file() else _pick_export(local, ref)
        log.info("%s %s resolved to %s", key, ref, path)
        return path
    raise ValueError(
        f"{key}: MLflow URI {ref} does not resolve at {mlflow.get_tracking_uri()} ({last_error[:200]})"
    )
