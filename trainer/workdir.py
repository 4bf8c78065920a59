"""The workdir layout, in one place, so every command finds the same files.

WORKDIR/.trainer-workdir   marker: this folder was created by `launch train`
WORKDIR/config.yaml        resolved config of the last `launch train`
WORKDIR/dataset.json       class names, image shape, normalisation stats
WORKDIR/checkpoints/       tf.train.CheckpointManager files (ckpt-STEP.*)
WORKDIR/tensorboard/       train/ and eval/ event files
WORKDIR/metrics.json       last evaluation (train's final eval or `launch evaluate`)
WORKDIR/export/            model.keras and saved_model/ from `launch export`

What is never lost: the trainer writes only into a folder that is empty, new, or carries
its marker, and `--fresh` deletes only files whose names the trainer itself gives them
(checkpoints, event files, metrics), never the folder, never anything else in it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer import files
from trainer.config import Config, load_config
from trainer.data.info import DatasetInfo
from trainer.errors import CheckpointError, WorkdirBusyError, WorkdirNotOursError

MARKER = ".trainer-workdir"
# Names the trainer gives the files it writes, per folder: what --fresh may delete.
_CHECKPOINT_FILES = re.compile(r"^(ckpt-\d+(\.index|\.data-\d+-of-\d+)|checkpoint|best\.json|\..+\.tmp)$")
_CHECKPOINT_TEMP_FOLDERS = re.compile(r"^ckpt-\d+_temp.*$")
_EVENT_FILES = re.compile(r"^(events\.out\.tfevents\..+|\..+\.tmp)$")
_PROFILE_RUNS = re.compile(r"^\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}$")
_DATASET_INFO_KEYS = {"class_names", "image_shape", "mean", "std", "origin"}


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def marker_path(self) -> Path:
        return self.root / MARKER

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

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    # --- whose folder is it --------------------------------------------------------------

    def is_ours(self) -> bool:
        """Marked by us, or a workdir of a version from before the marker (adopted)."""
        return self.marker_path.is_file() or self._looks_like_an_unmarked_workdir()

    def _looks_like_an_unmarked_workdir(self) -> bool:
        info = files.read_json(self.dataset_info_path, warn=lambda _: None, what="")
        return isinstance(info, dict) and info.keys() >= _DATASET_INFO_KEYS and self.config_path.is_file()

    def check_trainable(self, fresh: bool) -> None:
        """Refuse (before anything is written) a folder that holds files we did not create."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise WorkdirNotOursError(f"--workdir {self.root} is a file, not a folder")
        if self.is_ours():
            return
        entries = sorted(entry.name for entry in self.root.iterdir() if entry.name != ".lock")
        if not entries:
            return
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        why = (
            "--fresh deletes only what launch train created, and it created nothing here"
            if fresh
            else "training would write config.yaml, metrics.json, checkpoints/ and tensorboard/ among them"
        )
        raise WorkdirNotOursError(
            f"{self.root} is not a workdir of launch train (no {MARKER} marker) and holds other files ({shown}); "
            f"{why}. Choose a new or empty --workdir"
        )

    def claim(self) -> None:
        """Mark the folder as ours (at its creation, or when adopting an unmarked workdir)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.marker_path.is_file():
            files.write_json(self.marker_path, {"created_by": "launch train", "layout": 1})

    # --- one trainer at a time -----------------------------------------------------------

    def check_not_busy(self) -> None:
        """Fail early, without creating anything, if a trainer holds the lock now."""
        import fcntl

        if not self.lock_path.is_file():
            return
        with open(self.lock_path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(handle) from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def is_busy(self) -> bool:
        try:
            self.check_not_busy()
        except WorkdirBusyError:
            return True
        return False

    def _busy(self, handle) -> WorkdirBusyError:
        handle.seek(0)
        owner = handle.read(32).strip() or "unknown"
        return WorkdirBusyError(
            f"{self.root} is in use by another trainer (pid {owner}); wait for it to finish, "
            "stop it, or pick another --workdir"
        )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold WORKDIR/.lock so that two trainers never write one workdir at once.

        An OS file lock (flock) is released by the kernel when its process dies, so a
        killed trainer never leaves a stale lock behind.
        """
        import fcntl  # POSIX only, like the signals the trainer handles

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(handle) from None
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

    # --- --fresh -------------------------------------------------------------------------

    def clear_training_state(self) -> list[Path]:
        """`--fresh`: delete the checkpoints, event files and metrics the trainer wrote.

        Only files named the way the trainer names them go; folders go only once empty,
        so anything a user put inside (notes, another tool's logs) stays. Returns what went.
        """
        removed: list[Path] = []
        for folder in (self.checkpoints, self.checkpoints / "best"):
            removed += _remove_matching(folder, _CHECKPOINT_FILES, _CHECKPOINT_TEMP_FOLDERS)
        for folder in (self.tensorboard, self.tensorboard / "train", self.tensorboard / "eval"):
            removed += _remove_matching(folder, _EVENT_FILES)
        removed += _remove_matching(self.tensorboard / "plugins" / "profile", None, _PROFILE_RUNS)
        for path in (self.metrics_path, self.root / "metrics-evaluate.json"):
            if path.is_file():
                path.unlink()
                removed.append(path)
        if (self.root / ".worker-temp").is_dir():
            shutil.rmtree(self.root / ".worker-temp")
            removed.append(self.root / ".worker-temp")
        for folder in (
            self.checkpoints / "best",
            self.checkpoints,
            self.tensorboard / "plugins" / "profile",
            self.tensorboard / "plugins",
            self.tensorboard / "train",
            self.tensorboard / "eval",
            self.tensorboard,
        ):
            _remove_if_empty(folder)
        return removed

    # --- side files ----------------------------------------------------------------------

    def write_dataset_info(self, info: DatasetInfo) -> None:
        files.write_json(self.dataset_info_path, asdict(info))

    def read_dataset_info(self, warn: files.Warn) -> DatasetInfo | None:
        """dataset.json, or None (with a warning) when it is damaged: callers rebuild it."""
        raw = files.read_json(self.dataset_info_path, warn, "rebuilding it from the dataset")
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) != _DATASET_INFO_KEYS:
            warn(f"Warning: {self.dataset_info_path} is damaged (unexpected content); rebuilding it from the dataset")
            return None
        return DatasetInfo(**raw)

    def require_config(self) -> Config:
        """The config the workdir was trained with, or a clear error."""
        if not self.config_path.is_file():
            raise CheckpointError(
                f"{self.root} is not a training workdir (no config.yaml); "
                f"run `launch train --workdir {self.root}` first"
            )
        return load_config(self.config_path)


def _remove_matching(folder: Path, file_names: re.Pattern | None, folder_names: re.Pattern | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if folder_names and folder_names.match(entry.name):
                shutil.rmtree(entry)
                removed.append(entry)
        elif file_names and file_names.match(entry.name):
            entry.unlink()
            removed.append(entry)
    return removed


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # missing, or holds something that is not ours: it stays
        folder.rmdir()
