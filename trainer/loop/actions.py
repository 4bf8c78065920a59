"""What happens between compiled calls, one small callable per side effect.

Each action is called as `action(step, state)` after every compiled call that reached
its planned end, in the order of the list `trainer.loop.build` makes; `state.due` (from
trainer.loop.schedule) says what is due at that step. To add "evaluate every N minutes"
or "save on SIGUSR1", write an action and put it in that list: the controller does not
change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from trainer import files, storage
from trainer.checkpoints import CheckpointStore
from trainer.config import TrainConfig
from trainer.console import Console, progress_bar
from trainer.evaluation import EvalMetrics, Evaluator
from trainer.loop.schedule import Due, SaveClock, Schedule
from trainer.monitoring import Monitor, misclassified_examples
from trainer.optim import averaged_weights, current_learning_rate, finalize_averaged_weights
from trainer.say import Say
from trainer.summaries import scalar_at
from trainer.sums import NUM_SUMS, StepSums


@dataclass
class Plateau:
    """Early stopping's count: the best evaluation accuracy so far, its step, and how many
    evaluations since brought no gain (-1.0 and -1: no evaluation yet)."""

    best_accuracy: float = -1.0
    best_step: int = -1
    without_gain: int = 0

    def values(self) -> np.ndarray:
        """As the checkpoint holds it: float64, which keeps the accuracy and the counts exact."""
        return np.array([self.best_accuracy, self.best_step, self.without_gain], np.float64)

    @classmethod
    def of(cls, values) -> Plateau:
        accuracy, step, count = (float(value) for value in np.asarray(values)[:3])
        return cls(accuracy, int(step), int(count))

    def after(self, accuracy: float, step: int, min_delta: float = 0.0) -> Plateau:
        """The count after an evaluation at `step`: a gain (a rise over the best by at least
        `min_delta`, and by something) starts it again, anything else adds one."""
        if accuracy > self.best_accuracy and accuracy - self.best_accuracy >= min_delta:
            return Plateau(accuracy, step, 0)
        return Plateau(self.best_accuracy, self.best_step, self.without_gain + 1)


@dataclass
class RatePlateau:
    """optimizer.schedule=plateau's state: its own count (as early stopping's, apart from it)
    and the scale the learning rate has been cut to (1.0: never cut)."""

    plateau: Plateau = field(default_factory=Plateau)
    scale: float = 1.0

    def values(self) -> np.ndarray:
        return np.append(self.plateau.values(), self.scale)

    @classmethod
    def of(cls, values) -> RatePlateau:
        return cls(Plateau.of(values), float(np.asarray(values)[3]))


@dataclass
class LoopState:
    """What the actions read and update; the controller advances `step` and `window`."""

    step: int
    window_sums: np.ndarray  # StepSums of the logging window in flight
    window_seconds: float = 0.0
    previous: int = 0  # where the last call started
    due: Due = field(default_factory=Due)
    save: bool = False  # due.save, or the workers agreed on a time-based save
    saved_step: int = 0
    last_eval: EvalMetrics | None = None
    single_view_accuracy: float | None = None
    best_step: int | None = None
    best_accuracy: float = -1.0
    epoch_sums: np.ndarray = field(default_factory=StepSums.zeros)
    images_per_second: float = 0.0
    plateau: Plateau = field(default_factory=Plateau)
    rate_plateau: RatePlateau = field(default_factory=RatePlateau)
    stopped_by: str | None = None  # EARLY_STOPPING once the early stopping rule ended the run


# The loop's part of every checkpoint, by its object name there. Checkpoints have always
# held the window's sums under this name (the store made the variable before #25): never
# rename it, or older checkpoints no longer restore.
WINDOW_SUMS = "window_sums"
# Early stopping's Plateau, since #28. Checkpoints written before lack it: the store
# restores them without it (CheckpointStore(optional=...)), and the count starts afresh.
PLATEAU = "early_stopping"
# optimizer.schedule=plateau's RatePlateau, since #28; written by every run, restored as PLATEAU is.
RATE_PLATEAU = "lr_plateau"
ADDED_LATER = frozenset({PLATEAU, RATE_PLATEAU})
# TrainResult.stopped_by of a run the early stopping rule ended: it finished as planned.
EARLY_STOPPING = "early_stopping"


def checkpointed_state() -> dict[str, tf.Variable]:
    """The variables the loop needs back on resume, for CheckpointStore(extra=...): the
    StepSums of the logging window in flight, so a resumed run logs the window's means as
    a straight run does, early stopping's count, so it counts on, and the plateau schedule's
    count and learning-rate scale. `checkpoint_values(state)` gives what each save writes to them."""
    return {
        WINDOW_SUMS: tf.Variable(tf.zeros([NUM_SUMS]), trainable=False, name=WINDOW_SUMS),
        PLATEAU: tf.Variable(Plateau().values(), trainable=False, name=PLATEAU),
        RATE_PLATEAU: tf.Variable(RatePlateau().values(), trainable=False, name=RATE_PLATEAU),
    }


def checkpoint_values(state: LoopState) -> dict[str, np.ndarray]:
    return {
        WINDOW_SUMS: state.window_sums,
        PLATEAU: state.plateau.values(),
        RATE_PLATEAU: state.rate_plateau.values(),
    }


def restored_window_sums(store: CheckpointStore) -> np.ndarray:
    """The window's sums as the store holds them: restored from a checkpoint, or zeros."""
    return np.asarray(store.extra[WINDOW_SUMS].numpy(), np.float32)


def restored_best(store: CheckpointStore, eval_logdir: str, warn: Say) -> tuple[int | None, float]:
    """(step, accuracy) of the kept best checkpoint, for `EvaluateAndKeepBest`; a lost best.json is rebuilt.

    Its accuracy is read back from the eval curve (`eval_logdir`) at that step; if the
    curve lacks it too, the next evaluation replaces the best checkpoint. Only a worker
    that saves into the store's own folder (the chief) writes the rebuilt best.json.
    """
    record = store.best_record
    if record is None:
        return None, -1.0
    if record["accuracy"] is not None:
        return record["step"], record["accuracy"]
    step = record["step"]
    accuracy = scalar_at(eval_logdir, "accuracy", step)
    known = "unknown" if accuracy is None else f"{accuracy:.2%}, from TensorBoard's eval curve"
    where = storage.join(store.best_directory, f"ckpt-{step}")
    warn(f"Warning: best.json rebuilt for {where} (accuracy {known})")
    if accuracy is None:
        return step, -1.0
    if store.save_directory == store.directory:
        files.write_json(storage.join(store.best_directory, "best.json"), {"step": step, "accuracy": accuracy})
    return step, accuracy


def resumed_state(store: CheckpointStore, step: int, eval_logdir: str, warn: Say) -> LoopState:
    """The loop's state at `step` as the store restored it (or fresh): the logging window in
    flight and the best checkpoint so far, so a resumed run continues both as a straight run."""
    best_step, best_accuracy = restored_best(store, eval_logdir, warn)
    return LoopState(
        step=step,
        window_sums=restored_window_sums(store),
        saved_step=step,
        best_step=best_step,
        best_accuracy=best_accuracy,
        plateau=Plateau.of(store.extra[PLATEAU].numpy()),
        rate_plateau=RatePlateau.of(store.extra[RATE_PLATEAU].numpy()),
    )


def stopped_early(store: CheckpointStore, train: TrainConfig) -> str | None:
    """What a resumed run says when the checkpoint it restored had already stopped early
    (its count reached train.early_stopping_patience), or None."""
    plateau = Plateau.of(store.extra[PLATEAU].numpy())
    if not train.early_stopping_patience or plateau.without_gain < train.early_stopping_patience:
        return None
    return (
        f"Already stopped early at step {int(store.step.numpy())}: {_no_gain(plateau, train.early_stopping_min_delta)}"
        "; nothing to do (raise train.early_stopping_patience or set it to 0 to train on, or use --fresh)"
    )


def _no_gain(plateau: Plateau, min_delta: float) -> str:
    gain = f" of >= {min_delta:.2%}" if min_delta else ""
    evaluations = "evaluation" if plateau.without_gain == 1 else f"{plateau.without_gain} evaluations"
    return (
        f"no accuracy gain{gain} in the last {evaluations} "
        f"(best {plateau.best_accuracy:.2%} at step {plateau.best_step})"
    )


class LogScalars:
    """Training scalars of the logging window (means, LR, speed, MFU), then a new window."""

    def __init__(self, monitor: Monitor, optimizer, schedule: Schedule, global_batch: int, flops_per_step, peak):
        self.monitor, self.optimizer, self.schedule = monitor, optimizer, schedule
        self.global_batch, self.flops_per_step, self.peak = global_batch, flops_per_step, peak

    def __call__(self, step: int, state: LoopState) -> None:
        if not state.due.log:
            return
        sums, seconds = StepSums.of(state.window_sums), state.window_seconds
        steps = max(sums.steps, 1.0)
        extra = {
            "learning_rate": current_learning_rate(self.optimizer),
            "images_per_second": steps * self.global_batch / seconds if seconds else 0.0,
            "step_time_seconds": seconds / steps,
            "examples_seen": float(step * self.global_batch),
            "epoch": step / self.schedule.per_epoch,
        }
        scale = getattr(self.optimizer, "dynamic_scale", None)
        if scale is not None:
            extra["loss_scale"] = float(scale.numpy())
        if self.peak and seconds:
            extra["model_flops_utilization"] = self.flops_per_step * steps / seconds / self.peak
        self.monitor.log_train(step, sums, extra)
        state.window_sums, state.window_seconds = StepSums.zeros(), 0.0


class Histograms:
    """Weight and activation histograms every tensorboard.histogram_every_steps."""

    def __init__(self, monitor: Monitor, model, probe: np.ndarray) -> None:
        self.monitor, self.model, self.probe = monitor, model, probe

    def __call__(self, step: int, state: LoopState) -> None:
        if state.due.histograms:
            self.monitor.log_histograms(step, self.model, self.probe)


class Progress:
    """The epoch's progress bar (chief only); "Epoch e/E" lines come from the controller."""

    def __init__(self, console: Console, schedule: Schedule) -> None:
        self.console, self.schedule, self.bar, self.epoch_start = console, schedule, None, 0

    def start_epoch(self, step: int, state: LoopState) -> None:
        epoch = self.schedule.epoch_of(step)
        self.console.info(f"Epoch {epoch + 1}/{self.schedule.epochs}")
        self.bar = progress_bar(self.schedule.steps_in_epoch(epoch), self.console)
        self.epoch_start, state.epoch_sums = epoch * self.schedule.per_epoch, StepSums.zeros()

    @property
    def in_epoch(self) -> bool:
        return self.bar is not None

    def __call__(self, step: int, state: LoopState) -> None:
        sums = StepSums.of(state.epoch_sums)
        if sums.examples and self.bar is not None:
            self.bar.update(
                step - self.epoch_start,
                values=[
                    ("loss", sums.loss / sums.examples),
                    ("accuracy", sums.correct / sums.examples),
                    ("img/s", round(state.images_per_second)),
                ],
            )
        if state.due.epoch_end:
            self.bar = None


class FinalizeAveragedWeights:
    """At the schedule's last step the averaged weights (optimizer.ema_momentum) become the
    model's. Not at a train.max_steps cut: that run resumes later, from the live weights."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def __call__(self, step: int, state: LoopState) -> None:
        if state.due.finalize:
            finalize_averaged_weights(self.model, self.optimizer)


class EvaluateAndKeepBest:
    """Test-set evaluation (averaged weights if any), keep-best, and TTA at the end."""

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    def __call__(self, step: int, state: LoopState) -> None:
        if not state.due.evaluate:
            return
        ctx = self.ctx
        with averaged_weights(ctx.model, ctx.optimizer):
            state.last_eval = self._evaluate(step)
            if state.save and ctx.keep_best and state.last_eval.accuracy > state.best_accuracy:
                state.best_accuracy, state.best_step = state.last_eval.accuracy, step
                ctx.store.save_best(step, step // ctx.per_epoch, state.last_eval.accuracy, checkpoint_values(state))
            if state.due.final and ctx.tta != "none":
                state.single_view_accuracy = state.last_eval.accuracy
                state.last_eval = self._evaluate_tta(step)

    def _evaluate(self, step: int) -> EvalMetrics:
        ctx, tick = self.ctx, time.perf_counter()
        metrics = ctx.evaluator(step)
        misclassified = None
        if ctx.images_for_misclassified is not None:
            images, labels = ctx.images_for_misclassified
            misclassified = misclassified_examples(ctx.model, images, labels, ctx.class_names)
        ctx.monitor.log_eval(step, metrics, misclassified)
        ctx.console.info(
            f"Eval at step {step}: accuracy {metrics.accuracy:.2%}, loss {metrics.loss:.4f} "
            f"({metrics.examples} images, {time.perf_counter() - tick:.1f}s)"
        )
        return metrics

    def _evaluate_tta(self, step: int) -> EvalMetrics:
        """The final score with test-time augmentation; the single view stays on the curve."""
        ctx, tick = self.ctx, time.perf_counter()
        metrics = ctx.evaluator(step, tta=ctx.tta)
        ctx.monitor.log_tta(step, metrics, ctx.tta)
        ctx.console.info(
            f"Eval at step {step} with eval.tta={ctx.tta}: accuracy {metrics.accuracy:.2%}, "
            f"loss {metrics.loss:.4f} ({time.perf_counter() - tick:.1f}s)"
        )
        return metrics


@dataclass
class EvalContext:
    """What an evaluation needs: the model, where its results go, the best-keeping rule."""

    model: object
    optimizer: object
    evaluator: Evaluator
    monitor: Monitor
    store: CheckpointStore
    console: Console
    class_names: list[str]
    per_epoch: int
    keep_best: bool
    tta: str
    images_for_misclassified: tuple[np.ndarray, np.ndarray] | None


class EarlyStopping:
    """train.early_stopping_patience: `patience` evaluations in a row without a gain end the run.

    A gain is an accuracy above the best so far by at least `min_delta` (and by something:
    an equal accuracy is no gain). Runs after the evaluation and before SaveCheckpoint, so
    the checkpoint of that step holds the count and a resumed run counts on; it stops
    through the workers' stop vote (trainer.loop.step.Votes), which every worker agrees on
    before the next step, as on a signal. Not at the run's last step: the run ends there
    anyway. `announce`, after the save, says why the run ended.
    """

    def __init__(self, train: TrainConfig, total_steps: int, stop_vote: tf.Variable, store: CheckpointStore, say: Say):
        self.patience, self.min_delta = train.early_stopping_patience, train.early_stopping_min_delta
        self.total_steps, self.stop_vote, self.store, self.say = total_steps, stop_vote, store, say

    def __call__(self, step: int, state: LoopState) -> None:
        if not state.due.evaluate or state.last_eval is None:
            return
        state.plateau = state.plateau.after(single_view_accuracy(state), step, self.min_delta)
        if state.plateau.without_gain >= self.patience and step < self.total_steps:
            state.stopped_by, state.save = EARLY_STOPPING, True
            self.stop_vote.assign(True)

    def announce(self, step: int, state: LoopState) -> None:
        if state.stopped_by == EARLY_STOPPING and state.saved_step == step:
            self.store.wait_for_uploads()  # "saved" only once it is in the workdir
            self.say(
                f"Early stopping at step {step} of {self.total_steps}: "
                f"{_no_gain(state.plateau, self.min_delta)}; checkpoint saved"
            )


def single_view_accuracy(state: LoopState) -> float:
    """The last evaluation's accuracy, single view (the final one's before eval.tta replaced it)."""
    single_view = state.single_view_accuracy
    return state.last_eval.accuracy if single_view is None else single_view


class SaveCheckpoint:
    """A checkpoint when due by step or epoch, or when the workers agreed on a timed save."""

    def __init__(self, store: CheckpointStore, per_epoch: int, clock: SaveClock, always: bool = False) -> None:
        """`always`: save whatever is due (the save a stop ends with)."""
        self.store, self.per_epoch, self.clock, self.always = store, per_epoch, clock, always

    def __call__(self, step: int, state: LoopState) -> None:
        if state.save or self.always:
            self.store.save(step, step // self.per_epoch, checkpoint_values(state))
            state.saved_step = step
            self.clock.saved()


class Profiler:
    """Starts and stops the profiler exactly at tensorboard.profile_steps' START and END."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def __call__(self, step: int, state: LoopState) -> None:
        self.monitor.update_profiler(step)
