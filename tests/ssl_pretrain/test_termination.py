"""SIGTERM handling in-process: polled inside a block, never stale outside it (issue 26.9)."""

from __future__ import annotations

import os
import signal

import pytest

from ssl_pretrain import termination


def test_a_polled_sigterm_is_only_seen_inside_its_block() -> None:
    assert not termination.requested()
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what a library (Ray) installed earlier
    with termination.sigterm_handling(immediate=False):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        assert termination.requested() and termination.received()
        with pytest.raises(termination.Terminated):  # a second one stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert not termination.requested()  # a later in-process run does not stop on a stale flag ...
    assert termination.received()  # ... while the command that was stopped can still say why
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    with pytest.raises(termination.Terminated), termination.sigterm_handling(immediate=True):
        os.kill(os.getpid(), signal.SIGTERM)
    with termination.sigterm_handling(immediate=False):
        assert not termination.received()  # each block starts clean
