"""SIGTERM, what SLURM and Kubernetes send before they kill a job: stop at a safe point, not mid-write.

:func:`sigterm_handling` installs the handler for the time of a command. A training loop polls
:func:`requested` at each step boundary and, when it is set, saves a checkpoint and raises
:class:`Terminated`; a command without such a boundary (a sweep) has :class:`Terminated` raised at
once. A second SIGTERM always raises at once. :class:`Terminated` is a ``KeyboardInterrupt``, so
every ``except KeyboardInterrupt`` (MLflow runs marked KILLED, Ray shut down) treats it alike.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Terminated", "received", "reinstall", "requested", "sigterm_handling"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM and stops (after a checkpoint, where the loop could save one)."""


_requested = threading.Event()
_active: list[Callable[[int, FrameType | None], None]] = []  # the innermost block's handler last


def reinstall() -> None:
    """Put the handler back after a library replaced it (``ray.init`` installs its own, which prints a
    stack dump and exits); nothing to do outside a :func:`sigterm_handling` block."""
    if _active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _active[-1])


def requested() -> bool:
    """Whether SIGTERM arrived inside the current :func:`sigterm_handling` block (a training loop then
    saves and raises :class:`Terminated` at its next step); always False outside a block."""
    return bool(_active) and _requested.is_set()


def received() -> bool:
    """Whether SIGTERM arrived in the current or the last block: what stopped a command, even when a
    library turned :class:`Terminated` into its own ``KeyboardInterrupt`` (Ray Tune does)."""
    return _requested.is_set()


@contextmanager
def sigterm_handling(*, immediate: bool) -> Iterator[None]:
    """Handle SIGTERM inside the block: set :func:`requested`, and raise :class:`Terminated` when
    ``immediate`` or when it is the second one. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        again = _requested.is_set()
        _requested.set()
        if immediate or again:
            raise Terminated("SIGTERM")

    _requested.clear()  # kept after the block: the caller may still ask whether SIGTERM stopped it
    previous = signal.signal(signal.SIGTERM, handler)
    _active.append(handler)
    try:
        yield
    finally:
        _active.pop()
        signal.signal(signal.SIGTERM, previous)
