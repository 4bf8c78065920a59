"""One run's assembled parts, as trainer.training hands them to the loop and the run's report.

Two bags, because they are made at two moments: `RunParts` (data, model, optimizer) is
built before the workdir is touched; `Run` adds what needs the workdir held (the
checkpoint store) and what every later step reads (config, runtime, console). Passed
whole, so a function reads `run.parts.model` where it needs it instead of a list of
arguments that grows with every new option.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from trainer.backbones import FreezePlan
from trainer.checkpoints import CheckpointStore
from trainer.config import Config
from trainer.console import Console
from trainer.data import Dataset
from trainer.data.info import DatasetInfo
from trainer.data.plan import InputSpec
from trainer.data.skips import SkipMemo
from trainer.optim import Lookahead
from trainer.runtime import Runtime
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
