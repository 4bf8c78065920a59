"""The controller: runs the compiled calls and, between them, the actions that are due.

The compiled call (trainer.loop.step) runs in a worker thread, so that the main thread
stays free to take SIGTERM/SIGINT within milliseconds; the stop request becomes a vote
that every worker agrees on before each step. After a call that reached its planned end
(trainer.loop.schedule), the actions (trainer.loop.actions) run in their list order. A
call that ends early (a stop) skips them: the logging window in flight goes into the
checkpoint instead, so the resumed run adds it up exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as CallTimeout
from dataclasses import dataclass

import tensorflow as tf

from trainer import files
from trainer.console import Speed
from trainer.errors import DivergedError, InputStalledError
from trainer.evaluation import EvalMetrics
from trainer.loop.actions import EARLY_STOPPING, LoopState, Progress
from trainer.loop.schedule import SaveClock, Schedule
from trainer.loop.step import Votes
from trainer.preemption import EXIT_PREEMPTED, StopRequest
from trainer.say import Say
from trainer.sums import StepSums

Action = Callable[[int, LoopState], None]
# Test seam: a worker whose environment sets this votes to stop before global step k, as a
# signal would; off (unset) in normal use. See tests/README.md.
STOP_AT_STEP_VARIABLE = "TRAINER_STOP_AT_STEP"


@dataclass
class TrainResult:
    """What `train()` returns: how far the run got, how fast, and how it ended."""

    step: int
    total_steps: int
    seconds: float
    images_per_second: float
    final_eval: EvalMetrics | None
    workdir: str
    # "SIGTERM"/"SIGINT"/... when interrupted before the end; "early_stopping" (EARLY_STOPPING)
    # when train.early_stopping_patience ended it, as planned.
    stopped_by: str | None = None

    @property
    def interrupted(self) -> bool:
        """Stopped before the end, to be resumed (not by early stopping, which is a finish)."""
        return self.stopped_by not in (None, EARLY_STOPPING)

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.interrupted else 0


@dataclass
class Outcome:
    """How the loop ended: the step reached, its speed, and what stopped it early."""

    state: LoopState
    images_per_second: float
    stopped_by: str | None


@dataclass
class Controller:
    """Runs `train_loop` over `schedule`, dispatching `actions` between calls.

    Args:
        loop_for: the compiled call (trainer.loop.step.make_train_loop) for a call starting
            at a global step: fine-tuning trains other variables after the unfreeze epoch.
        batches_for: the call's `batches` argument for a call starting at a step.
        on_nonfinite: the train.nan_policy rule, called with the window sums after a call.
        profiler: also called before the first call and after the last one.
        stall_after_s: with data.service, a call that waits longer than this for batches
            ends the run (InputStalledError); None: calls are waited for as long as they take.
        require_held: asked once the calls end, before the stop's checkpoint and whatever
            the run writes after the loop: raises WorkdirLostError when the workdir's lease
            was taken over (which also voted the stop; trainer.loop.build).
    """

    loop_for: Callable[[int], Callable]
    batches_for: Callable[[int], object]
    schedule: Schedule
    actions: list[Action]
    progress: Progress
    profiler: Action
    votes: Votes
    clock: SaveClock
    global_batch: int
    on_nonfinite: Callable[[StepSums, int, int], None]
    save_on_stop: Action
    announce: Say = print
    stall_after_s: float | None = None
    require_held: Callable[[str], None] = lambda _doing: None

    def run(self, state: LoopState) -> Outcome:
        stop = StopRequest(self.votes.stop, announce=self.announce)
        speed, stopped = Speed(), False
        stop_at = tf.constant(_stop_at_step(), tf.int64)
        worker = ThreadPoolExecutor(1, thread_name_prefix="train-loop")
        try:
            with stop:
                self.profiler(state.step, state)
                # Leave only on the stop the workers agreed on inside the compiled call: a local
                # signal between two calls must not let one worker skip a call its peers make.
                while state.step < self.schedule.total_steps and not stopped:
                    stopped = self._one_call(worker, state, speed, stop_at)
                self.profiler(state.step, state)
                self.require_held(f"writing anything after step {state.step}")
                if stopped and state.step != state.saved_step:
                    self.save_on_stop(state.step, state)  # a second signal here still exits at once
        finally:
            worker.shutdown(wait=False)  # idle after every call, except one that stalled: not waited for
        stopped_by = None
        if stopped and state.step < self.schedule.total_steps:  # a late signal changes nothing
            stopped_by = state.stopped_by or stop.signal_name or self._why_stopped()
        return Outcome(state, speed.mean, stopped_by)

    def _one_call(self, worker: ThreadPoolExecutor, state: LoopState, speed: Speed, stop_at) -> bool:
        """One compiled call and the actions due after it; returns whether the workers stopped."""
        if not self.progress.in_epoch and not state.stopped_by:  # no epoch starts once an action stopped
            self.progress.start_epoch(state.step, state)
        call_end = self.schedule.call_end(state.step)
        tick = time.perf_counter()
        with self._save_vote():
            # The worker thread runs the compiled call; the main thread stays free to take signals.
            future = worker.submit(
                self.loop_for(state.step),
                self.batches_for(state.step),
                tf.constant(state.step, tf.int64),
                tf.constant(call_end - state.step),
                tf.constant(state.window_sums),
                stop_at,
            )
            new_sums, done, stopped, save_agreed = (t.numpy() for t in self._results(future, state))
        seconds = time.perf_counter() - tick
        if stopped and not done:
            return True
        state.epoch_sums = state.epoch_sums + new_sums - state.window_sums
        state.window_sums, state.window_seconds = new_sums, state.window_seconds + seconds
        state.previous, state.step = state.step, state.step + int(done)
        speed.add(int(done) * self.global_batch, seconds)
        state.images_per_second = speed.last
        self.on_nonfinite(StepSums.of(state.window_sums), state.step, state.saved_step)
        if state.step < call_end:  # stopped mid-call: the window's sums go into the checkpoint
            return bool(stopped)
        state.due = self.schedule.due(state.previous, state.step)
        state.save = state.due.save or bool(save_agreed)
        for action in self.actions:
            action(state.step, state)
        return bool(stopped)

    def _results(self, future: Future, state: LoopState):
        """The compiled call's results, or InputStalledError once it waited `stall_after_s`."""
        try:
            return future.result(timeout=self.stall_after_s)
        except CallTimeout:
            raise InputStalledError(
                f"no training batch came from the tf.data service for {self.stall_after_s:g} s "
                f"(data.service_timeout_s) in the call after step {state.step}: a service worker was "
                f"probably lost, with the steps it held; the last checkpoint is step {state.saved_step}. "
                "Check the workers (launch data serve --worker), then run the same command: it resumes there"
            ) from None

    @contextlib.contextmanager
    def _save_vote(self) -> Iterator[None]:
        """The chief's time-based vote: True now, or from the moment its time runs out."""
        left = self.clock.seconds_left()
        self.votes.save.assign(left == 0.0)
        timer = None
        if left:
            timer = threading.Timer(left, lambda: self.votes.save.assign(True))
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()

    def _why_stopped(self) -> str:
        if bool(self.votes.stop.numpy()):
            return STOP_AT_STEP_VARIABLE  # this worker's seam voted
        return "a stop on another worker"


def stop_on_nonfinite(policy: str, checkpoints: str, warn: Say):
    """train.nan_policy as a rule the controller applies after each call."""

    def check(sums: StepSums, step: int, saved_step: int) -> None:
        if not sums.nonfinite:
            return
        if policy == "stop":
            raise DivergedError(
                f"the loss became NaN or infinite at step {step}; stopped without saving. The last good checkpoint "
                f"is step {saved_step} in {checkpoints}. Lower optimizer.learning_rate, or set "
                "train.nan_policy=skip_step to skip such steps"
            )
        warn(f"Warning: skipped {int(sums.nonfinite)} step(s) with a non-finite loss before step {step}")

    return check


def _stop_at_step() -> int:
    value = os.environ.get(STOP_AT_STEP_VARIABLE, "")
    number = value.strip().removeprefix("-")
    return int(value) if files.digits(number) and len(number) <= 18 else -1
