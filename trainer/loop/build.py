"""The loop of a run, wired from its parts: the controller, its actions and its first state.

trainer.training assembles the run (data, model, checkpoint store, the workdir held) and
its input; what the loop is made of is decided here, beside the pieces it wires: the
schedule (trainer.loop.schedule), the compiled call of each phase (trainer.loop.phases),
the actions in the order they run (trainer.loop.actions) and the controller that calls
them (trainer.loop.controller). A new action or step option changes this package only.
"""

from __future__ import annotations

import numpy as np

from trainer import storage
from trainer.backbones import backbone_variable_ids
from trainer.config import profile_range
from trainer.data.augment import batch_augmentation
from trainer.data.device import DeviceFeed
from trainer.data.info import class_weights
from trainer.data.pipeline import first_views
from trainer.evaluation import Evaluator
from trainer.flops import peak_flops, training_flops_per_example
from trainer.loop import actions as act
from trainer.loop import user_actions as user
from trainer.loop.controller import Controller, stop_on_nonfinite
from trainer.loop.phases import PhasedLoops
from trainer.loop.plateau import reduce_on_plateau
from trainer.loop.run import Run
from trainer.loop.schedule import SaveClock, Schedule
from trainer.loop.step import StepOptions, Votes
from trainer.monitoring import Monitor
from trainer.optim import gradient_multipliers
from trainer.runtime import accelerator_names


def build_controller(
    run: Run, monitor: Monitor, start_step: int, device_feed: DeviceFeed | None, iterator
) -> tuple[Controller, act.LoopState]:
    """The controller and the state it starts from (checkpointed window, best so far).

    Args:
        device_feed: the training set on the devices (data.placement=device), or None.
        iterator: the host pipeline's distributed iterator when there is no device feed.
    """
    votes = Votes.create()
    # A lost lease stops the call at the next step, as a signal would; nothing is saved after.
    run.held.when_lost(lambda: votes.stop.assign(True))
    schedule = _schedule(run)
    clock = SaveClock(run.config.checkpoint.every_minutes, run.runtime.is_chief)
    progress, profiler = act.Progress(run.console, schedule), act.Profiler(monitor)
    controller = Controller(
        loop_for=PhasedLoops(
            run.runtime.strategy,
            run.parts.model,
            run.parts.optimizer,
            votes,
            run.parts.freeze,
            options=lambda: _step_options(run, device_feed),
            say=run.console.info,
        ),
        batches_for=lambda step: device_feed.plan(step) if device_feed else iterator,
        schedule=schedule,
        actions=_with_user_actions(run, start_step, _actions(run, monitor, schedule, clock, progress, profiler, votes)),
        progress=progress,
        profiler=profiler,
        votes=votes,
        clock=clock,
        global_batch=run.config.data.batch_size,
        on_nonfinite=stop_on_nonfinite(run.config.train.nan_policy, str(run.wd.checkpoints), run.console.warning),
        save_on_stop=act.SaveCheckpoint(run.store, run.parts.per_epoch, clock, always=True),
        announce=run.console.every_worker,
        stall_after_s=run.config.data.service_timeout_s if run.config.data.service else None,
        require_held=run.held.require,
    )
    eval_logdir = storage.join(run.wd.tensorboard, "eval")
    return controller, act.resumed_state(run.store, start_step, eval_logdir, run.console.warning)


def _with_user_actions(run: Run, start_step: int, actions: list) -> list:
    """`actions` with train.actions' around them (the chief's): a snapshot of the logging
    window first, before LogScalars starts a new one, and the user's actions last, after the
    window's evaluation and checkpoint. Unchanged without train.actions."""
    if not run.config.train.actions or not run.runtime.is_chief:
        return actions
    parts = run.parts
    info = user.RunInfo(run.config, run.wd.root, start_step, parts.total_steps, parts.per_epoch)
    window = user.WindowSnapshot()
    named = user.made_actions(run.config.train.actions, info)
    calls = user.UserActions(named, window, parts.optimizer, parts.per_epoch, run.config.data.batch_size)
    return [window, *actions, calls]


def _schedule(run: Run) -> Schedule:
    config, tb = run.config, run.config.tensorboard
    return Schedule(
        per_epoch=run.parts.per_epoch,
        total_steps=run.parts.total_steps,
        steps_per_loop=config.train.steps_per_loop,
        log_every=tb.every_steps or config.train.steps_per_loop,
        eval_every_epochs=config.train.eval_every_epochs,
        save_every=config.checkpoint.every_steps,
        histogram_every=tb.histogram_every_steps,
        profile=profile_range(tb.profile_steps) if tb.profile_steps else None,
        schedule_steps=config.train.epochs * run.parts.per_epoch,
    )


def _step_options(run: Run, device_feed: DeviceFeed | None) -> StepOptions:
    """The options of a phase's compiled call, made once that phase's trainability is set."""
    config, model = run.config, run.parts.model
    return StepOptions(
        global_batch=config.data.batch_size,
        num_classes=len(run.parts.dataset.class_names),
        label_smoothing=config.optimizer.label_smoothing,
        stop_on_nonfinite=config.train.nan_policy == "stop",
        skip_nonfinite=config.train.nan_policy == "skip_step",
        check_gradients=not run.runtime.loss_scaling,
        jit_compile=run.runtime.jit_compile,
        gradient_multipliers=gradient_multipliers(
            model.trainable_variables,
            config.optimizer,
            backbone_variable_ids(model),
            config.model.backbone_lr_multiplier,
        ),
        lookahead=run.parts.lookahead,
        device_feed=device_feed,
        agree_on_save=bool(config.checkpoint.every_minutes),
        accumulation_steps=config.optimizer.gradient_accumulation_steps,
        class_weights=class_weights(config.data.class_weights, run.parts.dataset.class_names, run.parts.dataset.train),
        augmentation=batch_augmentation(config.data, config.seed, len(run.parts.dataset.class_names)),
    )


def _actions(
    run: Run,
    monitor: Monitor,
    schedule: Schedule,
    clock: SaveClock,
    progress: act.Progress,
    profiler: act.Profiler,
    votes: Votes,
) -> list:
    """The side effects between calls, in the order they run."""
    config, runtime, parts = run.config, run.runtime, run.parts
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
        store=run.store,
        console=run.console,
        class_names=list(parts.dataset.class_names),
        per_epoch=parts.per_epoch,
        keep_best=config.checkpoint.keep_best,
        tta=config.eval.tta,
        images_for_misclassified=(test_images, test_labels) if show_images else None,
    )
    histograms = (
        [act.Histograms(monitor, parts.model, test_images[:64].astype(np.float32))] if wants_test_images else []
    )
    early = act.EarlyStopping(config.train, parts.total_steps, votes.stop, run.store, run.console.info)
    early_stopping = config.train.early_stopping_patience > 0
    return [
        act.LogScalars(monitor, parts.optimizer, schedule, config.data.batch_size, flops_per_step, peak),
        *histograms,
        progress,
        act.FinalizeAveragedWeights(parts.model, parts.optimizer),
        act.EvaluateAndKeepBest(evaluation),
        *([early] if early_stopping else []),  # before the save: the checkpoint holds its count
        *reduce_on_plateau(config.optimizer, schedule, parts.optimizer, run.store, run.console.info),
        act.SaveCheckpoint(run.store, parts.per_epoch, clock),
        *([early.announce] if early_stopping else []),
        profiler,
    ]
