"""The training loop: a compiled multi-step function and a Python controller around it.

The compiled part (`strategy.run` in a `tf.function`, up to `steps_per_loop` steps per
call) does the maths on every replica. The controller decides when: progress,
TensorBoard, evaluation and checkpoints happen between calls, at global steps that do
not depend on where a run was interrupted (logging windows end at multiples of
`steps_per_loop`, epoch ends and `checkpoint.every_steps`). So training "up to step N"
gives the same weights and the same logged points whether it ran in one go or was
stopped and resumed.

Keras 3 `model.fit` is not used: it fails under MultiWorkerMirroredStrategy and with
`steps_per_execution>1` under MirroredStrategy.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer import files
from trainer.checkpoints import CheckpointStore
from trainer.config import Config, config_differences, save_config
from trainer.data import Dataset, load_dataset
from trainer.data.device import DeviceFeed, resolve_placement
from trainer.data.pipeline import (
    augment_first,
    check_batch_divides,
    input_spec,
    normalization_stats,
    steps_per_epoch,
    train_dataset_fn,
)
from trainer.errors import CheckpointMismatchError, DivergedError, TrainerError
from trainer.evaluation import EvalMetrics, Evaluator, per_example_loss
from trainer.files import describe_write_error, is_write_failure
from trainer.flops import peak_flops, training_flops_per_example
from trainer.models import build_for_dataset, init_from_data
from trainer.monitoring import (
    CORRECT,
    COUNT,
    LOSS,
    NONFINITE,
    NUM_SUMS,
    STEPS,
    Monitor,
    misclassified_examples,
)
from trainer.optim import (
    Lookahead,
    averaged_weights,
    build_lookahead,
    build_optimizer,
    current_learning_rate,
    finalize_averaged_weights,
    gradient_multipliers,
)
from trainer.preemption import EXIT_PREEMPTED, StopRequest
from trainer.runtime import Runtime, setup_runtime
from trainer.summaries import drop_events_after, scalar_at
from trainer.workdir import DatasetInfo, Workdir

Echo = Callable[[str], None]


@dataclass
class TrainResult:
    step: int
    total_steps: int
    seconds: float
    images_per_second: float
    final_eval: EvalMetrics | None
    workdir: Path
    stopped_by: str | None = None  # "SIGTERM"/"SIGINT" when interrupted before the end

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.stopped_by else 0


def train(
    config: Config,
    workdir: str | Path,
    *,
    fresh: bool = False,
    echo: Echo = print,
    resume_command: str | None = None,
) -> TrainResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint unless `fresh`.

    Nothing on disk changes before the workdir, the config, the data and the model are
    known to be usable: a folder that `launch train` did not create is refused, the data
    is read and the model built first, and config.yaml/dataset.json are written only
    once the checkpoint (if any) has been restored.

    Args:
        resume_command: shown when the run is interrupted, so the user can resume.
    """
    started = time.perf_counter()
    wd = Workdir(Path(workdir))
    runtime = setup_runtime(config.runtime)
    if not runtime.is_chief:
        echo = _worker_echo(echo)
    if runtime.is_chief:
        wd.check_trainable(fresh)
        wd.check_not_busy()
    echo(f"Strategy: {runtime.reason}; {runtime.num_replicas} replica(s)")
    try:
        result = _train(config, wd, runtime, fresh, echo, resume_command, started)
    except (OSError, tf.errors.OpError) as err:
        if not is_write_failure(err):
            raise
        raise describe_write_error(err, wd.root) from err
    if not runtime.is_chief:
        shutil.rmtree(wd.worker_temp(runtime.worker_index), ignore_errors=True)
        with contextlib.suppress(OSError):
            wd.worker_temp(runtime.worker_index).parent.rmdir()  # only once the last worker left it
    return result


@dataclass
class _Parts:
    """What a run trains: built before the workdir is touched."""

    dataset: Dataset
    info: DatasetInfo
    per_epoch: int
    total_steps: int
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    lookahead: Lookahead | None


def _prepare(config: Config, runtime: Runtime, echo: Echo, started: float) -> _Parts:
    """Data, schedule length, model and optimizer: every check that needs no disk write."""
    check_batch_divides(config.data.batch_size, runtime.num_replicas)
    keras.utils.set_random_seed(config.seed)  # weight initialisation
    dataset = load_dataset(config.data, config.seed)
    echo(
        f"Data: {dataset.origin}: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{len(dataset.class_names)} classes ({time.perf_counter() - started:.1f}s)"
    )
    info = _dataset_info(dataset)
    if runtime.device_kind == "tpu" and config.train.steps_per_loop < 50:
        echo(
            f"Warning: train.steps_per_loop={config.train.steps_per_loop} is small for a TPU, where host round "
            "trips dominate; use 100 or more (or one epoch)"
        )
    per_epoch = steps_per_epoch(len(dataset.train), config.data.batch_size)
    total_steps = config.train.epochs * per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    with runtime.strategy.scope():
        model = build_for_dataset(config.model, info)
        optimizer = build_optimizer(
            config.optimizer,
            per_epoch,
            config.train.epochs * per_epoch,
            loss_scaling=runtime.loss_scaling,
            skip_nonfinite=config.train.nan_policy == "skip_step",
        )
        optimizer.build(model.trainable_variables)
        if init_from_data(model, dataset.train.images, info.mean, info.std):
            echo("Whitening layer initialised from the training images' 2x2 patch covariance")
        # Over the whole schedule, as the LR: a run cut short by max_steps resumes identically.
        lookahead = build_lookahead(model, config.optimizer, per_epoch, config.train.epochs * per_epoch)
    return _Parts(dataset, info, per_epoch, total_steps, model, optimizer, lookahead)


def _train(
    config: Config,
    wd: Workdir,
    runtime: Runtime,
    fresh: bool,
    echo: Echo,
    resume_command: str | None,
    started: float,
) -> TrainResult:
    parts = _prepare(config, runtime, echo, started)
    store = CheckpointStore(
        wd.checkpoints,
        model=parts.model,
        optimizer=parts.optimizer,
        keep=config.checkpoint.keep,
        num_replicas=runtime.num_replicas,
        # TF needs every worker to save; the others write to a scratch folder.
        save_directory=None if runtime.is_chief else wd.worker_temp(runtime.worker_index) / "checkpoints",
        extra={"lookahead": parts.lookahead.state} if parts.lookahead else None,
        warn=echo,
    )
    # Only the chief writes the workdir; the other workers read its checkpoints.
    with wd.locked() if runtime.is_chief else contextlib.nullcontext():
        if runtime.is_chief:
            _claim_workdir(wd, fresh, echo)
        _barrier(runtime, "start")  # nobody restores before the chief has cleared
        result = _resume_and_run(config, wd, runtime, parts, store, echo, resume_command, started)
        _barrier(runtime, "end")  # nobody leaves while a peer may still pull data from it
    return result


def _claim_workdir(wd: Workdir, fresh: bool, echo: Echo) -> None:
    if fresh:
        removed = wd.clear_training_state()
        if removed:
            echo(f"--fresh: removed {len(removed)} checkpoint, TensorBoard and metrics file(s) of earlier runs")
    wd.claim()


def _resume_and_run(
    config: Config,
    wd: Workdir,
    runtime: Runtime,
    parts: _Parts,
    store: CheckpointStore,
    echo: Echo,
    resume_command: str | None,
    started: float,
) -> TrainResult:
    per_epoch, total_steps = parts.per_epoch, parts.total_steps
    start_step = _restore_latest(store, wd, config, echo)
    if runtime.is_chief:  # the run is known to start (or to be complete): record what it is
        save_config(config, wd.config_path)
        wd.write_dataset_info(parts.info)
    if store.restored_path:
        _announce_resume(store, start_step, per_epoch, runtime.num_replicas, config.data.batch_size, echo)
        if runtime.is_chief:
            drop_events_after(wd.tensorboard, start_step, warn=echo)
    if start_step >= total_steps:
        echo(
            f"Already trained to step {start_step} of {total_steps}; nothing to do (raise train.epochs or use --fresh)"
        )
        return TrainResult(start_step, total_steps, 0.0, 0.0, None, wd.root)

    loop = TrainingLoop(
        config,
        runtime,
        parts.model,
        parts.optimizer,
        parts.dataset,
        per_epoch,
        total_steps,
        wd,
        store,
        echo,
        lookahead=parts.lookahead,
    )
    result = loop.run(start_step, store.window_sums.numpy(), started)
    if result.stopped_by:
        how = f"resume with: {resume_command}" if resume_command else "run the same command to resume"
        echo(
            f"Stopped by {result.stopped_by} at step {result.step} of {total_steps} "
            f"(epoch {result.step // per_epoch + 1}); checkpoint saved in {wd.checkpoints}; {how}"
        )
    return result


def _restore_latest(store: CheckpointStore, wd: Workdir, config: Config, echo: Echo) -> int:
    """The step to start from; a checkpoint of another model is refused, not skipped."""
    try:
        return store.restore("latest", warn=echo) or 0
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(
            f"{wd.root} holds a run this config cannot continue: {err}. {_config_change(wd, config)} "
            "Nothing was changed. Use --fresh to start over in this workdir (it deletes its checkpoints), "
            "or choose another --workdir"
        ) from err


def _config_change(wd: Workdir, config: Config) -> str:
    """Which keys differ between the workdir's config.yaml and this run's, in one sentence."""
    try:
        saved = wd.require_config()
    except TrainerError:
        return "Its config.yaml is missing or unreadable, so what changed is unknown."
    changes = config_differences(saved, config)
    if not changes:
        return "config.yaml names the same settings (was it trained by another version?)."
    shown = ", ".join(f"{key} {before} -> {after}" for key, before, after in changes[:4])
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    return f"Changed since config.yaml: {shown}{more}."


def _barrier(runtime: Runtime, name: str) -> None:
    """Wait until every worker got here; a no-op for one worker.

    This goes through TensorFlow's coordination service (the chief answers every
    worker), not a collective: a worker that leaves right after its last collective can
    take away data a slower peer has not pulled yet, which aborts the peer.
    """
    if runtime.num_workers > 1:
        from tensorflow.python.eager import context  # no public API for the coordination service yet

        context.context().wait_at_barrier(f"trainer_{name}", timeout_in_ms=30 * 60 * 1000)


def _worker_echo(echo: Echo) -> Echo:
    """Non-chief workers report only what differs from the chief: warnings and stops."""
    return lambda line: echo(line) if line.startswith(("Strategy", "Warning", "Stopped")) else None


def _announce_resume(store: CheckpointStore, step: int, per_epoch: int, replicas: int, batch: int, echo: Echo) -> None:
    echo(
        f"Resuming from {store.restored_path} at step {step} (epoch {step // per_epoch + 1}, "
        f"step {step % per_epoch}/{per_epoch} of it); use --fresh to start over"
    )
    if store.restored_replicas and store.restored_replicas != replicas:
        echo(
            f"The checkpoint was written with {store.restored_replicas} replica(s), this run has {replicas}; "
            f"the global batch stays {batch}, so training continues on the same data stream"
        )


def _dataset_info(dataset: Dataset) -> DatasetInfo:
    mean, std = normalization_stats(dataset.train.images)
    return DatasetInfo(
        class_names=list(dataset.class_names),
        image_shape=list(dataset.image_shape),
        mean=mean,
        std=std,
        origin=dataset.origin,
    )


def make_train_loop(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    *,
    global_batch: int,
    num_classes: int,
    label_smoothing: float,
    stop_flag: tf.Variable,
    stop_on_nonfinite: bool = True,
    check_gradients: bool = True,
    jit_compile: bool = False,
    gradient_multipliers: list[float] | None = None,
    lookahead: Lookahead | None = None,
    device_feed: DeviceFeed | None = None,
):
    """A compiled function: `train_loop(batches, num_steps, sums) -> (sums, steps_done, stopped)`.

    `batches` is a distributed iterator, or with `device_feed` (data.placement=device) the
    feed's `plan(step)` for the call's first step.

    `sums` ([loss, correct, examples, non-finite steps, gradient norm, steps]; see
    trainer.monitoring for the indices) is carried in and out so that a
    logging window split over two calls (an interruption) adds up exactly as in one.
    The loop ends early when `stop_flag` is set on any worker (all workers agree, so
    their collectives stay in step), or after a non-finite step if `stop_on_nonfinite`:
    a NaN/Inf loss, or NaN/Inf gradients where `check_gradients` (off under float16 loss
    scaling, whose optimizer skips such steps by design). With `jit_compile` the
    forward and backward pass is compiled by XLA; the optimizer update and its
    cross-replica reduction stay outside the compiled cluster. `gradient_multipliers`
    (one per trainable variable) scale gradients before the update: per-variable learning
    rates (see trainer.optim.gradient_multipliers). `lookahead` runs after every step.
    """

    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = model(tf.cast(images, tf.float32), training=True)
            losses = per_example_loss(labels, logits, num_classes, label_smoothing)
            # Divide by the GLOBAL batch: the optimizer sums gradients over replicas.
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled_loss = optimizer.scale_loss(loss)  # identity unless LossScaleOptimizer
        return tape.gradient(scaled_loss, model.trainable_variables), losses, logits

    compute = tf.function(forward_backward, jit_compile=True) if jit_compile else forward_backward

    def loss_scale():
        scale = getattr(optimizer, "dynamic_scale", None)  # LossScaleOptimizer only
        return tf.cast(scale, tf.float32) if scale is not None else 1.0

    def train_step(images, labels):
        gradients, losses, logits = compute(images, labels)
        updates = gradients
        if gradient_multipliers is not None:
            updates = [g if k == 1.0 else g * k for g, k in zip(gradients, gradient_multipliers)]
        # A non-finite step is stopped on (controller) or skipped (LossScaleOptimizer).
        optimizer.apply_gradients(zip(updates, model.trainable_variables))
        context = tf.distribute.get_replica_context()
        local_bad = tf.stack(
            [
                tf.cast(~tf.reduce_all(tf.math.is_finite(losses)), tf.float32),
                tf.cast(~tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients]), tf.float32),
            ]
        )
        # Every replica must agree on the verdict, as the optimizer does on the update.
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, local_bad) > 0
        bad_loss = bad[0]
        # Overflowing float16 gradients are routine under loss scaling: not a divergence.
        flagged = bad_loss | (bad[1] & check_gradients)
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        # Norm of this replica's (unscaled) gradient; summed over replicas below, which is
        # exact for one replica and an upper bound of the global gradient's norm for several.
        grad_norm = tf.linalg.global_norm(gradients) / loss_scale()
        once = 1.0 / context.num_replicas_in_sync  # summed over replicas: counts the step once
        sums = [
            tf.where(bad_loss, 0.0, tf.reduce_sum(losses)),
            tf.where(bad_loss, 0.0, tf.reduce_sum(tf.cast(correct, tf.float32))),
            tf.where(bad_loss, 0.0, tf.cast(tf.size(labels), tf.float32)),
            tf.cast(flagged, tf.float32) * once,
            tf.where(bad[1], 0.0, grad_norm),
            tf.constant(once),
        ]
        return tf.stack(sums)

    def agreed_stop():
        """True on every worker as soon as any worker was asked to stop."""
        requested = strategy.run(lambda: tf.cast(stop_flag.read_value(), tf.float32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, requested, axis=None) > 0

    def run_step(batches, steps_done):
        if device_feed is not None:
            return device_feed.run(strategy, train_step, batches, steps_done)
        return strategy.run(train_step, args=next(batches))

    @tf.function
    def train_loop(batches, num_steps, sums):
        steps = tf.constant(0)
        diverged = tf.constant(False)
        stopped = agreed_stop()
        while steps < num_steps and not stopped and not diverged:
            per_replica = run_step(batches, steps)
            if lookahead is not None:
                lookahead.after_step(optimizer.iterations)
            step_sums = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            sums += step_sums
            steps += 1
            if stop_on_nonfinite:
                diverged = step_sums[NONFINITE] > 0
            stopped = agreed_stop()
        return sums, steps, stopped

    return train_loop


class TrainingLoop:
    """The controller: owns when to log, evaluate, checkpoint and profile, and how to stop."""

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        model,
        optimizer,
        dataset: Dataset,
        per_epoch: int,
        total_steps: int,
        wd: Workdir,
        store: CheckpointStore,
        echo: Echo,
        lookahead: Lookahead | None = None,
    ) -> None:
        self.config, self.runtime, self.model, self.optimizer = config, runtime, model, optimizer
        self.per_epoch, self.total_steps, self.wd, self.store, self.echo = per_epoch, total_steps, wd, store, echo
        self.global_batch = config.data.batch_size
        self.stop = StopRequest()
        self.device_feed = self._device_feed(dataset)
        self.train_loop = make_train_loop(
            runtime.strategy,
            model,
            optimizer,
            global_batch=self.global_batch,
            num_classes=len(dataset.class_names),
            label_smoothing=config.optimizer.label_smoothing,
            stop_flag=self.stop.flag,
            stop_on_nonfinite=config.train.nan_policy == "stop",
            check_gradients=not runtime.loss_scaling,
            jit_compile=runtime.jit_compile,
            gradient_multipliers=gradient_multipliers(model.trainable_variables, config.optimizer),
            lookahead=lookahead,
            device_feed=self.device_feed,
        )
        self.dataset = dataset
        self.evaluator = Evaluator(
            runtime.strategy, model, dataset.test, self.global_batch, dataset.class_names, runtime.jit_compile
        )
        self.single_view_accuracy: float | None = None
        self.monitor = Monitor(config, wd.tensorboard, runtime.is_chief, list(dataset.class_names))
        self.log_every = config.tensorboard.every_steps or config.train.steps_per_loop
        self.flops_per_step = training_flops_per_example(model) * self.global_batch
        self.peak = peak_flops(_accelerator_names(runtime), runtime.precision)
        self.best_step, self.best_accuracy = _best_so_far(store, wd, echo)

    def _device_feed(self, dataset: Dataset) -> DeviceFeed | None:
        """The training set on the devices when data.placement resolves to "device", else None."""
        train = dataset.train
        if resolve_placement(self.config.data.placement, self.runtime.device_kind, train.images) == "host":
            self.echo("Input: tf.data pipeline on the host")
            return None
        feed = DeviceFeed(self.runtime.strategy, train.images, train.labels, input_spec(self.config))
        self.echo(
            f"Input: the training set is kept on each replica's device ({feed.bytes_per_replica / 2**20:.0f} MiB "
            "each); batches are gathered and augmented there"
        )
        return feed

    def _batches(self, iterator, step: int):
        """The compiled call's `batches` argument for a call starting at `step`."""
        return self.device_feed.plan(step) if self.device_feed else iterator

    def _iterator(self, start_step: int):
        if self.device_feed:
            return None
        spec = input_spec(self.config)
        fn = train_dataset_fn(self.dataset.train.images, self.dataset.train.labels, spec, start_step, self.total_steps)
        return iter(self.runtime.strategy.distribute_datasets_from_function(fn))

    def _call_end(self, step: int) -> int:
        """Where the compiled call starting at `step` ends; independent of restarts."""
        spl = self.config.train.steps_per_loop
        stops = [self.total_steps, (step // self.per_epoch + 1) * self.per_epoch, (step // spl + 1) * spl]
        every = self.config.checkpoint.every_steps
        if every:
            stops.append((step // every + 1) * every)
        stops += [boundary for boundary in self.monitor.profile_boundaries() if boundary > step]
        return min(stops)

    def run(self, start_step: int, window_sums: np.ndarray, started: float) -> TrainResult:
        iterator = self._iterator(start_step)
        self._start_monitor(start_step)
        step, last_eval, saved_step = start_step, None, start_step
        last_save_time = time.monotonic()
        speed, window_seconds = _Speed(), 0.0
        progress, epoch_sums = None, np.zeros(NUM_SUMS)
        epochs = -(-self.total_steps // self.per_epoch)
        stopped = False
        with self.stop, ThreadPoolExecutor(1, thread_name_prefix="train-loop") as worker:
            # Leave only on the stop the workers agreed on inside the compiled call: a local
            # signal between two calls must not let one worker skip a call its peers make.
            while step < self.total_steps and not stopped:
                epoch = step // self.per_epoch
                if progress is None:
                    self.echo(f"Epoch {epoch + 1}/{epochs}")
                    progress = progress_bar(min(self.per_epoch, self.total_steps - epoch * self.per_epoch), self.echo)
                    epoch_start, epoch_sums = epoch * self.per_epoch, np.zeros(NUM_SUMS)
                self.monitor.update_profiler(step)
                call_end = self._call_end(step)
                tick = time.perf_counter()
                # The worker runs the compiled call; the main thread stays free to take signals.
                future = worker.submit(
                    self.train_loop,
                    self._batches(iterator, step),
                    tf.constant(call_end - step),
                    tf.constant(window_sums),
                )
                new_sums, done, stopped = (t.numpy() for t in future.result())
                seconds = time.perf_counter() - tick
                if stopped and not self.stop.requested:
                    self.stop.signal_name = "a signal to another worker"
                if stopped and not done:
                    break
                epoch_sums += new_sums - window_sums
                window_sums, window_seconds = new_sums, window_seconds + seconds
                previous, step = step, step + int(done)
                speed.add(int(done) * self.global_batch, seconds)
                self._check_finite(window_sums, step, saved_step)
                if step < call_end:  # stopped mid-call: keep the window's sums for the resumed run
                    continue
                epoch_done = step % self.per_epoch == 0 or step == self.total_steps
                if step % self.log_every == 0 or epoch_done:
                    self._log_train(step, window_sums, window_seconds)
                    window_sums, window_seconds = np.zeros(NUM_SUMS, np.float32), 0.0
                self._maybe_histograms(previous, step)
                if epoch_sums[COUNT]:
                    progress.update(
                        step - epoch_start,
                        values=[
                            ("loss", epoch_sums[LOSS] / epoch_sums[COUNT]),
                            ("accuracy", epoch_sums[CORRECT] / epoch_sums[COUNT]),
                            ("img/s", round(speed.last)),
                        ],
                    )
                if step == self.total_steps:
                    # The averaged weights (optimizer.ema_momentum) become the model's for good.
                    finalize_averaged_weights(self.model, self.optimizer)
                save_due = self._save_due(step, epoch_done, last_save_time)
                if epoch_done:
                    progress = None
                    if (epoch + 1) % self.config.train.eval_every_epochs == 0 or step == self.total_steps:
                        # Evaluated (and kept as best) with the averaged weights, if any.
                        with averaged_weights(self.model, self.optimizer):
                            last_eval = self._evaluate(step)
                            if save_due:
                                self._maybe_keep_best(step, last_eval, window_sums)
                            if step == self.total_steps and self.config.eval.tta != "none":
                                last_eval = self._evaluate_tta(step, last_eval)
                if save_due:
                    self.store.save(step, step // self.per_epoch, window_sums)
                    saved_step, last_save_time = step, time.monotonic()
            self.monitor.update_profiler(step)
            if stopped and step != saved_step:
                self.store.save(step, step // self.per_epoch, window_sums)
        self.monitor.close()
        if last_eval is not None and self.runtime.is_chief:
            last_eval.write(self.wd.metrics_path)
        total = time.perf_counter() - started
        stopped_by = self.stop.signal_name if step < self.total_steps else None  # a late signal changes nothing
        result = TrainResult(step, self.total_steps, total, speed.mean, last_eval, self.wd.root, stopped_by)
        if not stopped_by:
            self.echo(self._summary(result))
        return result

    def _start_monitor(self, step: int) -> None:
        if not self.runtime.is_chief:
            return
        count = min(32, len(self.dataset.train))
        images = (
            augment_first(self.dataset.train.images[:count], input_spec(self.config), len(self.dataset.train))
            if self.config.data.augment
            else self.dataset.train.images[:count]
        )
        self.monitor.start(step, environment(self.runtime), images, self.dataset.train.labels[:count])

    def _save_due(self, step: int, epoch_done: bool, last_save_time: float) -> bool:
        every, minutes = self.config.checkpoint.every_steps, self.config.checkpoint.every_minutes
        return (
            epoch_done
            or bool(every and step % every == 0)
            or bool(minutes and time.monotonic() - last_save_time >= minutes * 60)
        )

    def _check_finite(self, sums: np.ndarray, step: int, saved_step: int) -> None:
        if not sums[NONFINITE]:
            return
        if self.config.train.nan_policy == "stop":
            raise DivergedError(
                f"the loss became NaN or infinite at step {step}; stopped without saving. The last good checkpoint "
                f"is step {saved_step} in {self.wd.checkpoints}. Lower optimizer.learning_rate, or set "
                "train.nan_policy=skip_step to skip such steps"
            )
        self.echo(f"Warning: skipped {int(sums[NONFINITE])} step(s) with a non-finite loss before step {step}")

    def _log_train(self, step: int, sums: np.ndarray, seconds: float) -> None:
        steps = max(float(sums[STEPS]), 1.0)
        extra = {
            "learning_rate": current_learning_rate(self.optimizer),
            "images_per_second": steps * self.global_batch / seconds if seconds else 0.0,
            "step_time_seconds": seconds / steps,
            "examples_seen": float(step * self.global_batch),
            "epoch": step / self.per_epoch,
        }
        scale = getattr(self.optimizer, "dynamic_scale", None)
        if scale is not None:
            extra["loss_scale"] = float(scale.numpy())
        if self.peak and seconds:
            extra["model_flops_utilization"] = self.flops_per_step * steps / seconds / self.peak
        self.monitor.log_train(step, sums, extra)

    def _maybe_histograms(self, previous: int, step: int) -> None:
        every = self.config.tensorboard.histogram_every_steps
        if every and step // every > previous // every and self.runtime.is_chief:
            self.monitor.log_histograms(step, self.model, self.dataset.test.images[:64].astype(np.float32))

    def _evaluate(self, step: int) -> EvalMetrics:
        tick = time.perf_counter()
        metrics = self.evaluator(step)
        misclassified = None
        if self.runtime.is_chief and self.config.tensorboard.images:
            test = self.dataset.test
            misclassified = misclassified_examples(
                self.model, test.images[:256], test.labels[:256], list(self.dataset.class_names)
            )
        self.monitor.log_eval(step, metrics, misclassified)
        self.echo(
            f"Eval at step {step}: accuracy {metrics.accuracy:.2%}, loss {metrics.loss:.4f} "
            f"({metrics.examples} images, {time.perf_counter() - tick:.1f}s)"
        )
        return metrics

    def _evaluate_tta(self, step: int, single_view: EvalMetrics) -> EvalMetrics:
        """The final score with test-time augmentation; the single view stays on the curve."""
        self.single_view_accuracy = single_view.accuracy
        tick = time.perf_counter()
        metrics = self.evaluator(step, tta=self.config.eval.tta)
        self.monitor.log_tta(step, metrics, self.config.eval.tta)
        self.echo(
            f"Eval at step {step} with eval.tta={self.config.eval.tta}: accuracy {metrics.accuracy:.2%}, "
            f"loss {metrics.loss:.4f} ({time.perf_counter() - tick:.1f}s)"
        )
        return metrics

    def _maybe_keep_best(self, step: int, metrics: EvalMetrics, window_sums: np.ndarray) -> None:
        if self.config.checkpoint.keep_best and metrics.accuracy > self.best_accuracy:
            self.best_accuracy, self.best_step = metrics.accuracy, step
            self.store.save_best(step, step // self.per_epoch, metrics.accuracy, window_sums)

    def _summary(self, result: TrainResult) -> str:
        """The closing table: results, speed and where everything is."""
        rows = [("steps", f"{result.step} of {result.total_steps} (global batch {self.global_batch})")]
        if result.final_eval is not None:
            final = result.final_eval
            detail = (
                f"with eval.tta={self.config.eval.tta}, {self.single_view_accuracy:.2%} single view"
                if self.single_view_accuracy is not None
                else f"(loss {final.loss:.4f})"
            )
            rows.append(("final test accuracy", f"{final.accuracy:.2%} {detail}"))
        if self.best_step is not None:
            rows.append(("best test accuracy", f"{self.best_accuracy:.2%} at step {self.best_step}"))
        rows += [
            ("time", f"{result.seconds:.0f}s in all"),
            ("speed", f"{result.images_per_second:.0f} img/s over {self.runtime.num_replicas} replica(s)"),
            ("checkpoints", str(self.wd.checkpoints)),
            ("metrics", str(self.wd.metrics_path)),
            ("export", f"launch export --workdir {self.wd.root}"),
            ("TensorBoard", f"tensorboard --logdir {self.wd.tensorboard}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "Done.\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def environment(runtime: Runtime) -> dict[str, str]:
    """What the run ran on, for TensorBoard's text tab."""
    devices = ", ".join(d.name for d in tf.config.list_logical_devices()) or "none"
    return {
        "TensorFlow": tf.__version__,
        "Keras": keras.__version__,
        "devices": devices,
        "strategy": type(runtime.strategy).__name__,
        "replicas": str(runtime.num_replicas),
        "workers": str(runtime.num_workers),
        "precision": runtime.precision,
        "XLA": str(runtime.jit_compile),
        "why": runtime.reason,
    }


def _best_so_far(store: CheckpointStore, wd: Workdir, echo: Echo) -> tuple[int | None, float]:
    """(step, accuracy) of the kept best checkpoint; a lost best.json is rebuilt.

    Its accuracy is read back from the eval curve at that step; if the curve lacks it
    too, the next evaluation replaces the best checkpoint.
    """
    record = store.best_record
    if record is None:
        return None, -1.0
    if record["accuracy"] is None:
        step = record["step"]
        accuracy = scalar_at(wd.tensorboard / "eval", "accuracy", step)
        known = "unknown" if accuracy is None else f"{accuracy:.2%}, from TensorBoard's eval curve"
        echo(f"Warning: best.json rebuilt for {store.best_directory / f'ckpt-{step}'} (accuracy {known})")
        if accuracy is None:
            return record["step"], -1.0
        if store.save_directory == store.directory:
            files.write_json(store.best_directory / "best.json", {"step": record["step"], "accuracy": accuracy})
        return record["step"], accuracy
    return record["step"], record["accuracy"]


def _accelerator_names(runtime: Runtime) -> list[str]:
    if runtime.device_kind != "gpu":
        return []
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        names.append(tf.config.experimental.get_device_details(gpu).get("device_name", ""))
    return names[: runtime.num_replicas]


class _Speed:
    """Images per second, leaving out the first call (it includes tracing)."""

    def __init__(self) -> None:
        self.images, self.seconds, self.calls, self.last = 0, 0.0, 0, 0.0

    def add(self, images: int, seconds: float) -> None:
        self.calls += 1
        self.last = images / seconds if seconds else 0.0
        if self.calls > 1:
            self.images += images
            self.seconds += seconds

    @property
    def mean(self) -> float:
        return self.images / self.seconds if self.seconds else self.last


class PlainProgress:
    """Progress for logs (CI, pipes, `--workers` prefixes): a whole line every `interval` s."""

    def __init__(self, target: int, echo: Echo, interval: float = 15.0) -> None:
        self.target, self.echo, self.interval = target, echo, interval
        self.start = self.last = time.perf_counter()

    def update(self, current: int, values: list[tuple[str, float]]) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and current < self.target:
            return
        self.last = now
        eta = (now - self.start) / max(current, 1) * (self.target - current)
        shown = " - ".join(f"{name}: {value:.4g}" for name, value in values)
        self.echo(f"  step {current}/{self.target} - {shown} - ETA {eta:.0f}s")


def progress_bar(target: int, echo: Echo):
    """Keras' Progbar in a terminal; plain periodic lines otherwise (it assumes a terminal)."""
    if sys.stdout.isatty():
        return keras.utils.Progbar(target, unit_name="step", stateful_metrics=["loss", "accuracy", "img/s"])
    return PlainProgress(target, echo)
