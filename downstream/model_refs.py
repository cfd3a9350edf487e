"""Resolve a model reference — a local export file or an MLflow URI — to a local export file.

Accepted: a path to an export ``model.pt``; ``runs:/<run_id>/<artifact path>`` (a file, or a
folder holding one ``model.pt``; ``runs:/<run_id>`` alone looks for ``export/model.pt`` first);
``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (the registered model's artifacts carry
the export as ``extra_files/model.pt``). The tracking store is ``MLFLOW_TRACKING_URI``.

Artifacts are downloaded into a folder the caller names (a run's own ``init/``), replaced whole on
each download, or with :func:`local_model_file` into a temporary folder removed afterwards. An
artifact path with ``..`` is refused: it would copy files from outside the run's artifacts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["is_mlflow_uri", "local_model_file", "resolve_model_file"]

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


def _replace_dir(fresh: Path, dst: Path) -> None:
    """Move the folder ``fresh`` to ``dst``, replacing whatever is there (stale downloads, a link)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    os.replace(fresh, dst)


def resolve_model_file(ref: str, dst_dir: str | os.PathLike[str] | None, *, key: str = "init") -> Path:
    """Return a local export file for a path or an MLflow URI.

    Args:
        ref: Path to an export, ``runs:/…`` or ``models:/…``.
        dst_dir: Folder that receives MLflow artifacts, replaced whole (required for a URI; see
            :func:`local_model_file` for a temporary one).
        key: Config key or flag named in error messages.

    Returns:
        Path of the export file.

    Raises:
        ValueError: The file does not exist, the URI does not resolve or its path has ``..``
            (one line naming it).
    """
    if not is_mlflow_uri(ref):
        p = Path(ref).expanduser()
        if not p.is_file():
            raise ValueError(
                f"{key}: {ref} is neither 'random', an existing export file nor an MLflow URI "
                "(runs:/…, models:/…)"
            )
        return p
    if ".." in urllib.parse.unquote(ref).replace("\\", "/").split("/"):
        raise ValueError(f"{key}: {ref}: '..' is not allowed in an MLflow artifact path")
    if dst_dir is None:
        raise TypeError("resolve_model_file: an MLflow URI needs dst_dir (or use local_model_file)")
    import mlflow

    dst = Path(dst_dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    candidates = [ref]
    parts = ref[len("runs:/") :].strip("/").split("/") if ref.startswith("runs:/") else []
    if len(parts) == 1:  # a bare run: the pretraining export first, all artifacts otherwise
        candidates = [f"runs:/{parts[0]}/export/model.pt", ref]
    last_error = ""
    for uri in candidates:
        fresh = Path(tempfile.mkdtemp(prefix=f".{dst.name}.download-", dir=dst.parent))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(fresh)))
        except Exception as e:  # mlflow raises MlflowException, OSError, ... for a URI that does not resolve
            shutil.rmtree(fresh)
            last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        rel = local.resolve().relative_to(fresh.resolve())  # ValueError if MLflow wrote elsewhere
        _replace_dir(fresh, dst)
        local = dst / rel
        path = local if local.is_file() else _pick_export(local, ref)
        log.info("%s %s resolved to %s", key, ref, path)
        return path
    raise ValueError(
        f"{key}: MLflow URI {ref} does not resolve at {mlflow.get_tracking_uri()} ({last_error[:200]})"
    )


@contextmanager
def local_model_file(ref: str, *, key: str = "--model") -> Iterator[Path]:
    """:func:`resolve_model_file` into a temporary folder that is removed when the block ends.

    For callers that load the export into memory at once (``predict.py``); a path is yielded as is.

    Example:
        >>> with local_model_file("models:/mri-ssl-liver@champion") as path:  # doctest: +SKIP
        ...     export = load_export(path)
    """
    if not is_mlflow_uri(ref):
        yield resolve_model_file(ref, None, key=key)
        return
    with tempfile.TemporaryDirectory(prefix="mri_ssl_model_") as d:
        yield resolve_model_file(ref, Path(d) / "artifacts", key=key)
