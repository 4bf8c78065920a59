"""`launch train --dry-run`: every check `train()` makes before it writes, then the plan.

The same steps as trainer.training, called, not copied: the strategy (this process
alone: a dry run joins no cluster), the workdir's read-only checks, the data listed and
prepared, the model and optimizer built (`prepare_parts`), and the checkpoint a resume
would start from, restored in memory only (`restore_latest`: an unreadable one falls back,
one of another model is refused, as in a real run). Nothing is written or created: no
workdir folder, no lock or lease, no config.yaml, no TensorBoard files, no staging folder
(what a run fetches before it starts, CIFAR-10 or ImageNet weights missing from Keras'
cache, is fetched: that is the check that they can be had). A workdir another trainer
holds is said in the plan instead of failing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from trainer.checkpoint_files import checkpoint_steps
from trainer.config import Config
from trainer.console import Console
from trainer.data.service import check_reachable
from trainer.errors import WorkdirBusyError
from trainer.loop.run import Run, RunParts, checkpoint_store
from trainer.models import model_summary
from trainer.runtime import Runtime, setup_runtime
from trainer.say import Say
from trainer.storage import exists
from trainer.training import check_workdir, prepare_parts, restore_latest
from trainer.warm_start import WarmStart
from trainer.workdir import Workdir

__all__ = ["RunPlan", "plan_run"]


@dataclass(frozen=True)
class RunPlan:
    """What `launch train` would do with this config and workdir."""

    strategy: str  # the runtime's reason: strategy, devices, precision, XLA
    replicas: int
    global_batch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    data_origin: str
    train_size: int
    test_size: int
    classes: int
    image_size: int
    model_summary: str  # trainer.models.model_summary: the same words as a run's "Model:" line
    workdir: str
    workdir_exists: bool
    checkpoint_step: int | None  # the newest checkpoint listed now (None: none)
    start_step: int  # where training would start: 0, or the checkpoint's step
    fresh: bool
    busy: str | None = None  # why a real run would be refused now (another trainer holds it)
    started_from: str | None = None  # --from: whose weights, at which step
    service: str = ""  # data.service: the dispatcher that answered the probe

    def lines(self) -> list[str]:
        """The plan as the CLI prints it."""
        size = self.image_size
        return [
            "Dry run: nothing was written or created.",
            f"Strategy: {self.strategy}; {self.replicas} replica(s)",
            f"Steps:    {self._steps()}",
            f"Data:     {self.data_origin}: {self.train_size} train / {self.test_size} test images, "
            f"{self.classes} classes, at {size}x{size}",
            *([f"Input:    the tf.data service at {self.service} (its dispatcher answers)"] if self.service else []),
            f"Model:    {self.model_summary}",
            f"Workdir:  {self.workdir}: {self._start()}",
            *([f"Weights:  {self.started_from} (a new run: step 0, its own optimizer)"] if self.started_from else []),
            f"Files:    config.yaml, dataset.json, metrics.json, checkpoints/ and tensorboard/ in {self.workdir}",
            *([f"Busy:     {self.busy}"] if self.busy else []),
        ]

    def _steps(self) -> str:
        full = self.epochs * self.steps_per_epoch
        cut = f", cut to {self.total_steps} by train.max_steps" if self.total_steps < full else ""
        return (
            f"{self.steps_per_epoch} per epoch (global batch {self.global_batch}) x {self.epochs} epoch(s) "
            f"= {full} steps{cut}"
        )

    def _start(self) -> str:
        if not self.workdir_exists:
            return "new: it would be created, and training would start at step 0"
        if self.checkpoint_step is None:
            return "exists, no checkpoint: training would start at step 0"
        if self.fresh:
            return (
                f"--fresh would delete its checkpoints (newest: step {self.checkpoint_step}), TensorBoard events "
                f"and metrics, then start at step 0"
            )
        if self.start_step == 0:
            return f"no checkpoint of it is readable (newest: step {self.checkpoint_step}): it would start at step 0"
        if self.start_step >= self.total_steps:
            return f"its checkpoint at step {self.start_step} already reaches step {self.total_steps}: nothing to train"
        return f"would resume from its checkpoint at step {self.start_step} and train to step {self.total_steps}"


def plan_run(
    config: Config, workdir: str | os.PathLike, *, fresh: bool = False, echo: Say = print, start_from: str | None = None
) -> RunPlan:
    """Check what `train(config, workdir, fresh=fresh, start_from=...)` would check, write nothing, return the plan.

    Raises what `train` would raise before its first write (a bad config value, unusable
    data, a folder that is not a workdir, a checkpoint of another model); a busy workdir
    is not raised but named in `RunPlan.busy`. `echo` gets the warnings a real run would
    print (its progress lines are left out: the plan says it all).
    """
    started = time.perf_counter()
    wd = Workdir(workdir)
    warm = WarmStart.parse(start_from) if start_from is not None else None
    console = Console(echo, logging.WARNING)
    runtime = setup_runtime(config.runtime, announce=echo, cluster=False)
    check_workdir(wd, fresh, console, warm)
    busy = _busy(wd, console)
    parts = prepare_parts(config, wd, runtime, console, started, warm)
    if config.data.service:  # the run's probe (trainer.data.service): a dispatcher must answer there
        check_reachable(config.data.service)
    steps = checkpoint_steps(wd.checkpoints)
    newest = steps[0] if steps else None
    start = 0
    if newest is not None and not fresh:
        # While another trainer writes them, its next save would change the answer: listed only.
        start = newest if busy else _restored_step(config, wd, runtime, parts, console)
    return RunPlan(
        strategy=runtime.reason,
        replicas=runtime.num_replicas,
        global_batch=config.data.batch_size,
        steps_per_epoch=parts.per_epoch,
        epochs=config.train.epochs,
        total_steps=parts.total_steps,
        data_origin=parts.dataset.origin,
        train_size=len(parts.dataset.train),
        test_size=len(parts.dataset.test),
        classes=len(parts.dataset.class_names),
        image_size=parts.dataset.image_shape[0],
        model_summary=model_summary(parts.model, config.model.name),
        workdir=wd.root,
        workdir_exists=exists(wd.root),
        checkpoint_step=newest,
        start_step=start,
        fresh=fresh,
        busy=busy,
        started_from=f"the weights of {warm.source.root} at step {warm.step}" if warm else None,
        service=config.data.service,
    )


def _busy(wd: Workdir, console: Console) -> str | None:
    try:
        wd.check_not_busy(warn=console.warning)
    except WorkdirBusyError as err:
        return f"{err} (a real run would stop here, exit code 2)"
    return None


def _restored_step(config: Config, wd: Workdir, runtime: Runtime, parts: RunParts, console: Console) -> int:
    """The step a resume starts from, restored in memory as the run restores it: a damaged
    newest checkpoint falls back (0: none is readable), one of another model is refused."""
    store = checkpoint_store(config, wd, runtime, parts, console, read_only=True)
    try:
        return restore_latest(Run(config, wd, runtime, parts, store, console))
    finally:
        store.close()
