"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

Everything mri-ssl writes that a user or a later run reads (configs, manifests, exports,
checkpoints' ``latest``, masks, reports, caches) goes through :func:`atomic_path`: the content is
written under a temporary name in the destination's directory and renamed over the destination
in one ``os.replace`` once it is complete.

Example:
    >>> with atomic_path("runs/x/model.pt") as tmp:  # doctest: +SKIP
    ...     torch.save(state, tmp)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    Args:
        path: The destination; its directory is created.
        suffix: Ending of the temporary name, for writers that go by the extension (``".nii.gz"``).

    Raises:
        Whatever the block raises; the temporary file is removed and ``path`` is untouched.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (fsync before the rename). Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably. Returns the path."""
    return atomic_write_bytes(path, text.encode())
