"""`launch train --from WORKDIR[:latest|best|STEP]`: a new run that starts from another run's weights.

Only the model's variables are taken (its weights and BatchNorm statistics), not the
optimizer (slots, iterations), the step, the epoch, the dropout RNG states or the
lookahead's slow copy: the run starts at step 0 with its own optimizer and schedule, a
fine-tune or a warm start. The checkpoint is restored into the model this config builds,
before anything is written, and every variable of that model must be found in it with its
shape: another architecture (model.name, model.width, the number of classes, the image
size of a net whose head depends on it) is one line naming both workdirs and what differs.
It comes on top of the run's usual starting weights (`model.weights`, the whitening
layer's data initialisation), which it replaces.

A run so started keeps `started_from.json` (which run, which checkpoint, its step), so
what it started from is known later; `--from` never resumes: a target workdir holding
checkpoints is refused (`--fresh`, or another `--workdir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from trainer import files, storage
from trainer.checkpoints import CheckpointStore, checkpoint_steps
from trainer.config import Config, config_differences
from trainer.data.info import DatasetInfo
from trainer.errors import CheckpointError, CheckpointMismatchError, ConfigError, TrainerError
from trainer.workdir import Workdir

__all__ = ["WarmStart"]

# As trainer.checkpoints: a file that cannot be read, and one that holds another model.
_UNREADABLE = (tf.errors.OpError, IndexError, KeyError)
_MISMATCH = (ValueError, AssertionError)
# The keys that shape the model's variables (besides the data's classes and image size).
_SHAPING_KEYS = ("model.name", "model.width")


@dataclass
class WarmStart:
    """Where a `--from` run takes its weights; `step` once they are loaded."""

    source: Workdir
    checkpoint: str = "latest"  # latest, best or a step number
    step: int | None = None

    @classmethod
    def parse(cls, text: str) -> WarmStart:
        """`WORKDIR`, `WORKDIR:latest`, `WORKDIR:best` or `WORKDIR:STEP` (a gs:// URL's colon is the scheme's)."""
        if not text.strip():
            raise ConfigError("--from is empty (an unset shell variable?); name a workdir, e.g. --from runs/smoke")
        head, colon, which = text.rpartition(":")
        if colon and head and (which in ("latest", "best") or (files.digits(which) and len(which) <= 19)):
            return cls(Workdir(head), which)
        if colon and head and files.digits(which):  # no step has that many digits: said, not taken for a path
            raise ConfigError(
                f"--from {files.short(head, 100)}:STEP: a step of {len(which):,} digits is no checkpoint's "
                "(at most 19: 2**63 - 1)"
            )
        return cls(Workdir(text))

    @property
    def spelled(self) -> str:
        """As the user would write it again."""
        return self.source.root if self.checkpoint == "latest" else f"{self.source.root}:{self.checkpoint}"

    # --- before anything is built ----------------------------------------------------------

    def check(self, wd: Workdir, fresh: bool) -> None:
        """Refuse, before the data is read: a source that is not a workdir or lacks the named
        checkpoint, a target that is the source itself, or one holding a run to resume."""
        self._source_config()
        if self.checkpoint == "best" and not checkpoint_steps(storage.join(self.source.checkpoints, "best")):
            raise self._missing()
        if self.checkpoint != "best" and self._listed_step() is None:
            raise self._missing()
        if _same_folder(self.source, wd):
            raise ConfigError(
                f"--from {self.source.root} is the workdir this run would train in; start the new run in another "
                "--workdir"
            )
        self.check_target(wd, fresh)

    def check_target(self, wd: Workdir, fresh: bool) -> None:
        """Refuse a target holding a run to resume; again once the workdir is held (trainer.training),
        as another run may have trained there since the first look."""
        steps = checkpoint_steps(wd.checkpoints)
        if steps and not fresh:
            raise ConfigError(
                f"--from starts a new run, but {wd.root} holds a run to resume (checkpoint at step {steps[0]}); "
                "use --fresh to start over there (it deletes its checkpoints), or another --workdir"
            )

    # --- once the model is built -----------------------------------------------------------

    def load_into(self, model: keras.Model, config: Config, info: DatasetInfo, target: Workdir) -> str:
        """Restore the source checkpoint's model variables into `model`; returns the console line."""
        source_config = self._source_config()
        path, step = self._checkpoint(model)
        try:
            # read(), not restore(): restore() also wants the root's save counter, which the
            # best checkpoint (Checkpoint.write, trainer.checkpoints.save_best) does not hold.
            status = tf.train.Checkpoint(model=model).read(path)
            status.assert_existing_objects_matched()  # every variable of the model, found with its shape
        except _MISMATCH as err:
            what = self._what_differs(source_config, config, info) or files.short(str(err), 160)
            raise CheckpointMismatchError(
                f"--from {self.source.root}: its checkpoint at step {step} does not fit the model this config builds "
                f"for {target.root} ({what}); start from a run of the same model.name and model.width, trained on "
                "images of the same size and number of classes"
            ) from None
        except _UNREADABLE as err:
            raise CheckpointError(
                f"--from {self.source.root}: checkpoint {path} is unreadable ({files.short(str(err))}); "
                f"name another one with --from {self.source.root}:STEP"
            ) from None
        status.expect_partial()  # its optimizer, step and RNG states are left out on purpose
        self.step = step
        return f"Starting from the weights of {self.source.root} at step {step}"

    def _source_config(self) -> Config | None:
        """The source's config (to name what differs), or None if it cannot be read; no
        config.yaml and no checkpoints: not a workdir at all."""
        try:
            return self.source.require_config()
        except TrainerError as err:
            if checkpoint_steps(self.source.checkpoints):
                return None
            raise CheckpointError(f"--from {self.source.root}: {err}") from None

    def _checkpoint(self, model: keras.Model) -> tuple[str, int]:
        """The path and step of the checkpoint `self.checkpoint` names."""
        folder = self.source.checkpoints
        if self.checkpoint == "best":
            record = CheckpointStore(folder, model=model).best_record  # best.json, or rebuilt from best/
            if record is None:
                raise self._missing()
            return storage.join(folder, "best", f"ckpt-{record['step']}"), int(record["step"])
        step = self._listed_step()
        if step is None:
            raise self._missing()
        return storage.join(folder, f"ckpt-{step}"), step

    def _listed_step(self) -> int | None:
        """The step of the latest or numbered checkpoint, if the source holds it."""
        steps = checkpoint_steps(self.source.checkpoints)
        if self.checkpoint == "latest":
            return steps[0] if steps else None
        return int(self.checkpoint) if int(self.checkpoint) in steps else None

    def _missing(self) -> CheckpointError:
        folder = self.source.checkpoints
        if self.checkpoint == "best":
            where = storage.join(folder, "best")
            return CheckpointError(
                f"--from {self.spelled}: no best checkpoint in {where} (checkpoint.keep_best was off?)"
            )
        available = ", ".join(map(str, sorted(checkpoint_steps(folder)))) or "none"
        return CheckpointError(f"--from {self.spelled}: no such checkpoint in {folder} (steps available: {available})")

    def _what_differs(self, source_config: Config | None, config: Config, info: DatasetInfo) -> str:
        """What shapes the two models differently, as `model.width 16 -> 8, classes 10 -> 5`."""
        changes = []
        if source_config is not None:
            changes = [change for change in config_differences(source_config, config) if change[0] in _SHAPING_KEYS]
        source_info = self.source.read_dataset_info(warn=lambda _: None)
        if source_info is not None:
            if len(source_info.class_names) != len(info.class_names):
                changes.append(("classes", str(len(source_info.class_names)), str(len(info.class_names))))
            if list(source_info.image_shape[:2]) != list(info.image_shape[:2]):
                changes.append(("image size", _size(source_info.image_shape), _size(info.image_shape)))
        return ", ".join(f"{key} {before} -> {after}" for key, before, after in changes)

    # --- once the run is known to start ----------------------------------------------------

    def record(self, wd: Workdir) -> None:
        """started_from.json: which run's weights this one started from."""
        files.write_json(
            wd.started_from_path, {"workdir": self.source.root, "checkpoint": self.checkpoint, "step": self.step}
        )


def _size(shape: list[int]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _same_folder(a: Workdir, b: Workdir) -> bool:
    if storage.is_url(a.root) or storage.is_url(b.root):
        return a.root.rstrip("/") == b.root.rstrip("/")
    return os.path.realpath(a.root) == os.path.realpath(b.root)
