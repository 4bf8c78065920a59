"""The user's own actions (`train.actions`): a read-only look at the run at every logging window.

Each entry of train.actions names a factory by import path (trainer.user_code). When the
loop starts, on the chief only (one call per run, not per worker), each factory is called
once with a `RunInfo`; what it returns is the action, called as `action(step, metrics)`
with `StepMetrics` at every logging window (tensorboard.every_steps, else every
train.steps_per_loop steps, and at every epoch end), after that window's evaluation and
checkpoint. Never at a stop: the window in flight goes into the checkpoint, and the
resumed run calls the action where a straight run would have.

An action sees numbers and a copy of the config, never the model, the optimizer or the
loop's state: it cannot change what is trained, so a resume stays exact whatever it does.
An exception in a factory or an action (sys.exit() included) stops the run with a
ConfigError naming it and the place in its code; the checkpoints already saved are kept,
and the same command resumes once it is fixed. A stop signal (SIGTERM, Ctrl-C) while an
action runs ends the action at once (one that sleeps or waits included), and the run stops
after this step with a checkpoint, as anywhere else. With no train.actions nothing here
runs: the loop is as it was.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from trainer.config import Config
from trainer.errors import ConfigError, TrainerError
from trainer.loop.actions import LoopState
from trainer.optim import current_learning_rate
from trainer.signals import STOP_SIGNALS, SignalRaised
from trainer.sums import StepSums
from trainer.user_code import failure, resolve


@dataclass(frozen=True)
class RunInfo:
    """What a factory is told once, when the loop starts."""

    config: Config  # a copy: changing it changes nothing
    workdir: str
    start_step: int  # 0, or the step a resumed run starts from
    total_steps: int  # where this run ends (train.epochs, or train.max_steps)
    steps_per_epoch: int


@dataclass(frozen=True)
class StepMetrics:
    """The run at the end of a logging window: plain numbers, the same TensorBoard logs."""

    step: int  # global step
    epoch: float  # step / steps per epoch
    loss: float  # the window's mean training loss (TensorBoard's train/loss)
    accuracy: float  # the window's training accuracy
    learning_rate: float  # now, after the window's last step
    gradient_norm: float  # the window's mean global gradient norm
    images_per_second: float  # over the window
    eval_accuracy: float | None  # the test-set evaluation at this step (epoch ends), else None
    eval_loss: float | None
    final: bool  # the last step of this run


Action = Callable[[int, StepMetrics], None]
# What user code raises that is not an Exception: its own sys.exit() or KeyboardInterrupt (a
# real Ctrl-C is the run's stop signal while actions run, and reaches them as SignalRaised).
_USER_EXITS = (Exception, SystemExit, KeyboardInterrupt)


class WindowSnapshot:
    """The logging window's sums as they are before LogScalars starts a new window: put
    first in the list, it keeps them for `UserActions`, which runs last."""

    def __init__(self) -> None:
        self.sums, self.seconds = StepSums.of(StepSums.zeros()), 0.0

    def __call__(self, step: int, state: LoopState) -> None:
        if state.due.log:
            self.sums, self.seconds = StepSums.of(state.window_sums), state.window_seconds


class UserActions:
    """Calls each user action, in train.actions' order, at every logging window."""

    def __init__(
        self, named: list[tuple[str, Action]], window: WindowSnapshot, optimizer, per_epoch: int, global_batch: int
    ) -> None:
        self.named, self.window, self.optimizer = named, window, optimizer
        self.per_epoch, self.global_batch = per_epoch, global_batch

    def __call__(self, step: int, state: LoopState) -> None:
        if not state.due.log:
            return
        metrics = self.metrics(step, state)
        try:
            with _signals_end_actions():
                for index, (path, action) in enumerate(self.named):
                    _call(index, (path, action), step, metrics, state.saved_step)
        except SignalRaised:
            # The run's own handler took the signal first: the loop stops after this step with a
            # checkpoint, as it does on a signal anywhere else; the window's other actions are skipped.
            return

    def metrics(self, step: int, state: LoopState) -> StepMetrics:
        sums, seconds = self.window.sums, self.window.seconds
        examples, steps = max(sums.examples, 1.0), max(sums.steps, 1.0)
        evaluation = state.last_eval if state.due.evaluate else None
        return StepMetrics(
            step=step,
            epoch=step / self.per_epoch,
            loss=sums.loss / examples,
            accuracy=sums.correct / examples,
            learning_rate=current_learning_rate(self.optimizer),
            gradient_norm=sums.gradient_norm / steps,
            images_per_second=sums.steps * self.global_batch / seconds if seconds else 0.0,
            eval_accuracy=None if evaluation is None else evaluation.accuracy,
            eval_loss=None if evaluation is None else evaluation.loss,
            final=state.due.final,
        )


def _call(index: int, named: tuple[str, Action], step: int, metrics: StepMetrics, saved_step: int) -> None:
    path, action = named
    try:
        action(step, metrics)
    except (TrainerError, SignalRaised):
        raise
    except _USER_EXITS as err:  # the user's code, whatever it raises: named, with its place
        raise ConfigError(
            f"train.actions[{index}]={path} raised {failure(err)} at step {step}; the run stopped there "
            f"({f'its last checkpoint is step {saved_step}' if saved_step else 'no checkpoint saved yet'}): "
            "fix the action, or remove it from train.actions, and run the same command to resume"
        ) from err


@contextlib.contextmanager
def _signals_end_actions() -> Iterator[None]:
    """While the actions run, a stop signal first does what the run's handler does (stop after
    this step with a checkpoint; a second one exits at once), then raises SignalRaised where
    the main thread is: an action that sleeps or waits on something ends there, instead of
    holding the run (and its signal) until it returns. Only over Python handlers (the run's):
    a default or ignored signal stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: handler for sig in STOP_SIGNALS if callable(handler := signal.getsignal(sig))}

    def handler(signum: int, frame) -> None:
        previous[signum](signum, frame)
        raise SignalRaised(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def made_actions(paths: list[str], info: RunInfo) -> list[tuple[str, Action]]:
    """(path, action) of each train.actions entry: resolved, its factory called with `info`."""
    named = []
    for index, path in enumerate(paths):
        key = f"train.actions[{index}]"
        factory = resolve(path, key)
        try:
            action = factory(replace(info, config=copy.deepcopy(info.config)))
        except TrainerError:
            raise
        except (Exception, SystemExit) as err:  # the user's code, whatever it raises: named, with its place
            raise ConfigError(f"{key}={path} raised {failure(err)} when called to make the action") from err
        if not callable(action):
            raise ConfigError(
                f"{key}={path} returned {type(action).__name__}, not an action; the factory returns a function "
                "called as action(step, metrics)"
            )
        named.append((path, action))
    return named
