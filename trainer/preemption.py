"""SIGTERM/SIGINT/SIGHUP/SIGUSR1 as a request to stop cleanly after the current training step.

Preemptible machines send SIGTERM shortly before they go away (Kubernetes, GCE spot VMs
and Vertex AI give a grace period); Slurm sends the signal of `--signal=USR1@SECONDS`
that long before a job's time limit; SIGHUP comes when the terminal or SSH session that
started the run goes away. The first signal sets a
flag that the compiled training loop checks before every step, so the run stops at a
step boundary, saves a checkpoint and exits with EXIT_PREEMPTED; a second signal exits
at once. Python runs signal handlers only in the main thread and only between
bytecodes, so the trainer runs the compiled loop in a worker thread while the main
thread waits: the handler then runs within milliseconds, even in a long loop call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import tensorflow as tf

from trainer import signals
from trainer.errors import StoppedBySignalError

# "Temporary failure; try again" (sysexits.h): run the same command to resume.
EXIT_PREEMPTED = 75


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT/SIGHUP/SIGUSR1 into `flag = True`."""

    def __init__(self, flag: tf.Variable | None = None, announce=None) -> None:
        """Args:
        flag: the boolean variable the compiled loop reads (trainer.loop.step.Votes.stop);
            a new one if None.
        announce: called with one line when the first signal arrives, so the user knows
            it was heard (and a test knows when a second signal counts as second).
        """
        self.announce = announce
        if flag is None:
            # Read inside the compiled loop; a plain (non-mirrored) variable on the host.
            with tf.init_scope():
                flag = tf.Variable(False, trainable=False, name="stop_requested")
        self.flag = flag
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in signals.STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None:
            # Second signal: the user (or the scheduler) will not wait for the checkpoint.
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.flag.assign(True)
        if self.announce is not None:
            self.announce(
                f"{self.signal_name} received: stopping after the current step with a checkpoint "
                "(a second signal stops at once, without one)"
            )


@contextlib.contextmanager
def signals_interrupt(outcome: str) -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGHUP raises where the main thread is, and
    leaves the block as StoppedBySignalError (exit 128+N); a second one exits at once.

    For commands that write files but have no checkpoint to stop at (`data convert`,
    `export`): the signals' default action ends the process without running a line more,
    so their cleanup (which runs on any exception, Ctrl-C's KeyboardInterrupt included)
    never ran and half-written files refused the next try. `outcome` says what the
    cleanup left, for the error line. Handlers are put back on leaving.
    """
    try:
        with signals.raising((signal.SIGTERM, signal.SIGHUP), second_exits=True):
            yield
    except signals.SignalRaised as stopped:
        raise StoppedBySignalError(f"{stopped.name} received: {outcome}", stopped.signum) from None
