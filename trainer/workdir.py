"""The workdir layout, in one place, so every command finds the same files.

WORKDIR/config.yaml        resolved config of the last `launch train`
WORKDIR/dataset.json       class names, image shape, normalisation stats
WORKDIR/checkpoints/       tf.train.CheckpointManager files (ckpt-STEP.*)
WORKDIR/tensorboard/       train/ and eval/ event files
WORKDIR/metrics.json       last evaluation (train's final eval or `launch evaluate`)
WORKDIR/export/            model.keras and saved_model/ from `launch export`
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import Config, load_config
from trainer.errors import CheckpointError, WorkdirBusyError


@dataclass
class DatasetInfo:
    """What inference needs to know about the training data, without the data."""

    class_names: list[str]
    image_shape: list[int]
    mean: list[float]
    std: list[float]
    origin: str


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def dataset_info_path(self) -> Path:
        return self.root / "dataset.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold WORKDIR/.lock so that two trainers never write one workdir at once.

        An OS file lock (flock) is released by the kernel when its process dies, so a
        killed trainer never leaves a stale lock behind.
        """
        import fcntl  # POSIX only, like the signals the trainer handles

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                raise WorkdirBusyError(
                    f"{self.root} is in use by another trainer (pid {owner}); wait for it to finish, "
                    "stop it, or pick another --workdir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def worker_temp(self, worker_index: int) -> Path:
        """Scratch folder of a non-chief worker (it must save too; the chief's copy counts)."""
        return self.root / ".worker-temp" / f"worker-{worker_index}"

    def clear_training_state(self) -> None:
        """`--fresh`: forget checkpoints, event files and metrics of earlier runs."""
        for path in (self.checkpoints, self.tensorboard):
            shutil.rmtree(path, ignore_errors=True)
        self.metrics_path.unlink(missing_ok=True)

    def write_dataset_info(self, info: DatasetInfo) -> None:
        self.dataset_info_path.write_text(json.dumps(asdict(info), indent=2))

    def require_trained(self) -> tuple[Config, DatasetInfo]:
        """Config and dataset info of a trained workdir, or a clear error."""
        if not self.config_path.is_file() or not self.dataset_info_path.is_file():
            raise CheckpointError(
                f"{self.root} is not a training workdir (no config.yaml/dataset.json); "
                f"run `launch train --workdir {self.root}` first"
            )
        info = DatasetInfo(**json.loads(self.dataset_info_path.read_text()))
        return load_config(self.config_path), info
