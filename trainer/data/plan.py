"""What global step s holds: the epoch's order, each example's random draws, and which
slice of the batch each replica takes. Pure functions of (seed, step); no pixels here.

Why: every training batch is a pure function of (seed, global step). Epoch e's order is a
stateless shuffle keyed by (seed, e); each example's crop and flip are keyed by (seed, e,
example index). So the stream can be rebuilt at any step without reading the skipped
pixels, and the same global batch is used whatever the number of replicas or workers:
each replica takes its slice of it. TFRecord shards have no random access, so their order
(`epoch_records`) is built from what can be skipped without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.data.splits import RecordSplit
from trainer.errors import ConfigError

# Distinct stream ids so shuffling and augmentation never share random numbers.
SHUFFLE_STREAM = 1
AUGMENT_STREAM = 2
FLIP_STREAM = 3  # alternating flips: one draw per example for the whole run
SHARD_ORDER_STREAM, BLOCK_STREAM = 5, 6
SHUFFLE_BLOCK = 4096  # records permuted together in a streamed TFRecord epoch
_INTERLEAVE = 8  # shards read at a time, in turn


@dataclass(frozen=True)
class InputSpec:
    """What the pipeline needs besides the examples."""

    global_batch: int
    seed: int
    augment: bool = False
    crop_padding: int = 4
    pad_mode: str = "zeros"  # or "reflect"
    flip: str = "random"  # or "alternating"
    crop: str = "pad"  # or "random_resized" (resolved: never "auto" here)
    crop_min_area: float = 0.08
    image_size: int = 0  # the training resolution; 0: the in-memory images' own
    service: str = ""  # a tf.data service dispatcher that makes training batches; "": this process

    def __post_init__(self) -> None:
        if self.augment and self.crop == "pad" and self.pad_mode == "reflect" and self.image_size:
            check_reflect_padding(self.crop_padding, self.image_size, self.image_size)


def check_reflect_padding(padding: int, height: int, width: int) -> None:
    """A mirrored border reaches at most the image's size less one pixel (tf.pad's REFLECT
    rule); past that the crop's indices would leave the image: refused, before training."""
    if padding >= min(height, width):
        raise ConfigError(
            f"data.crop_padding={padding} with data.pad_mode=reflect needs images larger than {padding} pixels "
            f"(these are {height}x{width}); lower data.crop_padding or set data.pad_mode=zeros"
        )


def input_spec(config, image_size: int = 0) -> InputSpec:
    """The pipeline settings of a Config (global batch, seed, `data.*` augmentation) for a
    dataset trained at `image_size` (which resolves data.crop=auto)."""
    data = config.data
    return InputSpec(
        global_batch=data.batch_size,
        seed=config.seed,
        augment=data.augment,
        crop_padding=data.crop_padding,
        pad_mode=data.pad_mode,
        flip=data.flip,
        crop=resolve_crop(data.crop, image_size or data.image_size or 32),
        crop_min_area=data.crop_min_area,
        image_size=image_size,
        service=data.service,
    )


def resolve_crop(crop: str, image_size: int) -> str:
    """data.crop=auto: CIFAR's pad-and-crop for small images, the ImageNet recipe above 64 px."""
    if crop != "auto":
        return crop
    return "pad" if image_size <= 64 else "random_resized"


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Training drops the last partial batch, so every step has the full global batch."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"data.batch_size={global_batch} is larger than the {num_examples} training examples; lower data.batch_size"
        )
    return steps


def check_batch_divides(global_batch: int, num_replicas: int, micro_batches: int = 1) -> None:
    """Each replica's share of the batch is whole, and cuts into `micro_batches` equal ones."""
    if global_batch % num_replicas:
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the {num_replicas} replicas; "
            f"use a multiple of {num_replicas}"
        )
    parts = num_replicas * micro_batches
    if global_batch % parts:
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the {num_replicas} replicas x {micro_batches} "
            f"micro-batches (optimizer.gradient_accumulation_steps); use a multiple of {parts}"
        )


def stream_seed(seed: int, stream: int, epoch: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one random stream in one epoch."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * 16 + stream])


def epoch_order(positions: tf.Tensor, num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The examples at `positions` of epoch `epoch`'s order: a stateless bijection of
    [0, num_examples) per (seed, epoch), computed per position (no N-long permutation)."""
    return tf.random.experimental.index_shuffle(
        tf.cast(positions, tf.int64),
        stream_seed(seed, SHUFFLE_STREAM, epoch),
        tf.constant(num_examples - 1, tf.int64),
    )


def epoch_permutation(num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The whole order of epoch `epoch` (for the device feed's per-epoch plan)."""
    return epoch_order(tf.range(num_examples, dtype=tf.int64), num_examples, seed, epoch)


def example_draws(indices: tf.Tensor, seed: int, stream: int, epoch: tf.Tensor, count: int) -> tf.Tensor:
    """`count` uniform numbers in [0, 1) per example, float32 [B, count], a pure function of
    (seed, stream, epoch, example index): no table over the dataset, so the cost is per batch.

    A keyed bijection (index_shuffle) of index*8+k over [0, 2**35) is the hash; its top 24
    bits are the float.
    """
    keys = tf.cast(indices, tf.int64)[:, None] * 8 + tf.range(count, dtype=tf.int64)[None, :]
    hashed = tf.random.experimental.index_shuffle(
        tf.reshape(keys, [-1]), stream_seed(seed, stream, epoch), tf.constant(2**35 - 1, tf.int64)
    )
    return tf.reshape(tf.cast(hashed // 2**11, tf.float32) / 2.0**24, [-1, count])


def batch_indices(steps, num_examples: int, spec: InputSpec) -> list[int]:
    """The example indices of global steps `steps`, in order (what those batches hold)."""
    per_epoch = steps_per_epoch(num_examples, spec.global_batch)
    indices: list[int] = []
    for step in steps:
        epoch, first = divmod(step, per_epoch)
        positions = tf.range(first * spec.global_batch, (first + 1) * spec.global_batch, dtype=tf.int64)
        indices += epoch_order(positions, num_examples, spec.seed, tf.constant(epoch, tf.int64)).numpy().tolist()
    return indices


def sample_indices(num_examples: int, count: int) -> np.ndarray:
    """Up to `count` indices spread evenly over a split (the same for every run)."""
    return np.unique(np.linspace(0, num_examples - 1, min(count, num_examples)).astype(np.int64))


def replica_slices(batches: tf.data.Dataset, context: tf.distribute.InputContext, global_batch: int) -> tf.data.Dataset:
    """Split each global batch of indices into the slices of this pipeline's replicas.

    `distribute_datasets_from_function` hands consecutive elements of a worker's dataset
    to its replicas in turn, so emitting slice r, r+1, ... per step gives replica r exactly
    global_batch[r*b:(r+1)*b]. Worker w (input pipeline w) owns replicas w*k .. w*k+k-1.
    """
    per_replica = global_batch // context.num_replicas_in_sync
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
    first = context.input_pipeline_id * local_replicas
    mine = slice(first * per_replica, (first + local_replicas) * per_replica)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def split(epoch: tf.Tensor, *columns: tf.Tensor) -> tuple[tf.Tensor, ...]:
        # columns: the indices, and for TFRecord the raw records beside them. One reshape
        # and an unbatch, not a flat_map: a flat_map opens a dataset per step (~0.5 ms).
        pieces = [tf.reshape(column[mine], [local_replicas, per_replica]) for column in columns]
        return (tf.fill([local_replicas], epoch), *pieces)

    return batches.map(split).unbatch()  # static [per_replica] shapes, as XLA/TPU need


def epoch_records(split: RecordSplit, seed: int, epoch: tf.Tensor, keep: int) -> tf.data.Dataset:
    """(ordinal, raw record) of one TFRecord epoch, in the epoch's order, its first `keep`.

    The shards in an order drawn per (seed, epoch), read a few at a time in turn, then
    shuffled in blocks of SHUFFLE_BLOCK records by a keyed permutation: all of it a pure
    function of (seed, epoch), so a resumed run skips the raw records already trained on
    (no decoding) and continues with the same batches."""
    offsets = np.concatenate([[0], np.cumsum(split.counts)[:-1]]).astype(np.int64)
    shards, counts = tf.constant(split.shards), tf.constant(split.counts, tf.int64)
    order = tf.random.experimental.index_shuffle(
        tf.range(len(split.shards), dtype=tf.int64),
        stream_seed(seed, SHARD_ORDER_STREAM, epoch),
        tf.constant(len(split.shards) - 1, tf.int64),
    )

    def shard_records(shard: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(shards[shard]).take(counts[shard])
        return records.enumerate(tf.constant(offsets)[shard])

    stream = tf.data.Dataset.from_tensor_slices(order).interleave(
        shard_records, cycle_length=_INTERLEAVE, block_length=1
    )

    def permute_block(block: tf.Tensor, ordinals: tf.Tensor, raws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.shape(ordinals, out_type=tf.int64)[0]
        seed_pair = stream_seed(seed, BLOCK_STREAM, epoch * 1_000_003 + block)
        permutation = tf.random.experimental.index_shuffle(tf.range(size), seed_pair, size - 1)
        return tf.gather(ordinals, permutation), tf.gather(raws, permutation)

    return (
        split.without_skipped(stream)
        .batch(SHUFFLE_BLOCK)
        .enumerate()
        .map(lambda block, pair: permute_block(block, *pair))
        .unbatch()
        .take(keep)
    )
