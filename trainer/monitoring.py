"""Everything a run shows in TensorBoard, written with TensorBoard's own APIs.

WORKDIR/tensorboard/ is one HParams session: the run's hyperparameters live at its top,
training scalars, images and histograms in train/, evaluation in eval/, profiler traces
in plugins/profile/. Only the chief writes; on other workers every method is a no-op.
What is written when (train scalars per logging window, images only at the start and at
evaluations) keeps the cost small: see the README's Monitoring section for the measured
overhead.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams

from trainer import storage
from trainer.config import Config, hyperparameter_items, profile_range, to_yaml
from trainer.evaluation import EvalMetrics
from trainer.sums import StepSums
from trainer.visualize import confusion_matrix_image, sample_grid

_MISCLASSIFIED_SHOWN = 16
# The HParams tab's metrics, logged in the session's own run (the logdir root). TensorBoard
# finds a metric of group G in run SESSION/G; opened at WORKDIR/tensorboard the session is
# run ".", and "./eval" matches no run ("eval" does), so a group would leave the columns
# empty there. Metrics without a group live in the session's run whatever the logdir.
_HPARAMS_METRICS = {
    "hparams/eval_accuracy": "eval accuracy",
    "hparams/eval_loss": "eval loss",
    "hparams/train_loss": "train loss",
}


def _image_tensor(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)[None]


class Monitor:
    """Owns the summary writers and decides what each event looks like."""

    def __init__(self, config: Config, logdir: str, enabled: bool, class_names: list[str]) -> None:
        self.config, self.logdir, self.enabled, self.class_names = config, logdir, enabled, class_names
        if enabled:
            self.root = tf.summary.create_file_writer(str(logdir))
            self.train = tf.summary.create_file_writer(storage.join(logdir, "train"))
            self.eval = tf.summary.create_file_writer(storage.join(logdir, "eval"))
        else:
            self.root = self.train = self.eval = tf.summary.create_noop_writer()
        tb = config.tensorboard
        self.profile = profile_range(tb.profile_steps) if tb.profile_steps else None
        self._profiling = False

    # --- once per run ------------------------------------------------------------------

    def shows_input_grid(self, step: int) -> bool:
        """Whether `start(step, ...)` draws the augmented input grid (a fresh run with images
        on): its caller decodes the sample images only then."""
        return self.enabled and step == 0 and self.config.tensorboard.images

    def start(self, step: int, environment: dict[str, str], sample_images: np.ndarray | None, sample_labels) -> None:
        """Config, environment and hyperparameters; the augmented input grid on a fresh run
        (`sample_images`: None when `shows_input_grid(step)` is not)."""
        if not self.enabled:
            return
        with self.train.as_default(step=step):
            tf.summary.text("config", "```\n" + to_yaml(self.config) + "```")
            rows = "\n".join(f"| {key} | {value} |" for key, value in environment.items())
            tf.summary.text("environment", "| | |\n|---|---|\n" + rows)
            if self.shows_input_grid(step):
                names = [self.class_names[label] for label in sample_labels]
                tf.summary.image("inputs/augmented_batch", _image_tensor(sample_grid(sample_images, names)))
        with self.root.as_default(step=step):
            hparams.hparams_config(
                hparams=[hparams.HParam(key) for key in hyperparameters(self.config)],
                metrics=[hparams.Metric(tag, display_name=name) for tag, name in _HPARAMS_METRICS.items()],
            )
            hparams.hparams(hyperparameters(self.config), trial_id=storage.parent_of(self.logdir))

    # --- during training ---------------------------------------------------------------

    def log_train(self, step: int, sums: StepSums, extra: dict[str, float]) -> None:
        """Scalars of one logging window: means over its steps, plus point values in `extra`."""
        if not self.enabled:
            return
        with self.train.as_default(step=step):
            if sums.examples:
                tf.summary.scalar("loss", sums.loss / sums.examples)
                tf.summary.scalar("accuracy", sums.correct / sums.examples)
            if sums.steps:
                tf.summary.scalar("gradient_norm", sums.gradient_norm / sums.steps)
            for name, value in extra.items():
                tf.summary.scalar(name, value)
        if sums.examples:
            with self.root.as_default(step=step):
                tf.summary.scalar("hparams/train_loss", sums.loss / sums.examples)

    def log_histograms(self, step: int, model: keras.Model, probe: np.ndarray) -> None:
        """Weights and activations (of a fixed probe batch), for spotting dead or exploding layers."""
        if not self.enabled:
            return
        layers = [layer for layer in model.layers if layer.weights or isinstance(layer, keras.layers.ReLU)]
        activations = keras.Model(model.input, [layer.output for layer in layers])(probe, training=False)
        with self.train.as_default(step=step):
            for variable in model.trainable_variables:
                tf.summary.histogram(f"weights/{variable.path}", variable)
            for layer, output in zip(layers, activations):
                tf.summary.histogram(f"activations/{layer.name}", tf.cast(output, tf.float32))

    def profile_boundaries(self) -> list[int]:
        return list(self.profile) if self.profile else []

    def update_profiler(self, step: int) -> None:
        """Trace steps [START, END): the loop stops exactly at both, see profile_boundaries."""
        if not self.enabled or not self.profile:
            return
        start, end = self.profile
        if not self._profiling and start <= step < end:
            tf.profiler.experimental.start(str(self.logdir))
            self._profiling = True
        elif self._profiling and step >= end:
            tf.profiler.experimental.stop()
            self._profiling = False

    # --- evaluation --------------------------------------------------------------------

    def log_eval(self, step: int, metrics: EvalMetrics, misclassified: tuple[np.ndarray, list[str]] | None) -> None:
        if not self.enabled:
            return
        with self.root.as_default(step=step):
            tf.summary.scalar("hparams/eval_accuracy", metrics.accuracy)
            tf.summary.scalar("hparams/eval_loss", metrics.loss)
        with self.eval.as_default(step=step):
            tf.summary.scalar("loss", metrics.loss)
            tf.summary.scalar("accuracy", metrics.accuracy)
            for name, accuracy in metrics.per_class_accuracy.items():
                tf.summary.scalar(f"per_class_accuracy/{name}", accuracy)
            if self.config.tensorboard.images:
                image = confusion_matrix_image(metrics.confusion_matrix, self.class_names)
                tf.summary.image("confusion_matrix", _image_tensor(image))
                if misclassified is not None and len(misclassified[0]):
                    grid = sample_grid(misclassified[0], misclassified[1], columns=8)
                    tf.summary.image("misclassified", _image_tensor(grid))

    def log_tta(self, step: int, metrics: EvalMetrics, tta: str) -> None:
        """The final test-time-augmented score, beside the single-view curve."""
        if self.enabled:
            with self.eval.as_default(step=step):
                tf.summary.scalar(f"accuracy_tta_{tta}", metrics.accuracy)

    def close(self) -> None:
        if self._profiling:
            with contextlib.suppress(Exception):
                tf.profiler.experimental.stop()
        for writer in (self.root, self.train, self.eval):
            writer.flush()


def hyperparameters(config: Config) -> dict[str, object]:
    """Every config key as a flat `section.key` -> value, for the HParams table."""
    return hyperparameter_items(config)


def misclassified_examples(model: keras.Model, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """Up to 16 images from `images` the model gets wrong, captioned "true>predicted"."""
    predictions = np.argmax(model(images.astype(np.float32), training=False), axis=-1)
    wrong = np.flatnonzero(predictions != labels)[:_MISCLASSIFIED_SHOWN]
    captions = [f"{class_names[labels[i]][:5]}>{class_names[predictions[i]][:5]}" for i in wrong]
    return images[wrong], captions
