"""Signals where the main thread is, and waits on something outside that they end.

Python runs a signal's handler in the main thread between bytecodes. A handler that
raises ends a blocking socket call or sleep at once, and the block's own cleanup runs
(`raising`); one that only records runs at once whatever the main thread waits in, a
lock or a future included, and leaves acting on it to that thread (`recorded`). `Wait`
builds the waits on something outside on these two: a deadline, the signals that still
end them, and the caller's typed error for each (trainer.rendezvous: the cluster, a TPU;
trainer.data.service: TensorFlow's calls to a tf.data service). `raising` also serves the
commands with files to clean up and no checkpoint to stop at
(trainer.preemption.signals_interrupt: `data convert`, `export`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from trainer.errors import TrainerError

T = TypeVar("T")
# The signals that stop a run (trainer.preemption), its workers (trainer.launcher), a user's
# action and a wait: SIGHUP too, as a dropped ssh session is someone gone, and SIGUSR1,
# Slurm's warning before the end of a job's time (`launch train --help` promises it).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# How often a wait on another thread's call looks for a recorded signal.
_LOOK_S = 0.1


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
        if raised:  # already stopping: a second signal must not break the cleanup or the handlers' restore
            return
        raised.append(signum)
        raise SignalRaised(signum)

    with handled(signals, handler):
        yield


class Received:
    """The first signal of a `recorded` block (None until one came), and an event it sets."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()

    def handle(self, signum: int, _frame) -> None:
        self.signum = self.signum or signum
        self.event.set()

    def raise_if_any(self) -> None:
        """SignalRaised for the recorded signal, at the point the main thread chose to look."""
        if self.signum is not None:
            raise SignalRaised(self.signum)


@contextmanager
def recorded(signals: tuple[int, ...]) -> Iterator[Received]:
    """While the block runs, `signals` are only recorded: such a handler runs at once in the
    main thread, whatever the other threads are blocked in, and the main thread acts on it
    where nothing is half done. The previous handlers are put back on leaving."""
    received = Received()
    with handled(signals, received.handle):
        yield received


@contextmanager
def handled(signals: tuple[int, ...], handler) -> Iterator[None]:
    """`handler` for `signals` while the block runs, the previous handlers after. Outside
    the main thread, where Python delivers no signals, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # An ignored signal stays ignored: `nohup launch ...` means SIGHUP is no one leaving.
    chosen = [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, handler) for sig in chosen}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _nothing(_elapsed: float) -> None:
    pass


@dataclass(frozen=True)
class Wait:
    """A wait on something outside the process, which ends when that is there, past
    `seconds` with `timed_out()`, or on one of `signals` with `stopped(signum)`: errors the
    caller words, so each says what was waited for and what to do.

    TensorFlow's own waits (a cluster's peers, a tf.data service) last an hour or for ever,
    and some hold Python's lock or swallow SIGTERM: what they would wait for is waited for
    here first, or their call is waited on from here.
    Two forms: `until` polls a condition in this thread, `result` waits on a call that runs
    in another. Outside the main thread no signal ends them, only the deadline.
    """

    seconds: float
    timed_out: Callable[[], TrainerError]
    stopped: Callable[[int], TrainerError]
    signals: tuple[int, ...] = STOP_SIGNALS

    def until(self, ready: Callable[[], bool], each: Callable[[float], object] = _nothing) -> None:
        """Call `ready()` (each call returns within about a second) until it says yes, and
        `each(seconds waited)` after every no (to say what is awaited).

        A signal raises inside `ready()`: a blocking accept, recv or sleep there ends at once.
        """
        with self._stopped_by(raising(self.signals)):
            self._poll(lambda _left: ready(), each)

    def result(self, call: Callable[[], T], thread: str = "wait") -> T:
        """`call()`'s result (or its error), called in a daemon thread named `thread` while
        this one waits.

        For calls into C++ that Python cannot interrupt (TensorFlow's, gRPC's): the handlers
        only record, so they run at once while this thread waits on the call. Past the
        deadline or on a signal the call's thread is left blocked, and the error says so
        (`leaves_thread_blocked`): the CLI then ends the process at once after its line.
        """
        future: Future = Future()
        try:
            with self._stopped_by(recorded(self.signals)) as received:
                # Started once the handlers record: a signal as the call begins is not the old handler's.
                future = _started(call, thread)
                self._poll(lambda left: _settled(future, left, received), _nothing)
                received.raise_if_any()  # one that came as the call finished still stops the run
        except TrainerError as err:  # timed_out() or stopped(): nothing else raises in there
            err.leaves_thread_blocked = not future.done()  # a call that ended as a signal came left nothing
            raise
        return future.result()

    @contextmanager
    def _stopped_by(self, handling: AbstractContextManager[T]) -> Iterator[T]:
        """The block under `handling`'s signal handlers; a signal leaves it as `stopped(signum)`."""
        try:
            with handling as handler:
                yield handler
        except SignalRaised as stop:
            raise self.stopped(stop.signum) from None

    def _poll(self, ready: Callable[[float], bool], each: Callable[[float], object]) -> None:
        """Until `ready(seconds left)` says yes; past the deadline, `timed_out()`."""
        started = time.monotonic()
        while not ready(started + self.seconds - time.monotonic()):
            elapsed = time.monotonic() - started
            if not elapsed < self.seconds:  # a NaN deadline ends at once instead of never
                raise self.timed_out()
            each(elapsed)


def waited_on(call: Callable[[], T], thread: str) -> T:
    """`call()`'s result (or its error), called in a daemon thread named `thread` while this
    one waits on it.

    Python runs a signal's handler only when the main thread is between bytecodes: inside
    one long call into TensorFlow (an evaluation's compiled pass over a test set, minutes on
    a large one) SIGTERM and Ctrl-C waited for the call to end, so neither the first
    signal's announcement nor the second's exit came. A wait on a future lets handlers run
    at once; the call itself goes on (every worker of a cluster makes it, so it is not cut
    short), and a handler that raises leaves it to its daemon thread.
    """
    return _started(call, thread).result()


def _started(call: Callable[[], T], thread: str) -> Future:
    """The future of `call()`, run in a new daemon thread named `thread`."""
    future: Future = Future()
    threading.Thread(target=_settle, args=(future, call), name=thread, daemon=True).start()
    return future


def _settle(future: Future, call: Callable[[], object]) -> None:
    try:
        future.set_result(call())
    except BaseException as err:  # handed to the waiting thread, which raises it
        future.set_exception(err)


def _settled(future: Future, left: float, received: Received) -> bool:
    """Whether `future` is done, waiting at most _LOOK_S (and no longer than is `left`) for
    it; a signal recorded meanwhile raises here."""
    if wait_for([future], timeout=min(_LOOK_S, max(0.0, left))).done:
        return True
    received.raise_if_any()
    return False
