"""Checkpoints in WORKDIR/checkpoints: model, optimizer, global step, epoch, RNG states.

`tf.train.CheckpointManager` does the writing and rotation. Keras 3 `SeedGenerator`
states (Dropout's randomness) are not tracked by `tf.train.Checkpoint` through the
model, so they are added explicitly: without them a resumed run draws different masks.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from trainer.errors import CheckpointError


def seed_generator_states(model: keras.Model) -> dict[str, tf.Variable]:
    return {
        layer.name: layer.seed_generator.state
        for layer in model.layers
        if getattr(layer, "seed_generator", None) is not None
    }


class CheckpointStore:
    """The training state and its manager; `save`/`restore_latest` keep them in step."""

    def __init__(
        self,
        directory: str | Path,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer | None = None,
        keep: int = 3,
    ) -> None:
        self.directory = Path(directory)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        objects = {
            "model": model,
            "step": self.step,
            "epoch": self.epoch,
            "seed_generators": seed_generator_states(model),
        }
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self._for_training = optimizer is not None
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=keep)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def restore_latest(self) -> int | None:
        """Restore the newest checkpoint; returns its global step, or None if there is none."""
        path = self.latest
        if path is None:
            return None
        status = self.checkpoint.restore(path)
        if self._for_training:
            status.assert_existing_objects_matched()
        else:
            status.expect_partial()  # evaluation needs the weights, not the optimizer slots
        return int(self.step.numpy())

    def require_latest(self) -> int:
        """Like `restore_latest`, but a missing checkpoint is the user's error."""
        step = self.restore_latest()
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {self.directory}; train first with `launch train --workdir {self.directory.parent}`"
            )
        return step

    def save(self, step: int, epoch: int) -> str:
        self.step.assign(step)
        self.epoch.assign(epoch)
        return self.manager.save(checkpoint_number=step)
