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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import Config, load_config
from trainer.errors import CheckpointError


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
