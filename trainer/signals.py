"""Signals that raise where the main thread is: for blocks that must end on a signal.

Python runs a signal's handler in the main thread between bytecodes; a handler that
raises ends a blocking socket call or sleep at once, and the block's own cleanup runs.
Used by the waits on something outside (trainer.rendezvous: exit 75, nothing started)
and by the commands with files to clean up and no checkpoint to stop at
(trainer.preemption.signals_interrupt: `data convert`, `export`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SignalRaised(BaseException):
    """A BaseException, as KeyboardInterrupt, so no `except Exception` on the way (Keras'
    export has some) swallows it before the block's cleanup and its caller see it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def raising(signals: tuple[int, ...], second_exits: bool = False) -> Iterator[None]:
    """While the block runs, the first of `signals` raises SignalRaised in the main thread;
    with `second_exits`, another one (during the cleanup) exits at once with 128+N.

    The previous handlers are put back on leaving. Outside the main thread, where Python
    delivers no signals, nothing changes.
    """
    raised: list[int] = []

    def handler(signum: int, _frame) -> None:
        if raised and second_exits:
            os._exit(128 + signum)  # the cleanup itself is being interrupted: the user will not wait
        raised.append(signum)
        raise SignalRaised(signum)

    with handled(signals, handler):
        yield


@contextmanager
def handled(signals: tuple[int, ...], handler) -> Iterator[None]:
    """`handler` for `signals` while the block runs, the previous handlers after. Outside
    the main thread, where Python delivers no signals, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
