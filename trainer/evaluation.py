"""Evaluation: every test image exactly once, under the same strategy as training.

The compiled pass sums the loss and a confusion matrix across replicas; accuracy and
per-class accuracy are derived from the matrix, so nothing is averaged twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import tensorflow as tf

from trainer import files
from trainer.data.pipeline import eval_dataset_fn
from trainer.data.plan import InputSpec, check_batch_divides
from trainer.data.splits import Examples
from trainer.signals import waited_on


@dataclass
class EvalMetrics:
    accuracy: float
    loss: float
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    examples: int
    step: int

    def write(self, path: str) -> None:
        """Atomically: a reader never sees half of it."""
        files.write_json(path, asdict(self))


def per_example_loss(labels: tf.Tensor, logits: tf.Tensor, num_classes: int, label_smoothing: float = 0.0):
    """Softmax cross-entropy in float32 (logits are float32 even under mixed precision)."""
    targets = tf.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))


def tta_logits(model, images: tf.Tensor, tta: str = "none") -> tf.Tensor:
    """Logits for float images (NHWC), averaged over test-time views.

    flip: the image and its mirror. flip_translate (airbench): weight 1/2 on those two,
    1/4 on each of two copies shifted by one pixel (up-left, down-right; mirrored border).
    """

    def mirrored_pair(x):
        logits = model(x, training=False)
        if tta == "none":
            return logits
        return 0.5 * (logits + model(tf.reverse(x, axis=[2]), training=False))

    base = mirrored_pair(images)
    if tta != "flip_translate":
        return base
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    up_left = mirrored_pair(padded[:, :height, :width])
    down_right = mirrored_pair(padded[:, 2 : height + 2, 2 : width + 2])
    return 0.5 * base + 0.25 * up_left + 0.25 * down_right


class Evaluator:
    """Builds the distributed test set once and a compiled pass over it per TTA mode."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model,
        split: Examples,
        global_batch: int,
        class_names,
        jit_compile: bool = False,
        spec: InputSpec | None = None,
    ):
        check_batch_divides(global_batch, strategy.num_replicas_in_sync)
        self.strategy = strategy
        self.model = model
        self.class_names = list(class_names)
        self.examples = len(split)
        self.jit_compile = jit_compile
        self.dataset = strategy.distribute_datasets_from_function(
            eval_dataset_fn(split, replace(spec, global_batch=global_batch) if spec else global_batch)
        )
        self._passes: dict[str, object] = {}

    def _eval_pass(self, tta: str):
        """The compiled pass for one `eval.tta` mode, built on first use."""
        if tta in self._passes:
            return self._passes[tta]
        model, strategy, num_classes = self.model, self.strategy, len(self.class_names)

        @tf.function(jit_compile=self.jit_compile, autograph=False)  # no control flow on tensors
        def eval_step(images, labels, mask):
            logits = tta_logits(model, tf.cast(images, tf.float32), tta)
            loss_sum = tf.reduce_sum(per_example_loss(labels, logits, num_classes) * mask)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            confusion = tf.math.confusion_matrix(
                labels, predictions, num_classes, weights=tf.cast(mask, tf.int64), dtype=tf.int64
            )
            return loss_sum, confusion

        @tf.function
        def eval_pass(dataset):
            loss_sum = tf.constant(0.0)
            confusion = tf.zeros([num_classes, num_classes], tf.int64)
            for images, labels, mask in dataset:
                replica_loss, replica_confusion = strategy.run(eval_step, args=(images, labels, mask))
                loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, replica_loss, axis=None)
                confusion += strategy.reduce(tf.distribute.ReduceOp.SUM, replica_confusion, axis=None)
            return loss_sum, confusion

        self._passes[tta] = eval_pass
        return eval_pass

    def __call__(self, step: int, tta: str = "none") -> EvalMetrics:
        """Metrics over the whole test set; `tta` as in `eval.tta`."""
        eval_pass = self._eval_pass(tta)
        # In another thread: signals are handled at once while the pass runs (trainer.signals).
        loss_sum, confusion = waited_on(lambda: eval_pass(self.dataset), "evaluation")
        confusion = confusion.numpy()
        seen = int(confusion.sum())
        if seen != self.examples:  # a broken pipeline must not report a plausible number
            raise AssertionError(f"evaluation saw {seen} examples, expected {self.examples}")
        per_class_total = confusion.sum(axis=1)
        per_class = np.divide(
            np.diag(confusion), per_class_total, out=np.zeros(len(per_class_total)), where=per_class_total > 0
        )
        return EvalMetrics(
            accuracy=float(np.trace(confusion) / seen),
            loss=float(loss_sum.numpy() / seen),
            per_class_accuracy={name: float(acc) for name, acc in zip(self.class_names, per_class)},
            confusion_matrix=confusion.tolist(),
            examples=seen,
            step=step,
        )


def format_metrics(metrics: EvalMetrics) -> str:
    """A short per-class table for the console."""
    width = max(len(name) for name in metrics.per_class_accuracy)
    lines = [
        f"Test accuracy {metrics.accuracy:.2%}  loss {metrics.loss:.4f}  "
        f"({metrics.examples} images, step {metrics.step})"
    ]
    lines += [f"  {name:<{width}}  {acc:6.1%}" for name, acc in metrics.per_class_accuracy.items()]
    return "\n".join(lines)
