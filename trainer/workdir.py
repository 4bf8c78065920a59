"""The workdir layout, in one place, so every command finds the same files.

WORKDIR/.trainer-workdir   marker: this folder was created by `launch train`
WORKDIR/config.yaml        resolved config of the last `launch train`
WORKDIR/config-STEP.yaml   the config the run had up to STEP, kept when a resume changed settings
WORKDIR/started_from.json  `--from`: the run and checkpoint whose weights this run started from
WORKDIR/dataset.json       class names, image shape, normalisation stats
WORKDIR/unreadable.json    data.on_bad_image=skip's findings (trainer.data.skips)
WORKDIR/checkpoints/       tf.train.CheckpointManager files (ckpt-STEP.*)
WORKDIR/tensorboard/       train/ and eval/ event files
WORKDIR/metrics.json       last evaluation (train's final eval or `launch evaluate`)
WORKDIR/export/            model.keras and saved_model/ from `launch export`
WORKDIR/.lock              local disks: the trainer's flock (one trainer at a time)
WORKDIR/.export.lock       local disks: `launch export`'s flock (trainer.files.replacing_folder)
WORKDIR/.lease.json        other stores (gs://, ...): the trainer's lease (trainer.lease)

The workdir may live on any filesystem TensorFlow knows (trainer.storage).

What is never lost: the trainer writes only into a folder that is empty, new, or carries
its marker, and `--fresh` deletes only files whose names the trainer itself gives them
(checkpoints, event files, metrics), never the folder, never anything else in it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from trainer import files, storage
from trainer.config import Config, config_differences, load_config
from trainer.data.decode import MAX_IMAGE_PIXELS
from trainer.data.info import DatasetInfo
from trainer.errors import (
    CheckpointError,
    TrainerError,
    WorkdirBusyError,
    WorkdirNotOursError,
    WorkdirWriteError,
)
from trainer.lease import LEASE, Lease, Ownership, check_free
from trainer.say import Say

MARKER = ".trainer-workdir"
# Names the trainer gives the files it writes, per folder: what --fresh may delete.
# [0-9], not \d (which matches any script's digits): only names the trainer writes.
_CHECKPOINT_FILES = re.compile(r"^(ckpt-[0-9]+(\.index|\.data-[0-9]+-of-[0-9]+)|checkpoint|best\.json|\..+\.tmp)$")
_CHECKPOINT_TEMP_FOLDERS = re.compile(r"^ckpt-[0-9]+_temp.*$")
_KEPT_CONFIGS = re.compile(r"^config-[0-9]+\.yaml$")
_EVENT_FILES = re.compile(r"^(events\.out\.tfevents\..+|\..+\.tmp)$")
_PROFILE_RUNS = re.compile(r"^[0-9]{4}_[0-9]{2}_[0-9]{2}_[0-9]{2}_[0-9]{2}_[0-9]{2}$")
_DATASET_INFO_KEYS = {"class_names", "image_shape", "mean", "std", "origin"}
# What the trainer keeps in a local workdir, by kind: another kind of the same name is in its way.
_FOLDERS = (
    ("checkpoints",),
    ("checkpoints", "best"),
    ("tensorboard",),
    ("tensorboard", "train"),
    ("tensorboard", "eval"),
)
_FILES = (
    (MARKER,),
    ("config.yaml",),
    ("started_from.json",),
    ("dataset.json",),
    ("unreadable.json",),
    ("metrics.json",),
    (".lock",),
    ("checkpoints", "best", "best.json"),
)


@dataclass(frozen=True)
class Workdir:
    """A workdir on any filesystem (local, gs://, ...): `root` stays a string (see storage)."""

    root: str

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", storage.workdir_spelling(root))

    def path(self, *names: str) -> str:
        return storage.join(self.root, *names)

    @property
    def marker_path(self) -> str:
        return self.path(MARKER)

    @property
    def config_path(self) -> str:
        return self.path("config.yaml")

    def kept_config_path(self, step: int) -> str:
        """The config the run had up to `step`, kept when a resume changed settings."""
        return self.path(f"config-{step}.yaml")

    @property
    def started_from_path(self) -> str:
        return self.path("started_from.json")

    @property
    def dataset_info_path(self) -> str:
        return self.path("dataset.json")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def tensorboard(self) -> str:
        return self.path("tensorboard")

    @property
    def metrics_path(self) -> str:
        return self.path("metrics.json")

    @property
    def export(self) -> str:
        return self.path("export")

    @property
    def lock_path(self) -> str:
        return self.path(".lock")

    @property
    def in_memory(self) -> bool:
        """ram:// is TensorFlow's in-process filesystem: what is written there is gone when
        the process exits, so no later command (resume, evaluate, export) can find it."""
        return str(self.root).startswith("ram://")

    @property
    def _how_to_train(self) -> str:
        if self.in_memory:  # a `launch train` would vanish with its process too: no command to suggest
            return "ram:// is in-memory: a workdir there lasts only as long as the process that trained it"
        return f"run `launch train --workdir {self.root}` first"

    # --- whose folder is it --------------------------------------------------------------

    def is_ours(self) -> bool:
        """Marked by us, or a workdir of a version from before the marker (adopted)."""
        return storage.isfile(self.marker_path) or self._looks_like_an_unmarked_workdir()

    def _looks_like_an_unmarked_workdir(self) -> bool:
        info = files.read_json(self.dataset_info_path, warn=lambda _: None, what="")
        return isinstance(info, dict) and info.keys() >= _DATASET_INFO_KEYS and storage.isfile(self.config_path)

    def check_trainable(self, fresh: bool) -> None:
        """Refuse (before anything is written) a folder that holds files we did not create."""
        if not storage.exists(self.root):
            if not storage.is_url(self.root) and os.path.islink(self.root):
                # The run would fail at its first write (File exists), once its data was read,
                # and a dry run would call it new.
                raise WorkdirNotOursError(
                    f"--workdir {self.root} is a symbolic link to {os.readlink(self.root)!r}, which does not exist "
                    "(or is a loop of links); create the folder it names, or remove the link"
                )
            return
        if not storage.isdir(self.root):
            raise WorkdirNotOursError(f"--workdir {self.root} is a file, not a folder")
        if self.is_ours():
            self.check_layout()
            return
        entries = sorted(name for name in storage.listdir(self.root) if name not in (".lock", LEASE))
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

    def check_layout(self) -> None:
        """Refuse, before anything is written, a file where the trainer keeps a folder (or
        the reverse): TensorFlow would fail only once the run had started (after --fresh
        deleted the checkpoints), with a FailedPreconditionError traceback.

        Local disk only: object stores (and ram://) have no folders, and an object named
        like one is in nobody's way there.
        """
        if storage.is_url(self.root):
            return
        for names in _FOLDERS:
            self.check_folder(self.path(*names))
        for names in _FILES:
            path = self.path(*names)
            if os.path.isdir(path):
                raise WorkdirWriteError(
                    f"cannot write {path}: it is a folder, where the trainer keeps a file of that name; "
                    "move or rename it, or choose another --workdir"
                )

    def check_folder(self, path: str) -> None:
        """`path` is a folder of ours to write into: absent, or a folder (not a user's file)."""
        if not storage.is_url(path) and os.path.lexists(path) and not os.path.isdir(path):
            raise WorkdirWriteError(
                f"cannot write {path}: it is a file, where the trainer keeps a folder of that name; "
                "move or rename it, or choose another --workdir"
            )

    def claim(self) -> None:
        """Mark the folder as ours (at its creation, or when adopting an unmarked workdir)."""
        storage.makedirs(self.root)
        if not storage.isfile(self.marker_path):
            files.write_json(self.marker_path, {"created_by": "launch train", "layout": 1})

    # --- one trainer at a time -----------------------------------------------------------

    def check_not_busy(self, warn: Say = print) -> None:
        """Fail early, without creating anything, if a trainer holds the workdir now."""
        if storage.is_url(self.root):
            check_free(self.root, warn)
            return
        import fcntl

        if not storage.isfile(self.lock_path):
            return
        with open(self.lock_path, errors="replace") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(files.lock_owner(handle)) from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def is_busy(self) -> bool:
        try:
            self.check_not_busy(warn=lambda _: None)
        except WorkdirBusyError:
            return True
        return False

    def _busy(self, owner: str) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.root} is in use by another trainer (pid {owner}); wait for it to finish, stop it, "
            "or pick another --workdir"
        )

    @contextmanager
    def locked(self, lease_seconds: float, warn: Say = print) -> Iterator[Ownership]:
        """Hold the workdir so that two trainers never write it at once; yields the hold,
        which the run asks before each write (`require`) and tells it when it is lost.

        Local disk: an OS file lock (flock) on WORKDIR/.lock, which the kernel releases
        when its process dies, so a killed trainer never leaves a stale lock behind.
        Other stores (gs://, ...): a lease object renewed in the background, which expires
        `lease_seconds` after its holder died (trainer.lease).
        """
        if storage.is_url(self.root):
            with Lease(self.root, lease_seconds, warn).held() as lease:
                yield lease
            return
        with self._flocked():
            yield Ownership(self.root)  # a file lock is never lost while this process lives

    @contextmanager
    def _flocked(self) -> Iterator[None]:
        storage.makedirs(self.root)
        with files.pid_flock(self.lock_path, self._busy):
            yield

    def worker_temp(self, worker_index: int) -> str:
        """Scratch folder of a non-chief worker (it must save too; the chief's copy counts).

        In the workdir on a shared disk; on local disk for a remote workdir, where a save
        would otherwise stall the worker (and the collective steps after it) on the store.
        """
        if storage.is_url(self.root):
            return os.path.join(tempfile.gettempdir(), f"trainer-worker-{worker_index}-{os.getpid()}")
        return self.path(".worker-temp", f"worker-{worker_index}")

    # --- --fresh -------------------------------------------------------------------------

    def clear_training_state(self) -> list[str]:
        """`--fresh`: delete the checkpoints, event files, metrics and run history the trainer wrote.

        Only files named the way the trainer names them go; folders go only once empty,
        so anything a user put inside (notes, another tool's logs) stays. Returns what went.
        """
        checkpoints, tensorboard = self.checkpoints, self.tensorboard
        removed: list[str] = []
        for folder in (checkpoints, storage.join(checkpoints, "best")):
            removed += _remove_matching(folder, _CHECKPOINT_FILES, _CHECKPOINT_TEMP_FOLDERS)
        for folder in (tensorboard, storage.join(tensorboard, "train"), storage.join(tensorboard, "eval")):
            removed += _remove_matching(folder, _EVENT_FILES)
        removed += _remove_matching(storage.join(tensorboard, "plugins", "profile"), None, _PROFILE_RUNS)
        # unreadable.json too: starting over means checking every image again; a run started
        # over has no earlier configs, nor the --from weights of the one it replaces.
        removed += _remove_matching(self.root, _KEPT_CONFIGS)
        side_files = ("metrics-evaluate.json", "unreadable.json")
        for path in (self.metrics_path, *map(self.path, side_files), self.started_from_path):
            if storage.isfile(path):
                storage.remove(path)
                removed.append(path)
        if storage.isdir(self.path(".worker-temp")):
            storage.rmtree(self.path(".worker-temp"))
            removed.append(self.path(".worker-temp"))
        for folder in (
            ("checkpoints", "best"),
            ("checkpoints",),
            ("tensorboard", "plugins", "profile"),
            ("tensorboard", "plugins"),
            ("tensorboard", "train"),
            ("tensorboard", "eval"),
            ("tensorboard",),
        ):
            storage.remove_if_empty(self.path(*folder))
        return removed

    # --- side files ----------------------------------------------------------------------

    def write_dataset_info(self, info: DatasetInfo) -> None:
        files.write_json(self.dataset_info_path, asdict(info))

    def read_dataset_info(self, warn: Say) -> DatasetInfo | None:
        """dataset.json, or None (with a warning) when it is damaged: callers rebuild it."""
        raw = files.read_json(self.dataset_info_path, warn, "rebuilding it from the dataset")
        if raw is None:
            return None
        problem = dataset_info_problem(raw)
        if problem:
            warn(f"Warning: {self.dataset_info_path} is damaged ({problem}); rebuilding it from the dataset")
            return None
        return DatasetInfo(**raw)

    def require_config(self) -> Config:
        """The config the workdir was trained with, or a clear error."""
        if not storage.isfile(self.config_path):
            raise CheckpointError(f"{self.root} is not a training workdir (no config.yaml); {self._how_to_train}")
        return load_config(self.config_path, bases=False)

    def config_change(self, config: Config) -> str:
        """Which keys differ between config.yaml and `config`, in one sentence.

        For a checkpoint this config cannot restore: the keys that changed since the
        workdir was trained say why, and whether --fresh or another workdir is meant.
        """
        try:
            saved = self.require_config()
        except TrainerError:
            return "Its config.yaml is missing or unreadable, so what changed is unknown."
        changes = config_differences(saved, config)
        if not changes:
            return "config.yaml names the same settings (was it trained by another version?)."
        shown = ", ".join(f"{key} {before} -> {after}" for key, before, after in changes[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        return f"Changed since config.yaml: {shown}{more}."


def _remove_matching(folder: str, file_names: re.Pattern | None, folder_names: re.Pattern | None = None) -> list[str]:
    removed = []
    for name in storage.listdir(folder):
        entry = storage.join(folder, name)
        if storage.isdir(entry) and not os.path.islink(entry):
            if folder_names and folder_names.match(name):
                storage.rmtree(entry)
                removed.append(entry)
        elif file_names and file_names.match(name):
            storage.remove(entry)
            removed.append(entry)
    return removed


def dataset_info_problem(raw: object) -> str | None:
    """What is wrong with a parsed dataset.json, or None when every key has its type and shape.

    Key names are not enough: `"mean": null` or `"class_names": 5` would pass them and fail
    deep inside Keras (a TypeError in predict), where rebuilding the file would have fixed it.
    """
    if not isinstance(raw, dict) or set(raw) != _DATASET_INFO_KEYS:
        keys = ", ".join(sorted(_DATASET_INFO_KEYS))
        return f"expected an object with the keys {keys}"
    names, shape = raw["class_names"], raw["image_shape"]
    # One line each, as every source gives them (labels.txt lines, printable folder names).
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.splitlines() == [n] for n in names)):
        return "class_names must be a list of one-line names"
    if not (isinstance(shape, list) and len(shape) == 3 and all(files.integer_in(n, 1, 2**31) for n in shape)):
        return "image_shape must be [height, width, 3]"
    if shape[2] != 3 or shape[0] * shape[1] > MAX_IMAGE_PIXELS:
        return f"image_shape must be [height, width, 3] of at most {MAX_IMAGE_PIXELS // 2**20} MP"
    for key, low in (("mean", 0.0), ("std", 1e-6)):
        values = raw[key]
        if not (isinstance(values, list) and len(values) == 3 and all(files.number_in(v, low, 255.0) for v in values)):
            return f"{key} must be 3 numbers between {low:g} and 255, one per channel"
    if not isinstance(raw["origin"], str):
        return "origin must be a string"
    return None
