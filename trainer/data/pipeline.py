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

from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from trainer.data.decode import decode, decode_random_resized, decode_view, random_resized_crop, resize
from trainer.errors import ConfigError

# Distinct stream ids so shuffling and augmentation never share random numbers.
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
_FLIP_STREAM = 3  # alternating flips: one draw per example for the whole run


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


def resolve_crop(crop: str, image_size: int) -> str:
    """data.crop=auto: CIFAR's pad-and-crop for small images, the ImageNet recipe above 64 px."""
    if crop != "auto":
        return crop
    return "pad" if image_size <= 64 else "random_resized"


def _stream_seed(seed: int, stream: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * 16 + stream])


def epoch_order(positions: tf.Tensor, num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The examples at `positions` of epoch `epoch`'s order: a stateless bijection of
    [0, num_examples) per (seed, epoch), computed per position (no N-long permutation)."""
    return tf.random.experimental.index_shuffle(
        tf.cast(positions, tf.int64),
        _stream_seed(seed, _SHUFFLE_STREAM, epoch),
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
        tf.reshape(keys, [-1]), _stream_seed(seed, stream, epoch), tf.constant(2**35 - 1, tf.int64)
    )
    return tf.reshape(tf.cast(hashed // 2**11, tf.float32) / 2.0**24, [-1, count])


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
    )


def _flips(indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec, draw: tf.Tensor) -> tf.Tensor:
    """Random flips, or airbench's alternating ones: an example is flipped in epoch e iff its
    one draw for the run says so XOR e is odd (consecutive epochs see both orientations)."""
    if spec.flip != "alternating":
        return draw < 0.5
    first = example_draws(indices, spec.seed, _FLIP_STREAM, tf.constant(0, tf.int64), 1)[:, 0]
    return tf.not_equal(first < 0.5, tf.equal(tf.cast(epoch, tf.int64) % 2, 1))


def augmentation_draws(indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each example's pad-crop offsets (y, x) and flip in epoch `epoch`, keyed by its index,
    so an image is augmented the same way whichever batch, replica, device or resumed run
    it lands in."""
    positions = 2 * spec.crop_padding + 1
    draws = example_draws(indices, spec.seed, _AUGMENT_STREAM, epoch, 3)
    offset_y = tf.minimum(tf.cast(draws[:, 0] * positions, tf.int32), positions - 1)
    offset_x = tf.minimum(tf.cast(draws[:, 1] * positions, tf.int32), positions - 1)
    return offset_y, offset_x, _flips(indices, epoch, spec, draws[:, 2])


def apply_augmentation(
    images: tf.Tensor, offset_y: tf.Tensor, offset_x: tf.Tensor, flipped: tf.Tensor, spec: InputSpec
) -> tf.Tensor:
    """Pad-and-crop at the given offsets, then flip where `flipped`: vectorised over the batch.

    Only gathers, pads and selects: cheap wherever the images are, host or accelerator.
    """
    crop_padding = spec.crop_padding
    if not crop_padding:
        return tf.where(flipped[:, None, None, None], tf.reverse(images, axis=[2]), images)
    height, width = images.shape[1], images.shape[2]
    pad = [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]]
    padded = tf.pad(images, pad, mode="REFLECT" if spec.pad_mode == "reflect" else "CONSTANT")
    rows = offset_y[:, None] + tf.range(height)[None, :]
    # The flip is folded into the column gather (right to left), saving two passes over the batch.
    columns = tf.where(flipped[:, None], tf.range(width - 1, -1, -1)[None, :], tf.range(width)[None, :])
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, offset_x[:, None] + columns, axis=2, batch_dims=1)


def augment_batch(images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """Pad-and-random-crop plus horizontal flip of the examples `indices` in epoch `epoch`."""
    return apply_augmentation(images, *augmentation_draws(indices, epoch, spec), spec)


def random_resized_views(images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """The random_resized recipe on a batch of decoded same-size images (in memory)."""
    draws = example_draws(indices, spec.seed, _AUGMENT_STREAM, epoch, 5)
    size = spec.image_size or images.shape[1]
    crops = tf.map_fn(
        lambda args: random_resized_crop(args[0], size, args[1], spec.crop_min_area),
        (images, draws),
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
    )
    flipped = _flips(indices, epoch, spec, draws[:, 4])
    return tf.where(flipped[:, None, None, None], tf.reverse(crops, axis=[2]), crops)


def _augmented(images, indices, epoch, spec: InputSpec) -> tf.Tensor:
    if not spec.augment:
        return images
    if spec.crop == "random_resized":
        return random_resized_views(images, indices, epoch, spec)
    return augment_batch(images, indices, epoch, spec)


# --- the datasets ------------------------------------------------------------------------


def train_dataset_fn(examples, spec: InputSpec, start_step: int, total_steps: int):
    """A `distribute_datasets_from_function` callable yielding global steps [start, total).

    `examples`: a Split (pixels in memory) or a FileSplit (decoded here, in parallel, only
    the files of this pipeline's replicas).
    """
    if hasattr(examples, "shards"):
        from trainer.data.records import record_train_dataset_fn

        return record_train_dataset_fn(examples, spec, start_step, total_steps)
    num_examples = len(examples)
    per_epoch = steps_per_epoch(num_examples, spec.global_batch)
    loader = ExampleLoader(examples, spec)

    def batch_indices(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        epoch = step // per_epoch
        first = (step % per_epoch) * spec.global_batch
        positions = tf.range(first, first + spec.global_batch)
        return epoch, epoch_order(positions, num_examples, spec.seed, epoch)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        steps = tf.data.Dataset.range(start_step, total_steps).map(batch_indices)
        return loader.batches(replica_slices(steps, context, spec.global_batch), training=True)

    return dataset_fn


def eval_dataset_fn(examples, spec: InputSpec | int):
    """Every example exactly once, in order, as (images, labels, mask).

    The last global batch is padded to full size and its padding masked out: shapes stay
    static, which TPUs and XLA need, and every replica gets a batch on every step.
    """
    if isinstance(spec, int):
        spec = InputSpec(global_batch=spec, seed=0)
    if hasattr(examples, "shards"):
        from trainer.data.records import record_eval_dataset_fn

        return record_eval_dataset_fn(examples, spec)
    global_batch, num_examples = spec.global_batch, len(examples)
    loader = ExampleLoader(examples, spec)

    def pad(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        padding = global_batch - tf.shape(indices)[0]
        return tf.constant(0, tf.int64), tf.pad(indices, [[0, padding]], constant_values=-1)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batches = tf.data.Dataset.range(num_examples).batch(global_batch).map(pad)
        return loader.batches(replica_slices(batches, context, global_batch), training=False)

    return dataset_fn


class ExampleLoader:
    """Turns slices of (epoch, example indices) into (uint8 images, labels[, mask]) batches.

    Pixels in memory with the pad recipe: one batched gather and augmentation per slice
    (the fast path). Anything else goes example by example through a parallel map (read,
    decode, crop, resize), then is batched again: tf.data keeps the order, so batches are
    the same whatever the parallelism.
    """

    def __init__(self, examples, spec: InputSpec):
        from trainer.data.sources import Split  # the sources need no pipeline

        self.spec = spec
        self.in_memory = isinstance(examples, Split)
        self.size = spec.image_size
        if hasattr(examples, "shards"):  # TFRecord: the raw record travels with its index
            self.num_classes = examples.num_classes  # labels are read per record: checked there
            return
        self.labels = tf.constant(examples.labels, tf.int32)
        if self.in_memory:
            self.images = tf.constant(examples.images)
            self.size = spec.image_size or examples.images.shape[1]
        else:
            self.paths = file_paths(examples)

    def batches(self, slices: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        if self.in_memory and not (training and self.spec.augment and self.spec.crop == "random_resized"):
            gather = self._gather_train if training else self._gather_eval
            return slices.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        per_replica = slices.element_spec[1].shape[0]
        examples = slices.map(lambda epoch, *columns: (tf.fill(tf.shape(columns[0]), epoch), *columns)).unbatch()
        one = self._train_example if training else self._eval_example
        batched = examples.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(
            per_replica, drop_remainder=True
        )
        finish = self._finish_train if training else self._finish_eval
        return batched.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    # In-memory batches.
    def _gather_train(self, epoch, indices):
        batch = tf.gather(self.images, indices)
        return _augmented(batch, indices, epoch, self.spec), tf.gather(self.labels, indices)

    def _gather_eval(self, _, indices):
        mask = indices >= 0
        safe = tf.where(mask, indices, tf.zeros_like(indices))
        return tf.gather(self.images, safe), tf.gather(self.labels, safe), tf.cast(mask, tf.float32)

    # One example at a time.
    def _source(self, index: tf.Tensor, raw: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(encoded image, its name for errors, label) of a file or TFRecord example."""
        if raw is not None:
            from trainer.data.records import checked_label, parse_record

            encoded, name, label = parse_record(raw)
            return encoded, name, checked_label(label, index, self.num_classes)
        path = self.paths[index]
        return tf.io.read_file(path), path, self.labels[index]

    def _train_example(self, epoch, index, raw=None):
        spec = self.spec
        random_resized = spec.augment and spec.crop == "random_resized"
        draws = example_draws(index[None], spec.seed, _AUGMENT_STREAM, epoch, 5)[0] if random_resized else None
        if self.in_memory:
            image, label = self.images[index], self.labels[index]
            if random_resized:
                image = random_resized_crop(image, self.size, draws, spec.crop_min_area)
        else:
            encoded, name, label = self._source(index, raw)
            if random_resized:  # a JPEG decodes only the crop
                image = decode_random_resized(encoded, name, self.size, draws, spec.crop_min_area)
            else:
                image = resize(decode(encoded, name), self.size)
        return epoch, index, image, label

    def _finish_train(self, epochs, indices, images, labels):
        if not self.spec.augment:
            return images, labels
        if self.spec.crop == "random_resized":
            draws = example_draws(indices, self.spec.seed, _AUGMENT_STREAM, epochs[0], 5)
            flipped = _flips(indices, epochs[0], self.spec, draws[:, 4])
            return tf.where(flipped[:, None, None, None], tf.reverse(images, axis=[2]), images), labels
        return augment_batch(images, indices, epochs[0], self.spec), labels

    def _eval_example(self, _, index, raw=None):
        mask = index >= 0
        if raw is not None:  # padding has no record to decode
            image, label = tf.cond(
                mask,
                lambda: self._viewed(index, raw),
                lambda: (tf.zeros([self.size, self.size, 3], tf.uint8), tf.constant(0, tf.int32)),
            )
        else:
            image, label = self._viewed(tf.maximum(index, 0), raw)
        return image, label, tf.cast(mask, tf.float32)

    def _viewed(self, index, raw):
        encoded, name, label = self._source(index, raw)
        return decode_view(encoded, name, self.size, self.spec.crop), label

    def _finish_eval(self, images, labels, mask):
        return images, labels, mask


def first_views(examples, spec: InputSpec, count: int, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` examples as epoch 0 trains on them (training) or as evaluation sees
    them: for previews, histograms and misclassified-image grids."""
    count = min(count, len(examples))
    slices = tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), tf.range(count, dtype=tf.int64)))
    if hasattr(examples, "shards"):
        from trainer.data.records import record_first_slices

        slices = record_first_slices(examples, count)
    try:
        batch = next(iter(ExampleLoader(examples, spec).batches(slices, training)))
    except tf.errors.InvalidArgumentError:
        if hasattr(examples, "shards"):
            from trainer.data.records import first_records_error

            raise first_records_error(examples, count) from None
        from trainer.data.prepare import unreadable_error

        raise unreadable_error(examples, range(count)) from None
    return batch[0].numpy(), batch[1].numpy()


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


def sample_images(examples, spec: InputSpec, count: int) -> np.ndarray:
    """Up to `count` training images, spread over the split, at the training size, not
    augmented: what normalisation statistics and data-dependent initialisation look at."""
    from trainer.data.sources import Split

    picks = sample_indices(len(examples), count)
    if isinstance(examples, Split):
        return examples.images[picks]
    if hasattr(examples, "shards"):  # no random access: the first records (converted round-robin)
        return first_views(examples, replace(spec, augment=False), count, training=True)[0]
    subset = examples.subset(picks)
    return first_views(subset, replace(spec, augment=False), len(subset), training=True)[0]


def file_paths(split) -> tf.Tensor:
    """A FileSplit's full paths as one string tensor: folder of the label + "/" + name.

    As the file system's bytes (sources.path_bytes), so a name that is not UTF-8 is read too."""
    from trainer.data.sources import path_bytes

    folders = tf.constant([path_bytes(folder) for folder in split.folders], tf.string)
    names = tf.constant([path_bytes(name) for name in split.names], tf.string)
    return tf.strings.join([tf.gather(folders, split.labels), names], separator="/")


def replica_slices(batches: tf.data.Dataset, context: tf.distribute.InputContext, global_batch: int) -> tf.data.Dataset:
    """Split each global batch of indices into the slices of this pipeline's replicas.

    `distribute_datasets_from_function` hands consecutive elements of a worker's dataset
    to its replicas in turn, so emitting slice r, r+1, ... per step gives replica r exactly
    global_batch[r*b:(r+1)*b]. Worker w (input pipeline w) owns replicas w*k .. w*k+k-1.
    """
    per_replica = global_batch // context.num_replicas_in_sync
    local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
    first = context.input_pipeline_id * local_replicas

    def split(epoch: tf.Tensor, *columns: tf.Tensor) -> tf.data.Dataset:
        # columns: the indices, and for TFRecord the raw records beside them.
        def replica_slice(replica: tf.Tensor) -> tuple[tf.Tensor, ...]:
            pieces = [column[replica * per_replica : (replica + 1) * per_replica] for column in columns]
            return (epoch, *[tf.ensure_shape(piece, [per_replica]) for piece in pieces])  # static shapes for XLA/TPU

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
