"""The tf.data input pipeline: the datasets a strategy distributes, for any kind of split.

`train_dataset_fn` and `eval_dataset_fn` return `distribute_datasets_from_function`
callables; each builds a stream of (epoch, example indices) from trainer.data.plan, cuts
it into this pipeline's replica slices, and hands them to trainer.data.loader. They
dispatch on the split's type: in memory and files by index, TFRecord shards as a seeded
stream of raw records carried beside their ordinals. A new way to feed the same batches
(a tf.data service, a new split type) goes here, beside these two.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tensorflow as tf

from trainer.data.diagnose import window_error
from trainer.data.loader import ExampleLoader
from trainer.data.plan import (
    InputSpec,
    epoch_order,
    epoch_records,
    replica_slices,
    sample_indices,
    steps_per_epoch,
)
from trainer.data.service import served
from trainer.data.splits import Examples, RecordSplit, Split


def train_dataset_fn(examples: Examples, spec: InputSpec, start_step: int, total_steps: int):
    """A `distribute_datasets_from_function` callable yielding global steps [start, total).

    `examples`: a Split (pixels in memory), a FileSplit (decoded here, in parallel, only
    the files of this pipeline's replicas) or a RecordSplit (a resume skips raw records only).
    With `spec.service` set, a tf.data service makes the same batches (trainer.data.service).
    """
    if isinstance(examples, RecordSplit):
        fn = _record_train_dataset_fn(examples, spec, start_step, total_steps)
    else:
        fn = _indexed_train_dataset_fn(examples, spec, start_step, total_steps)
    return served(fn, spec.service, splittable=not isinstance(examples, RecordSplit)) if spec.service else fn


def _indexed_train_dataset_fn(examples: Examples, spec: InputSpec, start_step: int, total_steps: int):
    num_examples = len(examples)
    per_epoch = steps_per_epoch(num_examples, spec.global_batch)
    loader = ExampleLoader(examples, spec)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def batch_indices(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        epoch = step // per_epoch
        first = (step % per_epoch) * spec.global_batch
        positions = tf.range(first, first + spec.global_batch)
        return epoch, epoch_order(positions, num_examples, spec.seed, epoch)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        steps = tf.data.Dataset.range(start_step, total_steps).map(batch_indices)
        return loader.batches(replica_slices(steps, context, spec.global_batch), training=True)

    return dataset_fn


def _record_train_dataset_fn(split: RecordSplit, spec: InputSpec, start_step: int, total_steps: int):
    per_epoch = steps_per_epoch(len(split), spec.global_batch)
    keep = per_epoch * spec.global_batch
    start_epoch, start_in_epoch = divmod(start_step, per_epoch)
    end_epoch = -(-total_steps // per_epoch)
    loader = ExampleLoader(split, spec)

    def epoch_steps(epoch: tf.Tensor, skip_steps) -> tf.data.Dataset:
        records = epoch_records(split, spec.seed, epoch, keep).skip(skip_steps * spec.global_batch)
        return records.batch(spec.global_batch, drop_remainder=True).map(lambda ordinals, raws: (epoch, ordinals, raws))

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        first = epoch_steps(tf.constant(start_epoch, tf.int64), start_in_epoch)
        later = tf.data.Dataset.range(start_epoch + 1, end_epoch).flat_map(lambda epoch: epoch_steps(epoch, 0))
        steps = first.concatenate(later).take(total_steps - start_step)
        return loader.batches(replica_slices(steps, context, spec.global_batch), training=True)

    return dataset_fn


def eval_dataset_fn(examples: Examples, spec: InputSpec | int):
    """Every example exactly once, in order, as (images, labels, mask).

    The last global batch is padded to full size and its padding masked out: shapes stay
    static, which TPUs and XLA need, and every replica gets a batch on every step.
    """
    if isinstance(spec, int):
        spec = InputSpec(global_batch=spec, seed=0)
    global_batch, loader = spec.global_batch, ExampleLoader(examples, spec)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def pad(indices: tf.Tensor, *raws: tf.Tensor) -> tuple[tf.Tensor, ...]:
        padding = global_batch - tf.shape(indices)[0]
        padded = [tf.pad(indices, [[0, padding]], constant_values=-1)]
        padded += [tf.pad(raw, [[0, padding]], constant_values="") for raw in raws]  # TFRecord's raw records
        return (tf.constant(0, tf.int64), *padded)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        records = isinstance(examples, RecordSplit)
        items = examples.raw_records() if records else tf.data.Dataset.range(len(examples))
        batches = items.batch(global_batch).map(pad)
        return loader.batches(replica_slices(batches, context, global_batch), training=False)

    return dataset_fn


def _first_slices(examples: Examples, count: int) -> tf.data.Dataset:
    """One slice of the first `count` examples (TFRecord: with their raw records)."""
    if isinstance(examples, RecordSplit):
        ordinals, raws = next(iter(examples.raw_records().batch(count)))
        return tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), ordinals, raws))
    return tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), tf.range(count, dtype=tf.int64)))


def first_views(examples: Examples, spec: InputSpec, count: int, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` examples as epoch 0 trains on them (training) or as evaluation sees
    them: for previews, histograms and misclassified-image grids."""
    count = min(count, len(examples))
    slices = _first_slices(examples, count)
    try:
        batch = next(iter(ExampleLoader(examples, spec).batches(slices, training)))
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError):
        raise window_error(examples, range(count)) from None  # a bad file, or one gone since it was listed
    return batch[0].numpy(), batch[1].numpy()


def sample_images(examples: Examples, spec: InputSpec, count: int) -> np.ndarray:
    """Up to `count` training images, spread over the split, at the training size, not
    augmented: what normalisation statistics and data-dependent initialisation look at."""
    picks = sample_indices(len(examples), count)
    if isinstance(examples, Split):
        return examples.images[picks]
    if isinstance(examples, RecordSplit):  # no random access: the first records (converted round-robin)
        return first_views(examples, replace(spec, augment=False), count, training=True)[0]
    subset = examples.subset(picks)
    return first_views(subset, replace(spec, augment=False), len(subset), training=True)[0]
