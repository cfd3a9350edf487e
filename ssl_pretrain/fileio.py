"""Safe file writes and output-directory locks.

Everything mri-ssl writes that a user or a later run reads (configs, manifests, exports,
checkpoints' ``latest``, masks, reports, figures, caches) goes through :func:`atomic_path`: the
content is written under a temporary name in the destination's directory and renamed over the
destination in one ``os.replace`` once it is complete. A reader sees the old file or the complete
new one, never a half-written one, and a symbolic link planted at the destination is replaced,
not written through. Logs that grow line by line (``metrics.jsonl``) go through
:func:`append_text`, which refuses a symbolic link in place of the file.

:func:`lock_output_dir` makes a run the only writer of its output directory: a second run on the
same directory refuses with one line naming the directory and the holder's pid.

Example:
    >>> with atomic_path("runs/x/model.pt") as tmp:  # doctest: +SKIP
    ...     torch.save(state, tmp)
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "OutputLockedError",
    "append_text",
    "atomic_path",
    "atomic_savefig",
    "read_own_text",
    "atomic_write_bytes",
    "atomic_write_text",
    "lock_output_dir",
    "run_locked",
]


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


def atomic_savefig(figure: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a Matplotlib figure to ``path`` atomically (format from the extension). Returns the path."""
    p = Path(path)
    with atomic_path(p, suffix=p.suffix) as tmp:
        figure.savefig(tmp, **kwargs)
    return p


def _open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link as the last component with a one-line ``ValueError``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(
                f"{path} is a symbolic link; mri-ssl writes only its own files there (remove the link)"
            ) from None
        raise


def read_own_text(path: str | os.PathLike[str]) -> str:
    """Read a file mri-ssl wrote itself (UTF-8), refusing a symbolic link planted in its place.

    Raises:
        ValueError: ``path`` is a symbolic link.
    """
    fd = _open_no_follow(Path(path), os.O_RDONLY)
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, creating it; a symbolic link there is refused.

    Raises:
        ValueError: ``path`` is a symbolic link.
    """
    fd = _open_no_follow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "ab") as f:
        f.write(text.encode())


class OutputLockedError(ValueError):
    """Another process holds the lock of an output directory."""


ORPHAN_GRACE_S = 20.0
"""How long a run waits for a lock whose recorded holder is dead (its forked children, e.g. data
loader workers, still hold the lock until they notice and exit)."""


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _acquire(fd: int, d: Path, lock: Path) -> None:
    """``flock`` ``fd`` or raise :class:`OutputLockedError`; a dead holder's children get a grace period."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        if _pid_alive(holder):
            raise OutputLockedError(
                f"{d} is in use by another run (pid {holder} holds {lock}); wait for it to end or use another "
                "output directory"
            )
        # the holder was killed, but a process it forked still holds the lock: wait for it to exit
        deadline = deadline or time.monotonic() + ORPHAN_GRACE_S
        if time.monotonic() > deadline:
            raise OutputLockedError(
                f"{d} is locked by a process left over from the killed run pid {holder} ({lock}); stop it "
                "(e.g. `fuser -k` on the lock file) or use another output directory"
            )
        time.sleep(0.2)


@contextmanager
def lock_output_dir(
    directory: str | os.PathLike[str], *, beside: bool = False, enabled: bool = True
) -> Iterator[Path | None]:
    """Hold an exclusive lock on an output directory for the duration of the block.

    The lock is ``fcntl.flock`` on ``<directory>/.lock`` (``<parent>/.<name>.lock`` with
    ``beside``, for outputs that are replaced whole); the holder's pid is written into the file
    for the message a second run prints. The kernel drops the lock when the holder exits, however
    it exits, so a killed run never leaves a stale lock behind. The file itself stays (removing it
    would let two runs lock two different files of the same name).

    Args:
        directory: The output directory (created unless ``beside``).
        beside: Lock a file next to ``directory`` instead of inside it.
        enabled: ``False`` yields ``None`` without locking (ranks other than 0).

    Yields:
        The lock file, or ``None`` when not enabled.

    Raises:
        OutputLockedError: Another process holds the lock (one line: directory and holder's pid).
        ValueError: ``directory`` (or its parent) is a file, or the lock file is a symbolic link.
    """
    if not enabled:
        yield None
        return
    d = Path(directory)
    lock = d.parent / f".{d.name}.lock" if beside else d / ".lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{lock.parent} is not a directory; expected an output directory there") from None
    fd = _open_no_follow(lock, os.O_RDWR | os.O_CREAT)
    try:
        _acquire(fd, d, lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the lock


def os_error_line(e: OSError, where: str | os.PathLike[str]) -> str:
    """``PATH: strerror (errno NAME)`` for an ``OSError`` (the path it names, else ``where``)."""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    return f"{e.filename or where}: {e.strerror or e} (errno {name})"


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create and remove a file in ``folder`` (created if missing), so a read-only or full disk fails
    before any work rather than after it. Raises the ``OSError``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(tmp)


def run_locked(directory: str | os.PathLike[str], body: Callable[[], int], *, enabled: bool = True,
               stops_at_steps: bool = True) -> int:
    """Run an entry script's ``body`` holding the lock of its output directory (one run per ``out_dir``).

    A ``ValueError`` — the lock held elsewhere, ``out_dir`` not a directory, or bad input the body
    did not turn into a message itself — becomes one ``error:`` line on stderr and exit status 2.
    Ctrl-C and SIGTERM become one line saying how to resume (exit 130 / 143).

    Args:
        directory: The run's ``out_dir``.
        body: The script's work; returns its exit status.
        enabled: ``False`` runs ``body`` without the lock (ranks other than 0).
        stops_at_steps: SIGTERM is polled by the body's training loop, which saves a checkpoint and
            stops at its next step (:mod:`ssl_pretrain.termination`); ``False`` stops at once.

    Returns:
        The exit status.
    """
    from ssl_pretrain.termination import received, sigterm_handling

    try:
        with sigterm_handling(immediate=not stops_at_steps), lock_output_dir(directory, enabled=enabled):
            return body()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk: one line, not a traceback (nothing half-written stays)
        print(f"error: {os_error_line(e, directory)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        what = "terminated (SIGTERM)" if received() else "interrupted"
        print(f"{what}; run the same command again to resume from the last checkpoint in {directory}",
              file=sys.stderr)
        return 143 if received() else 130
