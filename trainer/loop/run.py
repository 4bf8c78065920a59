"""One run's assembled parts, as trainer.training hands them to the loop and the run's report.

Two bags, because they are made at two moments: `RunParts` (data, model, optimizer) is
built before the workdir is touched; `Run` adds what needs the workdir held (the
checkpoint store) and what every later step reads (config, runtime, console). Passed
whole, so a function reads `run.parts.model` where it needs it instead of a list of
arguments that grows with every new option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from trainer import storage
from trainer.backbones import FreezePlan
from trainer.checkpoints import CheckpointStore
from trainer.config import Config
from trainer.console import Console
from trainer.data import Dataset
from trainer.data.info import DatasetInfo
from trainer.data.plan import InputSpec
from trainer.data.skips import SkipMemo
from trainer.lease import Ownership
from trainer.loop import actions as act
from trainer.optim import Lookahead
from trainer.runtime import Runtime
from trainer.staging import CheckpointUploads
from trainer.workdir import Workdir


@dataclass
class RunParts:
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
    # data.on_bad_image=skip's findings, saved once the workdir is held (None: not skipping).
    skips: SkipMemo | None = None


@dataclass
class Run:
    """One run's assembled parts, handed around together."""

    config: Config
    wd: Workdir
    runtime: Runtime
    parts: RunParts
    store: CheckpointStore
    console: Console
    # The chief's hold on the workdir: a lost lease stops the loop (trainer.loop.build).
    held: Ownership = field(default_factory=Ownership)


def checkpoint_store(
    config: Config,
    wd: Workdir,
    runtime: Runtime,
    parts: RunParts,
    console: Console,
    *,
    read_only: bool = False,
    held: Ownership | None = None,
) -> CheckpointStore:
    """The run's store; `read_only` (the dry run): no uploader, so nothing is started or
    staged; `held`: the workdir's hold, asked before every save and upload."""
    require_held = held.require if held else None
    return CheckpointStore(
        wd.checkpoints,
        model=parts.model,
        optimizer=parts.optimizer,
        keep=config.checkpoint.keep,
        num_replicas=runtime.num_replicas,
        # TF needs every worker to save; the others write to a scratch folder.
        save_directory=None if runtime.is_chief else storage.join(wd.worker_temp(runtime.worker_index), "checkpoints"),
        # What the loop needs back on resume, and the lookahead's slow weights, by checkpoint name.
        extra={**act.checkpointed_state(), **({"lookahead": parts.lookahead.state} if parts.lookahead else {})},
        optional=act.ADDED_LATER,
        warn=console.warning,
        # A remote workdir: saves land on local disk and are uploaded behind training.
        require_held=require_held,
        uploads=CheckpointUploads(wd.checkpoints, config.checkpoint.keep, require_held)
        if runtime.is_chief and storage.is_url(wd.root) and not read_only
        else None,
    )
