"""`train()`: assemble a run (data, model, optimizer, checkpoints, loop) and run it.

This module only puts parts together; each part lives elsewhere:
- trainer.data: the dataset and its input pipeline;
- trainer.models / trainer.optim: the network, the optimizer and weight averaging;
- trainer.runtime: devices, strategy, precision, the multi-worker barrier;
- trainer.checkpoints / trainer.workdir: what is saved where, and what may be deleted;
- trainer.loop.step: the compiled multi-step function;
- trainer.loop.schedule: what is due at which global step (pure, no TensorFlow);
- trainer.loop.actions: each side effect between calls (scalars, histograms, evaluation
  and keep-best, checkpoints, profiler), in the order they run;
- trainer.loop.controller: the calls, the stop request and the dispatch to actions;
- trainer.console: what is printed.

Nothing on disk changes before the workdir, the config, the data, the model and the
checkpoint are known to be usable.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from trainer import files, storage
from trainer.backbones import FreezePlan, backbone_variable_ids, set_backbone_frozen
from trainer.checkpoints import CheckpointStore
from trainer.config import Config, config_differences, profile_range, save_config
from trainer.console import Console, Echo, summary_table
from trainer.data import Dataset, RecordSplit, Split, load_dataset
from trainer.data.device import DeviceFeed, resolve_placement
from trainer.data.diagnose import input_error, stream_ended_error
from trainer.data.info import DatasetInfo
from trainer.data.pipeline import first_views, train_dataset_fn
from trainer.data.plan import InputSpec, check_batch_divides, input_spec, steps_per_epoch
from trainer.data.prepare import prepare_dataset, training_info
from trainer.errors import CheckpointMismatchError, DivergedError, PeerLostError, TrainerError
from trainer.evaluation import Evaluator
from trainer.files import describe_write_error, is_write_failure
from trainer.flops import peak_flops, training_flops_per_example
from trainer.loop import actions as act
from trainer.loop.controller import Controller, TrainResult, stop_on_nonfinite
from trainer.loop.schedule import SaveClock, Schedule
from trainer.loop.step import StepOptions, Votes, make_train_loop
from trainer.models import build_for_dataset, init_from_data, load_initial_weights
from trainer.monitoring import Monitor
from trainer.optim import Lookahead, build_lookahead, build_optimizer, gradient_multipliers
from trainer.runtime import Runtime, accelerator_names, environment, setup_runtime
from trainer.staging import CheckpointUploads
from trainer.summaries import drop_events_after, scalar_at
from trainer.workdir import Workdir

__all__ = ["TrainResult", "train"]


def train(
    config: Config,
    workdir: str | os.PathLike,
    *,
    fresh: bool = False,
    echo: Echo = print,
    resume_command: str | None = None,
) -> TrainResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint unless `fresh`.

    A folder that `launch train` did not create is refused; the data is read and the
    model built before the workdir is touched; config.yaml/dataset.json are written only
    once the checkpoint (if any) has been restored.

    Args:
        resume_command: shown when the run is interrupted, so the user can resume.
    """
    started = time.perf_counter()
    wd = Workdir(workdir)
    runtime = setup_runtime(config.runtime, announce=echo)
    console = Console.for_worker(echo, runtime.is_chief)
    try:
        if runtime.is_chief:
            wd.check_trainable(fresh)
            wd.check_not_busy(warn=console.warning)
            if wd.in_memory:
                console.warning(
                    f"Warning: {wd.root} is in TensorFlow's in-memory ram:// filesystem: its checkpoints, logs and "
                    "metrics vanish when this process exits; use a folder or a gs:// URL to keep them"
                )
        console.every_worker(f"Strategy: {runtime.reason}; {runtime.num_replicas} replica(s)")
        result = _train(config, wd, runtime, fresh, console, resume_command, started)
    except (OSError, tf.errors.OpError) as err:
        if runtime.num_workers > 1 and isinstance(err, _PEER_ERRORS):  # one process has no peer to lose
            raise peer_lost_error(err, runtime) from None
        if not is_write_failure(err):
            raise
        raise describe_write_error(err, wd.root) from err
    if not runtime.is_chief:
        storage.rmtree(wd.worker_temp(runtime.worker_index))
        storage.remove_if_empty(wd.path(".worker-temp"))  # only once the last worker left it
    return result


# What a collective or the coordination service raises when a peer task is gone.
_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
)


def peer_lost_error(err: tf.errors.OpError, runtime: Runtime) -> PeerLostError:
    """A peer's disappearance as one line naming the task, if TensorFlow's message does.

    TensorFlow reports it from whichever collective was waiting (a broadcast at start-up,
    an all-reduce in a step or an evaluation) with a long traceback that never says what
    to do: look at that task's log, then start every task again.
    """
    resolver = getattr(runtime.strategy, "cluster_resolver", None)
    me = f"{resolver.task_type} {resolver.task_id}" if resolver is not None else ""
    named = {f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", err.message or "")}
    others = sorted(named - {me})
    who = f"task {', '.join(others)} of the cluster" if others else "another task of the cluster"
    return PeerLostError(
        f"{who} stopped answering ({type(err).__name__} in this task, {me or 'a worker'}): check that task's log for "
        "why; then start every task again with the same command, which resumes from the last checkpoint"
    )


@dataclass
class _Parts:
    """What a run trains: built before the workdir is touched."""

    dataset: Dataset
    spec: InputSpec
    info: DatasetInfo
    per_epoch: int
    total_steps: int
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    lookahead: Lookahead | None
    freeze: FreezePlan


def _prepare(config: Config, runtime: Runtime, console: Console, started: float) -> _Parts:
    """Data, schedule length, model and optimizer: every check that needs no disk write."""
    check_batch_divides(config.data.batch_size, runtime.num_replicas)
    keras.utils.set_random_seed(config.seed)  # weight initialisation
    dataset = load_dataset(config.data, config.seed, progress=console.info)
    dataset = prepare_dataset(dataset, config.data, console.info)
    size = dataset.image_shape[0]
    console.info(
        f"Data: {dataset.origin}: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{len(dataset.class_names)} classes, at {size}x{size} ({time.perf_counter() - started:.1f}s)"
    )
    spec = input_spec(config, size)
    info, sample = training_info(dataset, spec)
    if runtime.device_kind == "tpu" and config.train.steps_per_loop < 50:
        console.warning(
            f"Warning: train.steps_per_loop={config.train.steps_per_loop} is small for a TPU, where host round "
            "trips dominate; use 100 or more (or one epoch)"
        )
    per_epoch = steps_per_epoch(len(dataset.train), config.data.batch_size)
    total_steps = config.train.epochs * per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    freeze = FreezePlan.of(config.model, per_epoch)
    with runtime.strategy.scope():
        model = _starting_model(config, info, freeze, console)
        optimizer = build_optimizer(
            config.optimizer,
            per_epoch,
            config.train.epochs * per_epoch,
            loss_scaling=runtime.loss_scaling,
            skip_nonfinite=config.train.nan_policy == "skip_step",
        )
        # Slots for every variable that will ever train: the frozen phase updates a subset
        # of them, and checkpoints hold the same variables on both sides of the unfreeze.
        optimizer.build(model.trainable_variables)
        if init_from_data(model, sample, info.mean, info.std):
            console.info("Whitening layer initialised from the training images' 2x2 patch covariance")
        # Over the whole schedule, as the LR: a run cut short by max_steps resumes identically.
        lookahead = build_lookahead(model, config.optimizer, per_epoch, config.train.epochs * per_epoch)
    return _Parts(dataset, spec, info, per_epoch, total_steps, model, optimizer, lookahead, freeze)


def _starting_model(config: Config, info: DatasetInfo, freeze: FreezePlan, console: Console) -> keras.Model:
    """The model with `model.weights` loaded, trainable as it will be at the end of the run."""
    model = build_for_dataset(config.model, info, pretrained=True)
    loaded = load_initial_weights(model, config.model)
    if loaded:
        console.info(f"Starting weights: {loaded}")
    if freeze.ever_frozen:
        console.info(_freeze_description(config, freeze))
        if config.model.weights == "none":
            console.warning(
                "Warning: model.freeze_backbone with model.weights=none trains a head on random features; "
                "set model.weights to imagenet or a file"
            )
    set_backbone_frozen(model, freeze.final_frozen, keep_batchnorm_frozen=freeze.ever_frozen)
    return model


def _freeze_description(config: Config, freeze: FreezePlan) -> str:
    if freeze.final_frozen:
        return "Fine-tuning: the backbone stays frozen (its BatchNorm in inference mode); only the head trains"
    epochs = config.model.unfreeze_at_epoch
    rate = config.model.backbone_lr_multiplier
    at_rate = f" at {rate:g}x the learning rate" if rate != 1.0 else ""
    return (
        f"Fine-tuning: the head trains alone for {epochs} epoch(s), then the backbone too{at_rate} "
        "(its BatchNorm stays in inference mode)"
    )


@dataclass
class _Run:
    """One run's assembled parts, handed around together."""

    config: Config
    wd: Workdir
    runtime: Runtime
    parts: _Parts
    store: CheckpointStore
    console: Console


def _train(
    config: Config,
    wd: Workdir,
    runtime: Runtime,
    fresh: bool,
    console: Console,
    resume_command: str | None,
    started: float,
) -> TrainResult:
    parts = _prepare(config, runtime, console, started)
    store = CheckpointStore(
        wd.checkpoints,
        model=parts.model,
        optimizer=parts.optimizer,
        keep=config.checkpoint.keep,
        num_replicas=runtime.num_replicas,
        # TF needs every worker to save; the others write to a scratch folder.
        save_directory=None if runtime.is_chief else storage.join(wd.worker_temp(runtime.worker_index), "checkpoints"),
        # What the loop needs back on resume, and the lookahead's slow weights, by checkpoint name.
        extra={**act.checkpointed_state(), **({"lookahead": parts.lookahead.state} if parts.lookahead else {})},
        warn=console.warning,
        # A remote workdir: saves land on local disk and are uploaded behind training.
        uploads=CheckpointUploads(wd.checkpoints, config.checkpoint.keep)
        if runtime.is_chief and storage.is_url(wd.root)
        else None,
    )
    # Only the chief writes the workdir; the other workers read its checkpoints.
    holding = wd.locked(config.checkpoint.lease_seconds, console.warning) if runtime.is_chief else None
    run = _Run(config, wd, runtime, parts, store, console)
    try:
        with holding or contextlib.nullcontext():
            try:
                return _claim_and_run(run, fresh, resume_command, started)
            finally:
                store.close()  # the last uploads finish while the workdir is still held
    finally:
        store.close()  # also when the workdir could not be taken (closing twice is a no-op)


def _claim_and_run(run: _Run, fresh: bool, resume_command: str | None, started: float) -> TrainResult:
    if run.runtime.is_chief:
        _claim_workdir(run.wd, fresh, run.console)
    run.runtime.barrier("start")  # nobody restores before the chief has cleared
    try:
        result = _resume_and_run(run, resume_command, started)
    except DivergedError:
        run.runtime.barrier("end")  # every worker diverged at the same (agreed) step
        raise
    run.runtime.barrier("end")  # nobody leaves while a peer may still pull data from it
    return result


def _claim_workdir(wd: Workdir, fresh: bool, console: Console) -> None:
    if fresh:
        removed = wd.clear_training_state()
        if removed:
            console.info(f"--fresh: removed {len(removed)} checkpoint, TensorBoard and metrics file(s) of earlier runs")
    wd.claim()


def _resume_and_run(run: _Run, resume_command: str | None, started: float) -> TrainResult:
    config, wd, runtime, parts, store, console = run.config, run.wd, run.runtime, run.parts, run.store, run.console
    start_step = _restore_latest(store, wd, config, console)
    if runtime.is_chief:  # the run is known to start (or to be complete): record what it is
        save_config(config, wd.config_path)
        wd.write_dataset_info(parts.info)
    if store.restored_path:
        _announce_resume(store, start_step, parts.per_epoch, runtime.num_replicas, config.data.batch_size, console)
        if runtime.is_chief:
            drop_events_after(wd.tensorboard, start_step, warn=console.warning)
    if start_step >= parts.total_steps:
        console.info(
            f"Already trained to step {start_step} of {parts.total_steps}; nothing to do "
            "(raise train.epochs or use --fresh)"
        )
        return TrainResult(start_step, parts.total_steps, 0.0, 0.0, None, wd.root)
    result = _run_loop(run, start_step, started)
    store.wait_for_uploads()  # a stopped run says "saved" only once it is in the workdir
    if result.stopped_by:
        how = f"resume with: {resume_command}" if resume_command else "run the same command to resume"
        if wd.in_memory:
            how = "it is in memory (ram://) and vanishes when this process exits"
        console.every_worker(
            f"Stopped by {result.stopped_by} at step {result.step} of {parts.total_steps} "
            f"(epoch {result.step // parts.per_epoch + 1}); checkpoint saved in {wd.checkpoints}; {how}"
        )
    return result


def _restore_latest(store: CheckpointStore, wd: Workdir, config: Config, console: Console) -> int:
    """The step to start from; a checkpoint of another model is refused, not skipped."""
    try:
        return store.restore("latest", warn=console.warning) or 0
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


def _announce_resume(
    store: CheckpointStore, step: int, per_epoch: int, replicas: int, batch: int, console: Console
) -> None:
    console.info(
        f"Resuming from {store.restored_path} at step {step} (epoch {step // per_epoch + 1}, "
        f"step {step % per_epoch}/{per_epoch} of it); use --fresh to start over"
    )
    if store.restored_replicas and store.restored_replicas != replicas:
        console.info(
            f"The checkpoint was written with {store.restored_replicas} replica(s), this run has {replicas}; "
            f"the global batch stays {batch}, so training continues on the same data stream"
        )


# --- the loop ------------------------------------------------------------------------------


def _run_loop(run: _Run, start_step: int, started: float) -> TrainResult:
    """Build the controller and its actions, run them, report."""
    config, wd, runtime = run.config, run.wd, run.runtime
    schedule = _schedule(config, run.parts)
    monitor = Monitor(config, wd.tensorboard, runtime.is_chief, list(run.parts.dataset.class_names))
    controller, state = _controller(run, monitor, schedule, start_step)
    try:
        outcome = controller.run(state)
    except tf.errors.InvalidArgumentError as err:
        raise _input_error(run, state.step, err) from None
    except tf.errors.OutOfRangeError as err:
        raise _input_ended(run, err) from None
    finally:
        monitor.close()
    state = outcome.state
    if state.last_eval is not None and runtime.is_chief:
        state.last_eval.write(wd.metrics_path)
    result = TrainResult(
        state.step,
        schedule.total_steps,
        time.perf_counter() - started,
        outcome.images_per_second,
        state.last_eval,
        wd.root,
        outcome.stopped_by,
    )
    if not result.stopped_by:
        run.console.info(_summary(result, state, run))
    return result


def _input_error(run: _Run, step: int, err: tf.errors.InvalidArgumentError) -> Exception:
    """A decode failure in the streamed input, as one line naming the file or record: the
    examples of the failed call's batches (two calls' worth, in case of an earlier failure)."""
    parts = run.parts
    steps = range(step, min(step + 2 * run.config.train.steps_per_loop, parts.total_steps))
    return input_error(parts.dataset, parts.spec, steps) or err


def _input_ended(run: _Run, err: tf.errors.OutOfRangeError) -> Exception:
    """The input ran out before the schedule did: only TFRecord shards holding fewer records
    than their shards.json says can do that (every other stream is exactly as long)."""
    split = run.parts.dataset.train
    return stream_ended_error(split) if isinstance(split, RecordSplit) else err


def _schedule(config: Config, parts: _Parts) -> Schedule:
    tb = config.tensorboard
    return Schedule(
        per_epoch=parts.per_epoch,
        total_steps=parts.total_steps,
        steps_per_loop=config.train.steps_per_loop,
        log_every=tb.every_steps or config.train.steps_per_loop,
        eval_every_epochs=config.train.eval_every_epochs,
        save_every=config.checkpoint.every_steps,
        histogram_every=tb.histogram_every_steps,
        profile=profile_range(tb.profile_steps) if tb.profile_steps else None,
        schedule_steps=config.train.epochs * parts.per_epoch,
    )


def _controller(run: _Run, monitor: Monitor, schedule: Schedule, start_step: int):
    """The controller and the state it starts from (checkpointed window, best so far)."""
    config, wd, runtime, parts, store, console = run.config, run.wd, run.runtime, run.parts, run.store, run.console
    votes = Votes.create()
    device_feed = _device_feed(config, runtime, parts, console)
    loop_for = _phased_loops(run, votes, device_feed)
    iterator = None if device_feed else _host_iterator(config, runtime, parts, start_step)
    _start_monitor(config, runtime, parts, monitor, start_step)
    clock = SaveClock(config.checkpoint.every_minutes, runtime.is_chief)
    progress, profiler = act.Progress(console, schedule), act.Profiler(monitor)
    controller = Controller(
        loop_for=loop_for,
        batches_for=lambda step: device_feed.plan(step) if device_feed else iterator,
        schedule=schedule,
        actions=_actions(run, monitor, schedule, clock, progress, profiler),
        progress=progress,
        profiler=profiler,
        votes=votes,
        clock=clock,
        global_batch=config.data.batch_size,
        on_nonfinite=stop_on_nonfinite(config.train.nan_policy, str(wd.checkpoints), console.warning),
        save_on_stop=act.SaveCheckpoint(store, parts.per_epoch, clock, always=True),
        announce=console.every_worker,
    )
    best_step, best_accuracy = _best_so_far(store, wd, console)
    state = act.LoopState(
        step=start_step,
        window_sums=act.restored_window_sums(store),
        saved_step=start_step,
        best_step=best_step,
        best_accuracy=best_accuracy,
    )
    return controller, state


def _phased_loops(run: _Run, votes: Votes, device_feed: DeviceFeed | None):
    """`loop_for(step)`: the compiled call for the training phase of `step`.

    Fine-tuning trains the head alone, then the backbone too: each phase has its own
    compiled call (its own trainable variables and BatchNorm mode, fixed when traced),
    built when first needed. A resumed run picks the phase from its step alone. Steps
    only grow, so the phases come in order and trainability is set once per phase, not
    at every call.
    """
    config, runtime, parts = run.config, run.runtime, run.parts
    loops: dict[bool, object] = {}

    def loop_for(step: int):
        frozen = parts.freeze.frozen_at(step)
        if frozen not in loops:
            set_backbone_frozen(parts.model, frozen, keep_batchnorm_frozen=parts.freeze.ever_frozen)
            if loops:
                run.console.info(f"Step {step}: the backbone is unfrozen and trains from here on")
            options = _step_options(config, runtime, parts, device_feed)
            loops[frozen] = make_train_loop(runtime.strategy, parts.model, parts.optimizer, votes, options)
        return loops[frozen]

    return loop_for


def _step_options(config: Config, runtime: Runtime, parts: _Parts, device_feed: DeviceFeed | None) -> StepOptions:
    return StepOptions(
        global_batch=config.data.batch_size,
        num_classes=len(parts.dataset.class_names),
        label_smoothing=config.optimizer.label_smoothing,
        stop_on_nonfinite=config.train.nan_policy == "stop",
        skip_nonfinite=config.train.nan_policy == "skip_step",
        check_gradients=not runtime.loss_scaling,
        jit_compile=runtime.jit_compile,
        gradient_multipliers=gradient_multipliers(
            parts.model.trainable_variables,
            config.optimizer,
            backbone_variable_ids(parts.model),
            config.model.backbone_lr_multiplier,
        ),
        lookahead=parts.lookahead,
        device_feed=device_feed,
        agree_on_save=bool(config.checkpoint.every_minutes),
    )


def _actions(
    run: _Run, monitor: Monitor, schedule: Schedule, clock: SaveClock, progress: act.Progress, profiler: act.Profiler
) -> list:
    """The side effects between calls, in the order they run."""
    config, runtime, parts, store, console = run.config, run.runtime, run.parts, run.store, run.console
    show_images = runtime.is_chief and config.tensorboard.images
    wants_test_images = show_images or (runtime.is_chief and config.tensorboard.histogram_every_steps)
    # Decoded only when shown: a streamed test split costs 256 decodes otherwise.
    test_images, test_labels = (
        first_views(parts.dataset.test, parts.spec, 256, training=False) if wants_test_images else (None, None)
    )
    flops_per_step = training_flops_per_example(parts.model) * config.data.batch_size
    # Peaks of this worker's devices, times the workers (the same machines): the whole job's.
    peak = peak_flops(accelerator_names(runtime) * runtime.num_workers, runtime.precision)
    evaluation = act.EvalContext(
        model=parts.model,
        optimizer=parts.optimizer,
        evaluator=Evaluator(
            runtime.strategy,
            parts.model,
            parts.dataset.test,
            config.data.batch_size,
            parts.dataset.class_names,
            runtime.jit_compile,
            spec=parts.spec,
        ),
        monitor=monitor,
        store=store,
        console=console,
        class_names=list(parts.dataset.class_names),
        per_epoch=parts.per_epoch,
        keep_best=config.checkpoint.keep_best,
        tta=config.eval.tta,
        images_for_misclassified=(test_images, test_labels) if show_images else None,
    )
    histograms = (
        [act.Histograms(monitor, parts.model, test_images[:64].astype(np.float32))] if wants_test_images else []
    )
    return [
        act.LogScalars(monitor, parts.optimizer, schedule, config.data.batch_size, flops_per_step, peak),
        *histograms,
        progress,
        act.FinalizeAveragedWeights(parts.model, parts.optimizer),
        act.EvaluateAndKeepBest(evaluation),
        act.SaveCheckpoint(store, parts.per_epoch, clock),
        profiler,
    ]


def _device_feed(config: Config, runtime: Runtime, parts: _Parts, console: Console) -> DeviceFeed | None:
    """The training set on the devices when data.placement resolves to "device", else None."""
    train_split = parts.dataset.train
    if resolve_placement(config.data.placement, runtime.device_kind, train_split, parts.spec) == "host":
        streamed = "" if isinstance(train_split, Split) else ", decoding image files as batches need them"
        console.info(f"Input: tf.data pipeline on the host{streamed}")
        return None
    feed = DeviceFeed(runtime.strategy, train_split.images, train_split.labels, parts.spec)
    console.info(
        f"Input: the training set is kept on each replica's device ({feed.bytes_per_replica / 2**20:.0f} MiB "
        "each); batches are gathered and augmented there"
    )
    return feed


def _host_iterator(config: Config, runtime: Runtime, parts: _Parts, start_step: int):
    fn = train_dataset_fn(parts.dataset.train, parts.spec, start_step, parts.total_steps)
    return iter(runtime.strategy.distribute_datasets_from_function(fn))


def _start_monitor(config: Config, runtime: Runtime, parts: _Parts, monitor: Monitor, step: int) -> None:
    if not runtime.is_chief:
        return
    images, labels = first_views(parts.dataset.train, parts.spec, 32, training=True)
    monitor.start(step, environment(runtime), images, labels)


def _best_so_far(store: CheckpointStore, wd: Workdir, console: Console) -> tuple[int | None, float]:
    """(step, accuracy) of the kept best checkpoint; a lost best.json is rebuilt.

    Its accuracy is read back from the eval curve at that step; if the curve lacks it
    too, the next evaluation replaces the best checkpoint.
    """
    record = store.best_record
    if record is None:
        return None, -1.0
    if record["accuracy"] is not None:
        return record["step"], record["accuracy"]
    step = record["step"]
    accuracy = scalar_at(storage.join(wd.tensorboard, "eval"), "accuracy", step)
    known = "unknown" if accuracy is None else f"{accuracy:.2%}, from TensorBoard's eval curve"
    where = storage.join(store.best_directory, f"ckpt-{step}")
    console.warning(f"Warning: best.json rebuilt for {where} (accuracy {known})")
    if accuracy is None:
        return step, -1.0
    if store.save_directory == store.directory:
        files.write_json(storage.join(store.best_directory, "best.json"), {"step": step, "accuracy": accuracy})
    return step, accuracy


def _summary(result: TrainResult, state: act.LoopState, run: _Run) -> str:
    """The closing table: results, speed and where everything is."""
    config, runtime, wd = run.config, run.runtime, run.wd
    rows = [("steps", f"{result.step} of {result.total_steps} (global batch {config.data.batch_size})")]
    if result.final_eval is not None:
        final = result.final_eval
        detail = (
            f"with eval.tta={config.eval.tta}, {state.single_view_accuracy:.2%} single view"
            if state.single_view_accuracy is not None
            else f"(loss {final.loss:.4f})"
        )
        rows.append(("final test accuracy", f"{final.accuracy:.2%} {detail}"))
    if state.best_step is not None:
        rows.append(("best test accuracy", f"{state.best_accuracy:.2%} at step {state.best_step}"))
    rows += [
        ("time", f"{result.seconds:.0f}s in all"),
        ("speed", f"{result.images_per_second:.0f} img/s over {runtime.num_replicas} replica(s)"),
        ("checkpoints", str(wd.checkpoints)),
        ("metrics", str(wd.metrics_path)),
    ]
    if wd.in_memory:  # no later command can reach this process's memory
        rows.append(("workdir", "in memory (ram://): it vanishes when this process exits"))
    else:
        rows += [
            ("export", f"launch export --workdir {wd.root}"),
            ("TensorBoard", f"tensorboard --logdir {wd.tensorboard}"),
        ]
    return summary_table(rows)
