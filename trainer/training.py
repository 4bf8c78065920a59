"""`train()`: assemble a run (data, model, optimizer, checkpoints, loop) and run it.

This module only puts parts together; each part lives elsewhere:
- trainer.data: the dataset and its input pipeline;
- trainer.models / trainer.backbones / trainer.optim: the network, its fine-tuning plan,
  the optimizer and weight averaging;
- trainer.runtime: devices, strategy, precision, the multi-worker barrier, a lost peer;
- trainer.checkpoints / trainer.workdir: what is saved where, and what may be deleted;
- trainer.loop.run: the assembled parts (`Run`), as the loop and the report receive them;
- trainer.loop.build: the loop wired from them (schedule, phases, actions, controller,
  the state a resumed run starts from);
- trainer.run_report: what the run says when it resumes, stops or ends;
- trainer.console: who sees which line.

Nothing on disk changes before the workdir, the config, the data, the model and the
checkpoint are known to be usable.
"""

from __future__ import annotations

import contextlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.backbones import FreezePlan, set_backbone_frozen
from trainer.config import Config
from trainer.console import Console
from trainer.data import Dataset, RecordSplit, Split, load_dataset
from trainer.data.device import DeviceFeed, resolve_placement
from trainer.data.diagnose import input_culprit, input_error, stream_ended_error
from trainer.data.info import DatasetInfo
from trainer.data.pipeline import first_views, train_dataset_fn
from trainer.data.plan import InputSpec, check_batch_divides, input_spec, steps_per_epoch
from trainer.data.prepare import prepare_dataset, training_info
from trainer.data.service import first_iterator
from trainer.data.skips import FILE_NAME as UNREADABLE_FILE
from trainer.data.skips import SkipMemo
from trainer.errors import CheckpointMismatchError, DivergedError
from trainer.files import describe_write_error, is_write_failure
from trainer.lease import Ownership
from trainer.loop import actions as act
from trainer.loop.build import build_controller
from trainer.loop.controller import TrainResult
from trainer.loop.run import Run, RunParts, checkpoint_store
from trainer.models import build_for_dataset, init_from_data, load_initial_weights, model_summary
from trainer.monitoring import Monitor
from trainer.optim import build_lookahead, build_optimizer
from trainer.run_report import announce_resume, nothing_to_do, stopped, summary
from trainer.runs import check_still_free, record_config
from trainer.runtime import Runtime, environment, setup_runtime
from trainer.say import Say
from trainer.summaries import drop_events_after
from trainer.tpu import short_loop_warning
from trainer.user_code import resolve_each
from trainer.warm_start import WarmStart
from trainer.workdir import Workdir

__all__ = ["TrainResult", "train"]


def train(
    config: Config,
    workdir: str | os.PathLike,
    *,
    fresh: bool = False,
    echo: Say = print,
    resume_command: str | None = None,
    start_from: str | None = None,
    chosen_workdir: bool = False,
) -> TrainResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint unless `fresh`.

    A folder that `launch train` did not create is refused; the data is read and the
    model built before the workdir is touched; config.yaml/dataset.json are written only
    once the checkpoint (if any) has been restored.

    Args:
        resume_command: shown when the run is interrupted, so the user can resume.
        start_from: `WORKDIR[:latest|best|STEP]`: a new run from that checkpoint's model
            weights (trainer.warm_start); a workdir holding checkpoints is refused unless `fresh`.
        chosen_workdir: `workdir` is trainer.runs.default_workdir's choice (checked again once held).
    """
    started = time.perf_counter()
    wd = Workdir(workdir)
    warm = WarmStart.parse(start_from) if start_from is not None else None
    runtime = setup_runtime(config.runtime, announce=echo)
    console = Console.for_worker(echo, runtime.is_chief)
    try:
        if runtime.is_chief:
            check_workdir(wd, fresh, console, warm)
            wd.check_not_busy(warn=console.warning)
        console.every_worker(f"Strategy: {runtime.reason}; {runtime.num_replicas} replica(s)")
        result = _train(config, wd, runtime, fresh, console, resume_command, started, warm, chosen_workdir)
    except (OSError, tf.errors.OpError) as err:
        lost = runtime.peer_lost(err)
        if lost is not None:
            raise lost from None
        if not is_write_failure(err):
            raise
        raise describe_write_error(err, wd.root) from err
    if not runtime.is_chief:
        storage.rmtree(wd.worker_temp(runtime.worker_index))
        storage.remove_if_empty(wd.path(".worker-temp"))  # only once the last worker left it
    return result


def check_workdir(wd: Workdir, fresh: bool, console: Console, warm: WarmStart | None = None) -> None:
    """The chief's first look at the workdir, read only (also the dry run's): a folder of
    ours, in a layout it can write, not one a `--from` run would resume, and a warning for
    one that vanishes with the process."""
    wd.check_trainable(fresh)
    if warm is not None:
        warm.check(wd, fresh)
    if wd.in_memory:
        console.warning(
            f"Warning: {wd.root} is in TensorFlow's in-memory ram:// filesystem: its checkpoints, logs and "
            "metrics vanish when this process exits; use a folder or a gs:// URL to keep them"
        )


def prepare_parts(
    config: Config, wd: Workdir, runtime: Runtime, console: Console, started: float, warm: WarmStart | None = None
) -> RunParts:
    """Data, schedule length, model and optimizer: every check that needs no disk write
    (also the dry run's, trainer.dry_run); `warm`: the model's weights from another run."""
    check_batch_divides(config.data.batch_size, runtime.num_replicas, config.optimizer.gradient_accumulation_steps)
    resolve_each(config.train.actions, "train.actions")  # imported now: a bad path fails before any write
    keras.utils.set_random_seed(config.seed)  # weight initialisation
    skips = SkipMemo(wd.path(UNREADABLE_FILE), console.warning) if config.data.on_bad_image == "skip" else None
    dataset, spec, info, sample = _load_data(config, console, started, skips)
    per_epoch = steps_per_epoch(len(dataset.train), config.data.batch_size)
    if runtime.device_kind == "tpu" and (short := short_loop_warning(config.train.steps_per_loop, per_epoch)):
        console.warning(short)
    total_steps = config.train.epochs * per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    freeze = FreezePlan.of(config.model, per_epoch)
    with runtime.strategy.scope():
        model = _starting_model(config, info, freeze, console)
        console.info(f"Model: {model_summary(model, config.model.name)}")
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
        if warm is not None:  # before the lookahead takes its copy of the weights
            console.info(warm.load_into(model, config, info, wd))
        elif init_from_data(model, sample, info.mean, info.std):
            console.info("Whitening layer initialised from the training images' 2x2 patch covariance")
        # Over the whole schedule, as the LR: a run cut short by max_steps resumes identically.
        lookahead = build_lookahead(model, config.optimizer, per_epoch, config.train.epochs * per_epoch)
    return RunParts(dataset, spec, info, per_epoch, total_steps, model, optimizer, lookahead, freeze, skips)


def _load_data(
    config: Config, console: Console, started: float, skips: SkipMemo | None
) -> tuple[Dataset, InputSpec, DatasetInfo, np.ndarray]:
    """The dataset as training reads it, its input spec, dataset.json's content and the
    training sample its statistics (and a whitening layer) come from."""
    dataset = load_dataset(config.data, config.seed, progress=console.info)
    dataset = prepare_dataset(dataset, config.data, console.info, skips)
    size = dataset.image_shape[0]
    console.info(
        f"Data: {dataset.origin}: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{len(dataset.class_names)} classes, at {size}x{size} ({time.perf_counter() - started:.1f}s)"
    )
    spec = input_spec(config, size)
    info, sample = training_info(dataset, spec)
    return dataset, spec, info, sample


def _starting_model(config: Config, info: DatasetInfo, freeze: FreezePlan, console: Console) -> keras.Model:
    """The model with `model.weights` loaded, trainable as it will be at the end of the run."""
    model = build_for_dataset(config.model, info, pretrained=True)
    loaded = load_initial_weights(model, config.model)
    if loaded:
        console.info(f"Starting weights: {loaded}")
    if freeze.ever_frozen:
        console.info(freeze.description(config.model))
        if config.model.weights == "none":
            console.warning(
                "Warning: model.freeze_backbone with model.weights=none trains a head on random features; "
                "set model.weights to imagenet or a file"
            )
    set_backbone_frozen(model, freeze.final_frozen, keep_batchnorm_frozen=freeze.ever_frozen)
    return model


def _train(
    config: Config,
    wd: Workdir,
    runtime: Runtime,
    fresh: bool,
    console: Console,
    resume_command: str | None,
    started: float,
    warm: WarmStart | None,
    chosen_workdir: bool = False,
) -> TrainResult:
    parts = prepare_parts(config, wd, runtime, console, started, warm)
    # Only the chief writes the workdir; the other workers read its checkpoints.
    holding = wd.locked(config.checkpoint.lease_seconds, console.warning) if runtime.is_chief else None
    with holding or contextlib.nullcontext(Ownership()) as held:
        # Made once the workdir is held: for a remote workdir the store starts its uploader
        # (a thread and a local staging folder) here, so a workdir that cannot be taken
        # leaves nothing running; its last uploads finish before the workdir is let go.
        store = checkpoint_store(config, wd, runtime, parts, console, held=held)
        try:
            run = Run(config, wd, runtime, parts, store, console, held)
            return _claim_and_run(run, fresh, resume_command, started, warm, chosen_workdir)
        finally:
            store.close()


def _claim_and_run(
    run: Run, fresh: bool, resume_command: str | None, started: float, warm: WarmStart | None, chosen: bool
) -> TrainResult:
    if run.runtime.is_chief:
        # Held now: checked again, as a launch at the same moment may have trained here since.
        if chosen:
            check_still_free(run.wd, run.config, new_run=warm is not None)
        if warm is not None:
            warm.check_target(run.wd, fresh)
        _claim_workdir(run.wd, fresh, run.console)
    run.runtime.barrier("start")  # nobody restores before the chief has cleared
    try:
        result = _resume_and_run(run, resume_command, started, warm)
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


def _resume_and_run(run: Run, resume_command: str | None, started: float, warm: WarmStart | None) -> TrainResult:
    start_step = restore_latest(run)
    changed = _record_run(run, start_step, warm) if run.runtime.is_chief else None
    if run.store.restored_path:
        announce_resume(run, start_step, changed)
        if run.runtime.is_chief:
            drop_events_after(run.wd.tensorboard, start_step, warn=run.console.warning)
    if start_step >= run.parts.total_steps:
        run.console.info(nothing_to_do(run, start_step))
        return TrainResult(start_step, run.parts.total_steps, 0.0, 0.0, None, run.wd.root)
    early = act.stopped_early(run.store, run.config.train)  # its count reached the patience: nothing to do
    if early is not None:
        run.console.info(early)
        return TrainResult(start_step, run.parts.total_steps, 0.0, 0.0, None, run.wd.root, act.EARLY_STOPPING)
    result = _run_loop(run, start_step, started)
    run.store.wait_for_uploads()  # a stopped run says "saved" only once it is in the workdir
    if result.interrupted:
        run.console.every_worker(stopped(run, result, resume_command))
    return result


def _record_run(run: Run, start_step: int, warm: WarmStart | None) -> str | None:
    """The run is known to start (or to be complete): record what it is. Returns the line
    a resume with changed settings says (trainer.runs.record_config)."""
    changed = record_config(run.wd, run.config, start_step if run.store.restored_path else None)
    run.wd.write_dataset_info(run.parts.info)
    if run.parts.skips:
        run.parts.skips.save()
    if warm is not None:
        warm.record(run.wd)
    return changed


def restore_latest(run: Run) -> int:
    """The step to start from; a checkpoint of another model is refused, not skipped."""
    try:
        return run.store.restore("latest", warn=run.console.warning) or 0
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(
            f"{run.wd.root} holds a run this config cannot continue: {err}. {run.wd.config_change(run.config)} "
            "Nothing was changed. Use --fresh to start over in this workdir (it deletes its checkpoints), "
            "or choose another --workdir"
        ) from err


# --- the loop ------------------------------------------------------------------------------


def _run_loop(run: Run, start_step: int, started: float) -> TrainResult:
    """Build the input, the controller and its actions, run them, report."""
    monitor = Monitor(run.config, run.wd.tensorboard, run.runtime.is_chief, list(run.parts.dataset.class_names))
    device_feed = _device_feed(run)
    iterator = None if device_feed else _host_iterator(run, start_step)
    _start_monitor(run, monitor, start_step)
    controller, state = build_controller(run, monitor, start_step, device_feed, iterator)
    try:
        outcome = controller.run(state)
    except tf.errors.InvalidArgumentError as err:
        raise _input_error(run, state.step, err) from None
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as err:
        # A streamed file or shard deleted, moved or locked since the start, named; else
        # (a checkpoint's file, say) the error as it was.
        raise _input_error(run, state.step, err, culprit_only=True) from None
    except tf.errors.OutOfRangeError as err:
        raise _input_ended(run, err) from None
    finally:
        monitor.close()
    state = outcome.state
    if state.last_eval is not None and run.runtime.is_chief:
        state.last_eval.write(run.wd.metrics_path)
    result = TrainResult(
        state.step,
        run.parts.total_steps,
        time.perf_counter() - started,
        outcome.images_per_second,
        state.last_eval,
        run.wd.root,
        outcome.stopped_by,
    )
    if not result.interrupted:
        run.console.info(summary(run, result, state))
    return result


def _input_error(run: Run, step: int, err: tf.errors.OpError, culprit_only: bool = False) -> Exception:
    """A decode failure in the streamed input, as one line naming the file or record: the
    examples of the failed call's batches (two calls' worth, in case of an earlier failure).
    `culprit_only`: `err` itself unless a file or record is found failing."""
    parts = run.parts
    steps = range(step, min(step + 2 * run.config.train.steps_per_loop, parts.total_steps))
    return (input_culprit if culprit_only else input_error)(parts.dataset, parts.spec, steps) or err


def _input_ended(run: Run, err: tf.errors.OutOfRangeError) -> Exception:
    """The input ran out before the schedule did: only TFRecord shards holding fewer records
    than their shards.json says can do that (every other stream is exactly as long)."""
    split = run.parts.dataset.train
    return stream_ended_error(split) if isinstance(split, RecordSplit) else err


def _device_feed(run: Run) -> DeviceFeed | None:
    """The training set on the devices when data.placement resolves to "device", else None."""
    train_split, spec, console = run.parts.dataset.train, run.parts.spec, run.console
    if resolve_placement(run.config.data.placement, run.runtime.device_kind, train_split, spec) == "host":
        streamed = "" if isinstance(train_split, Split) else ", decoding image files as batches need them"
        console.info(f"Input: tf.data pipeline on the host{streamed}")
        return None
    feed = DeviceFeed(run.runtime.strategy, train_split.images, train_split.labels, spec)
    console.info(
        f"Input: the training set is kept on each replica's device ({feed.bytes_per_replica / 2**20:.0f} MiB "
        "each); batches are gathered and augmented there"
    )
    return feed


def _host_iterator(run: Run, start_step: int):
    fn = train_dataset_fn(run.parts.dataset.train, run.parts.spec, start_step, run.parts.total_steps)
    return first_iterator(lambda: iter(run.runtime.strategy.distribute_datasets_from_function(fn)), run.config.data)


def _start_monitor(run: Run, monitor: Monitor, step: int) -> None:
    if not run.runtime.is_chief:
        return
    # Decoded only for the grid a fresh run shows: a resume paid 0.4-0.8 s for nothing.
    shown = monitor.shows_input_grid(step)
    images, labels = first_views(run.parts.dataset.train, run.parts.spec, 32, training=True) if shown else (None, None)
    monitor.start(step, environment(run.runtime), images, labels)
