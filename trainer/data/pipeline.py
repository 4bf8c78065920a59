"""The tf.data pipeline: a stream of example indices turned into (uint8 images, labels).

Why indices: every training batch is a pure function of (seed, global step). Epoch e's
order is a stateless shuffle keyed by (seed, e); each example's crop and flip are keyed
by (seed, e, example index). So the stream can be rebuilt at any step without reading
the skipped pixels, and the same global batch is used whatever the number of replicas
or workers: each replica takes its slice of it.

Images stay uint8 until the model: the cast and normalisation happen on the device,
which keeps host work and host-to-device traffic small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.errors import ConfigError

# Distinct stream ids so shuffling and augmentation never share random numbers.
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
_FLIP_STREAM = 3  # alternating flips: one draw per example for the whole run


@dataclass(frozen=True)
class InputSpec:
    """What the pipeline needs besides the arrays."""

    global_batch: int
    seed: int
    augment: bool = False
    crop_padding: int = 4
    pad_mode: str = "zeros"  # or "reflect"
    flip: str = "random"  # or "alternating"


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Training drops the last partial batch, so every step has the full global batch."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"data.batch_size={global_batch} is larger than the {num_examples} training examples; lower data.batch_size"
        )
    return steps


def check_batch_divides(global_batch: int, num_replicas: int) -> None:
    if global_batch % num_replicas:
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the {num_replicas} replicas; "
            f"use a multiple of {num_replicas}"
        )


def _stream_seed(seed: int, stream: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * 16 + stream])


def epoch_permutation(num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The order of epoch `epoch`: the same for a given (seed, epoch), whatever came before."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=_stream_seed(seed, _SHUFFLE_STREAM, epoch)
    )


def input_spec(config) -> InputSpec:
    """The pipeline settings of a Config (global batch, seed, `data.*` augmentation)."""
    data = config.data
    return InputSpec(
        global_batch=data.batch_size,
        seed=config.seed,
        augment=data.augment,
        crop_padding=data.crop_padding,
        pad_mode=data.pad_mode,
        flip=data.flip,
    )


def augmentation_draws(
    indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec, num_examples: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each example's crop offsets (y, x) and flip in epoch `epoch`, keyed by its dataset index.

    A per-epoch table indexed by the example's index, so an image is augmented the same way
    whichever batch, replica, device or resumed run it lands in. `spec.flip="alternating"`
    flips an example in epoch e iff its one draw for the run says so XOR e is odd
    (airbench's alternating flips).
    """
    seed, positions = spec.seed, 2 * spec.crop_padding + 1
    table = tf.random.stateless_uniform(
        [num_examples, 3], seed=_stream_seed(seed, _AUGMENT_STREAM, epoch), dtype=tf.float32
    )
    draws = tf.gather(table, indices)
    offset_y = tf.minimum(tf.cast(draws[:, 0] * positions, tf.int32), positions - 1)
    offset_x = tf.minimum(tf.cast(draws[:, 1] * positions, tf.int32), positions - 1)
    if spec.flip == "alternating":
        first = tf.random.stateless_uniform(
            [num_examples], seed=_stream_seed(seed, _FLIP_STREAM, tf.constant(0)), dtype=tf.float32
        )
        flipped = tf.not_equal(tf.gather(first, indices) < 0.5, tf.equal(tf.cast(epoch, tf.int64) % 2, 1))
    else:
        flipped = draws[:, 2] < 0.5
    return offset_y, offset_x, flipped


def apply_augmentation(
    images: tf.Tensor, offset_y: tf.Tensor, offset_x: tf.Tensor, flipped: tf.Tensor, spec: InputSpec
) -> tf.Tensor:
    """Pad-and-crop at the given offsets, then flip where `flipped`: vectorised over the batch.

    Only gathers, pads and selects: cheap wherever the images are, host or accelerator.
    """
    crop_padding = spec.crop_padding
    if crop_padding:
        height, width = images.shape[1], images.shape[2]
        pad = [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]]
        padded = tf.pad(images, pad, mode="REFLECT" if spec.pad_mode == "reflect" else "CONSTANT")
        rows = offset_y[:, None] + tf.range(height)[None, :]
        cols = offset_x[:, None] + tf.range(width)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    return tf.where(flipped[:, None, None, None], tf.reverse(images, axis=[2]), images)


def augment_batch(
    images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec, num_examples: int
) -> tf.Tensor:
    """Pad-and-random-crop plus horizontal flip of the examples `indices` in epoch `epoch`."""
    return apply_augmentation(images, *augmentation_draws(indices, epoch, spec, num_examples), spec)


def augment_first(images: np.ndarray, spec: InputSpec, num_examples: int) -> np.ndarray:
    """The first len(images) training examples as epoch 0 augments them (for previews)."""
    count = len(images)
    indices = tf.range(count, dtype=tf.int64)
    return augment_batch(tf.constant(images), indices, tf.constant(0, tf.int64), spec, num_examples).numpy()


def train_dataset_fn(images: np.ndarray, labels: np.ndarray, spec: InputSpec, start_step: int, total_steps: int):
    """A `distribute_datasets_from_function` callable yielding global steps [start, total)."""
    num_examples = len(labels)
    per_epoch = steps_per_epoch(num_examples, spec.global_batch)
    images_t, labels_t = tf.constant(images), tf.constant(labels, tf.int32)

    def batch_indices(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        epoch = step // per_epoch
        position = (step % per_epoch) * spec.global_batch
        order = epoch_permutation(num_examples, spec.seed, epoch)
        return epoch, order[position : position + spec.global_batch]

    def gather(epoch: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.gather(images_t, indices)
        if spec.augment:
            batch = augment_batch(batch, indices, epoch, spec, num_examples)
        return batch, tf.gather(labels_t, indices)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        steps = tf.data.Dataset.range(start_step, total_steps).map(batch_indices)
        return (
            _replica_slices(steps, context, spec.global_batch)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )

    return dataset_fn


def eval_dataset_fn(images: np.ndarray, labels: np.ndarray, global_batch: int):
    """Every example exactly once, in order, as (images, labels, mask).

    The last global batch is padded to full size and its padding masked out: shapes stay
    static, which TPUs and XLA need, and every replica gets a batch on every step.
    """
    images_t, labels_t = tf.constant(images), tf.constant(labels, tf.int32)
    num_examples = len(labels)

    def pad(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        padding = global_batch - tf.shape(indices)[0]
        return tf.constant(0, tf.int64), tf.pad(indices, [[0, padding]], constant_values=-1)

    def gather(_: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        mask = indices >= 0
        safe = tf.where(mask, indices, tf.zeros_like(indices))
        return tf.gather(images_t, safe), tf.gather(labels_t, safe), tf.cast(mask, tf.float32)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batches = tf.data.Dataset.range(num_examples).batch(global_batch).map(pad)
        return (
            _replica_slices(batches, context, global_batch)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )

    return dataset_fn


def _replica_slices(
    batches: tf.data.Dataset, context: tf.distribute.InputContext, global_batch: int
) -> tf.data.Dataset:
    """Split each global batch of indices into the slices of this pipeline's replicas.

    `distribute_datasets_from_function` hands consecutive elements of a worker's dataset
    to its replicas in turn, so emitting slice r, r+1, ... per step gives replica r exactly
    global_batch[r*b:(r+1)*b]. Worker w (input pipeline w) owns replicas w*k .. w*k+k-1.
    """
    per_replica = global_batch // context.num_replicas_in_sync
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
    first = context.input_pipeline_id * local_replicas

    def split(epoch: tf.Tensor, indices: tf.Tensor) -> tf.data.Dataset:
        def replica_slice(replica: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            piece = indices[replica * per_replica : (replica + 1) * per_replica]
            return epoch, tf.ensure_shape(piece, [per_replica])  # static shapes for XLA/TPU

        return tf.data.Dataset.range(first, first + local_replicas).map(replica_slice)

    return batches.flat_map(split)


def normalization_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training pixels (0-255 scale), computed in chunks."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    return mean.tolist(), std.tolist()
