"""Checkpoints in WORKDIR/checkpoints: everything that decides the future of a run.

A checkpoint holds the model, the optimizer (slots, iterations, loss scale), the global
step and epoch, the RNG states of random layers, and what the training code hands over as
`extra` state by name: the loop's metric sums of a half-finished logging window
(trainer.loop.actions.checkpointed_state), the lookahead's slow weights. The store knows
nothing of the loop; an extra object's name is its name in the checkpoint, so it must
never change (checkpoints written before the loop handed its sums over hold them under
the same name, "window_sums"). Keras 3 `SeedGenerator` states (Dropout) are not tracked
through the model by `tf.train.Checkpoint`, so they are added explicitly: without them a
resumed run draws different masks. The input stream needs no state: it is a function of
(seed, step).

Which checkpoint files a folder holds, and deleting one, is trainer.checkpoint_files
(shared with the uploader, trainer.staging).

`tf.train.CheckpointManager` writes and rotates. Restoring tries the newest checkpoint
file on disk first and falls back to older ones if it is unreadable (a save killed
half-way, a truncated copy), so the last good checkpoint is never lost. A checkpoint that
reads fine but does not fit the model (another width, another optimizer) is NOT
unreadable: that raises `CheckpointMismatchError`, and nothing is skipped or rotated away.

The best checkpoint lives in best/ with best.json beside it. It is written in an order
that a kill at any moment cannot break: the new checkpoint first, then best.json
(atomically) naming it, and only then the older best checkpoint is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from trainer import files, storage
from trainer.checkpoint_files import checkpoint_steps, remove_checkpoint
from trainer.errors import CheckpointError, CheckpointMismatchError
from trainer.say import Say

if TYPE_CHECKING:
    from trainer.staging import CheckpointUploads

__all__ = ["CheckpointStore", "checkpoint_steps", "remove_checkpoint", "seed_generator_states"]

# Errors that mean "this file cannot be read": try an older checkpoint.
_UNREADABLE = (tf.errors.OpError, IndexError, KeyError)
# Errors that mean "this file is fine but holds another model or optimizer": refuse.
_MISMATCH = (ValueError, AssertionError)


def seed_generator_states(model: keras.Model) -> dict[str, tf.Variable]:
    return {
        layer.name: layer.seed_generator.state
        for layer in model.layers
        if getattr(layer, "seed_generator", None) is not None
    }


class CheckpointStore:
    """The training state and its managers; `save`/`restore` keep them in step."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer | None = None,
        keep: int = 3,
        num_replicas: int = 1,
        save_directory: str | os.PathLike | None = None,
        extra: dict[str, Any] | None = None,
        optional: frozenset[str] = frozenset(),
        warn: Say = print,
        uploads: CheckpointUploads | None = None,
        require_held: Callable[[str], None] | None = None,
    ) -> None:
        """Args:
        directory: where checkpoints are read from (the chief's folder).
        save_directory: where they are written, if elsewhere (non-chief workers).
        extra: more training state to carry, by checkpoint object name: the loop's window
            sums, the lookahead's slow weights. `save(values=...)` assigns new values to
            these variables by the same names. A name is what a checkpoint stores, so
            renaming one breaks the restore of older checkpoints.
        optional: names of `extra` variables that checkpoints written before they were
            added lack: such a checkpoint restores without them, and they keep the value
            they were made with.
        uploads: save into its local staging folder, and upload from there to `directory`
            behind training (remote workdirs; trainer.staging).
        require_held: called with what is about to be written, before each save; raises
            if the workdir's hold was lost (trainer.lease.Ownership.require: a lease taken
            over by another trainer, whose checkpoints this save would overwrite).
        """
        self.directory = str(directory)
        self.warn = warn
        self.save_directory = str(save_directory) if save_directory else self.directory
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.replicas = tf.Variable(num_replicas, dtype=tf.int64, trainable=False, name="replicas")
        objects = {
            "model": model,
            "step": self.step,
            "epoch": self.epoch,
            "replicas": self.replicas,
            "seed_generators": seed_generator_states(model),
        }
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self.extra = dict(extra or {})
        clashes = sorted(objects.keys() & self.extra.keys())
        if clashes:
            raise ValueError(f"extra checkpoint state may not reuse the store's own names: {clashes}")
        objects.update(self.extra)
        self._objects, self._optional = objects, {name: self.extra[name].numpy() for name in optional}
        self._for_training = optimizer is not None
        self._num_replicas = num_replicas
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.uploads = uploads
        self._require_held = require_held or _held_always
        manager_directory = uploads.local if uploads else self.save_directory
        _refuse_special_state_file(manager_directory)
        self.manager = tf.train.CheckpointManager(self.checkpoint, manager_directory, max_to_keep=keep)
        self.restored_path: str | None = None
        self.restored_replicas: int | None = None

    @property
    def best_directory(self) -> str:
        return storage.join(self.directory, "best")

    @property
    def best_record(self) -> dict | None:
        """{"step", "accuracy"} of the best checkpoint, if one was kept.

        A damaged or stale best.json (naming a checkpoint that is gone) is rebuilt from
        the newest checkpoint in best/, with accuracy None (unknown).
        """
        steps = checkpoint_steps(self.best_directory)
        if not steps:
            return None
        record = files.read_json(storage.join(self.best_directory, "best.json"), self.warn, "rebuilding it from best/")
        if _names_a_best_checkpoint(record, steps):
            return record
        return {"step": steps[0], "accuracy": None}

    def restore(self, which: str = "latest", warn: Say | None = None) -> int | None:
        """Restore `latest`, `best` or a step number; returns the restored global step.

        `latest` returns None when there is no checkpoint yet; the others raise. An
        unreadable `latest` falls back to an older checkpoint; a mismatched one raises.
        """
        warn = warn or self.warn
        if which == "best":
            record = self.best_record
            if record is None:
                raise CheckpointError(f"no best checkpoint in {self.best_directory} (checkpoint.keep_best was off?)")
            self._restore_named(storage.join(self.best_directory, f"ckpt-{record['step']}"))
            return int(self.step.numpy())
        if which != "latest":
            step = _parse_step(which)
            if step not in checkpoint_steps(self.directory):
                available = ", ".join(map(str, sorted(checkpoint_steps(self.directory)))) or "none"
                raise CheckpointError(f"no checkpoint at step {step} in {self.directory} (available: {available})")
            self._restore_named(storage.join(self.directory, f"ckpt-{step}"))
            return int(self.step.numpy())
        for step in checkpoint_steps(self.directory):
            path = storage.join(self.directory, f"ckpt-{step}")
            try:
                self._restore_path(path)
                return int(self.step.numpy())
            except _UNREADABLE as err:
                reason = files.short(str(err)) or type(err).__name__
                warn(f"Warning: checkpoint {path} is unreadable ({type(err).__name__}: {reason}); trying an older one")
        return None

    def require(self, which: str = "latest") -> int:
        """Like `restore`, but a missing checkpoint is the user's error."""
        step = self.restore(which)
        if step is None and storage.isfile(self.directory):
            raise CheckpointError(
                f"{self.directory} is a file, where the trainer keeps its checkpoints folder; "
                "move or rename it, or pick the workdir that holds the checkpoints"
            )
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {self.directory}; train first with `launch train --workdir "
                f"{storage.parent_of(self.directory)}`"
            )
        return step

    def _set_position(self, step: int, epoch: int, values: Mapping[str, Any] | None) -> None:
        """The state a save writes besides the variables training updates in place."""
        self.step.assign(step)
        self.epoch.assign(epoch)
        for name, value in (values or {}).items():
            self.extra[name].assign(value)

    def _restore_named(self, path: str) -> None:
        """A checkpoint the user asked for by name: unreadable is an error, not a fallback."""
        try:
            self._restore_path(path)
        except _UNREADABLE as err:
            raise CheckpointError(f"checkpoint {path} is unreadable ({files.short(str(err))})") from err

    def _restore_path(self, path: str) -> None:
        try:
            status = self._checkpoint_for(path).restore(path)
            if self._for_training:
                status.assert_existing_objects_matched()
            else:
                status.expect_partial()  # evaluation needs the weights, not the optimizer slots
        except _MISMATCH as err:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit this model/optimizer ({files.short(str(err))})"
            ) from err
        self.restored_path = path
        self.restored_replicas = int(self.replicas.numpy())
        self.replicas.assign(self._num_replicas)

    def _checkpoint_for(self, path: str) -> tf.train.Checkpoint:
        """What restores `path`: without the optional variables it lacks, which are reset
        to their first value (an unreadable newer checkpoint may have half-restored them)."""
        if not self._optional:
            return self.checkpoint
        try:  # the reader itself: tf.train.list_variables takes a ram:// prefix for a folder
            names = tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_shape_map()
        except tf.errors.OpError:
            return self.checkpoint  # unreadable: the restore below says so, as for any checkpoint
        held = {name.split("/")[0] for name in names}
        lacking = [name for name in self._optional if name not in held]
        if not lacking:
            return self.checkpoint
        for name in lacking:
            self.extra[name].assign(self._optional[name])
        return tf.train.Checkpoint(**{name: value for name, value in self._objects.items() if name not in lacking})

    def save(self, step: int, epoch: int, values: Mapping[str, Any] | None = None) -> str:
        """Write a checkpoint of `step`; `values`: new values of `extra` variables, by name."""
        self._require_held(f"saving the checkpoint of step {step}")
        self._set_position(step, epoch, values)
        if self.uploads is not None:
            self.uploads.make_room()  # this save deletes the oldest staged checkpoint: uploaded by now
        saved = self.manager.save(checkpoint_number=step)
        if self.uploads is None:
            return saved
        self.uploads.submit(step)
        return storage.join(self.directory, f"ckpt-{step}")

    def wait_for_uploads(self) -> None:
        """Every checkpoint saved so far is in the workdir (a no-op without staging)."""
        if self.uploads is not None:
            self.uploads.wait()

    def close(self) -> None:
        if self.uploads is not None:
            self.uploads.close()

    def save_best(self, step: int, epoch: int, accuracy: float, values: Mapping[str, Any] | None = None) -> None:
        """Keep the current state (weights as evaluated) as the best so far, in best/.

        Order matters for a kill at any moment: new checkpoint, then best.json naming it,
        then the old best goes. best.json never names a checkpoint that is already gone.
        """
        self._require_held(f"saving the best checkpoint (step {step})")
        self._set_position(step, epoch, values)
        folder = storage.join(self.save_directory, "best")
        storage.makedirs(folder)
        self.checkpoint.write(storage.join(folder, f"ckpt-{step}"))
        files.write_json(storage.join(folder, "best.json"), {"step": step, "accuracy": float(accuracy)})
        for old in checkpoint_steps(folder):
            if old != step:
                remove_checkpoint(folder, old)


def _held_always(_doing: str) -> None:
    """A store without a hold to lose (evaluation, the dry run, tests)."""


def _refuse_special_state_file(directory: str) -> None:
    """CheckpointManager reads `checkpoint` (its state file) when it starts: a pipe there
    would hold the command forever, waiting for a writer."""
    path = storage.join(directory, "checkpoint")
    kind = storage.special_kind(path)
    if kind:
        raise CheckpointError(
            f"{path} is not a regular file ({kind}); the trainer keeps its checkpoint list there: "
            "move or remove it, then run again"
        )


def _names_a_best_checkpoint(record: Any, steps: list[int]) -> bool:
    """best.json as save_best writes it: an integer step present in best/, an accuracy in [0, 1].

    Checked by type, not only by key: `"step": 16.0` would name ckpt-16.0 (no such file),
    `true` equals step 1, and an accuracy of NaN or Infinity (json.loads reads both) would
    never be beaten, so the best checkpoint would stop following the evaluations.
    """
    if not isinstance(record, dict):
        return False
    step, accuracy = record.get("step"), record.get("accuracy")
    return files.integer_in(step, 0, 2**63 - 1) and step in steps and files.number_in(accuracy, 0.0, 1.0)


def _parse_step(which: str) -> int:
    """A step number; anything else (a 5,000-digit number included) is one short line."""
    text = which.strip()
    if files.digits(text) and len(text) <= 19:  # up to 2**63 - 1: what a step variable holds
        return int(text)
    shown = which if len(which) <= 40 else f"{which[:20]}...({len(which)} characters)"
    raise CheckpointError(f"--checkpoint must be latest, best or a step number, got {shown!r}")
