"""Training augmentation: pad-and-crop with flips (CIFAR's recipe) and random-resized crops
(ImageNet's), each example's draws keyed by (seed, epoch, example index) (trainer.data.plan).

So an image is augmented the same way whichever batch, replica, device or resumed run it
lands in, and the device feed (trainer.data.device) reproduces the host pipeline exactly.

RandAugment, MixUp and CutMix (`BatchAugmentation`) are Keras' own layers applied inside
the train step (trainer.loop.step) to each replica's batch, their draws keyed by (seed,
global step, replica) through `KeyedSeeds`, never by a layer's own SeedGenerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import keras
import tensorflow as tf

from trainer.config import DataConfig
from trainer.data.decode import random_resized_crop
from trainer.data.plan import AUGMENT_STREAM, FLIP_STREAM, InputSpec, check_reflect_padding, example_draws

# Draws per example of the random_resized recipe: 4 for the window, 1 for the flip.
RANDOM_RESIZED_DRAWS = 5


def random_resized_draws(indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """The random_resized recipe's draws of `indices` in epoch `epoch`, float32 [B, 5]."""
    return example_draws(indices, spec.seed, AUGMENT_STREAM, epoch, RANDOM_RESIZED_DRAWS)


def flips(indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec, draw: tf.Tensor) -> tf.Tensor:
    """Random flips, or airbench's alternating ones: an example is flipped in epoch e iff its
    one draw for the run says so XOR e is odd (consecutive epochs see both orientations)."""
    if spec.flip != "alternating":
        return draw < 0.5
    first = example_draws(indices, spec.seed, FLIP_STREAM, tf.constant(0, tf.int64), 1)[:, 0]
    return tf.not_equal(first < 0.5, tf.equal(tf.cast(epoch, tf.int64) % 2, 1))


def flipped(images: tf.Tensor, where: tf.Tensor) -> tf.Tensor:
    """`images` [B, H, W, C] mirrored left to right where `where` [B] is true."""
    return tf.where(where[:, None, None, None], tf.reverse(images, axis=[2]), images)


def augmentation_draws(indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each example's pad-crop offsets (y, x) and flip in epoch `epoch`, keyed by its index."""
    positions = 2 * spec.crop_padding + 1
    draws = example_draws(indices, spec.seed, AUGMENT_STREAM, epoch, 3)
    offset_y = tf.minimum(tf.cast(draws[:, 0] * positions, tf.int32), positions - 1)
    offset_x = tf.minimum(tf.cast(draws[:, 1] * positions, tf.int32), positions - 1)
    return offset_y, offset_x, flips(indices, epoch, spec, draws[:, 2])


def apply_augmentation(
    images: tf.Tensor, offset_y: tf.Tensor, offset_x: tf.Tensor, flip: tf.Tensor, spec: InputSpec
) -> tf.Tensor:
    """Pad-and-crop at the given offsets, then flip where `flip`: vectorised over the batch.

    One gather of whole pixels from the unpadded batch, at indices that do the padding
    (reflected, or a zero pixel appended once), the crop and the flip: the same pixels as
    `tf.pad` then a crop, without the pad's copy, which on a CPU cost 0.23 ms (zeros) and
    2.3-2.8 ms (REFLECT) per batch of 128 32x32 images: more than the gather itself.
    """
    padding = spec.crop_padding
    if not padding:
        return flipped(images, flip)
    # int64: a batch of 8,192 512x512 images has more pixels than int32 counts.
    batch, (height, width, channels) = tf.shape(images, out_type=tf.int64)[0], images.shape[1:]
    rows = offset_y[:, None] - padding + tf.range(height)[None, :]
    columns = tf.where(flip[:, None], tf.range(width - 1, -1, -1)[None, :], tf.range(width)[None, :])
    columns = columns + offset_x[:, None] - padding
    pixels = tf.reshape(images, [-1, channels])
    if spec.pad_mode == "reflect":  # as tf.pad's REFLECT: -1 -> 1, n -> n - 2 (the edge not repeated)
        check_reflect_padding(padding, height, width)  # images of their own size (image_size 0)
        rows, columns = _reflected(rows, height), _reflected(columns, width)
    rows, columns = tf.cast(rows, tf.int64), tf.cast(columns, tf.int64)
    flat = (tf.range(batch)[:, None, None] * height + rows[:, :, None]) * width + columns[:, None, :]
    if spec.pad_mode != "reflect":  # zeros: outside the image, the one zero pixel after the batch
        inside = _within(rows, height)[:, :, None] & _within(columns, width)[:, None, :]
        flat = tf.where(inside, flat, batch * height * width)
        pixels = tf.concat([pixels, tf.zeros([1, channels], images.dtype)], axis=0)
    return tf.gather(pixels, flat)


def _reflected(positions: tf.Tensor, size: int) -> tf.Tensor:
    positions = tf.abs(positions)
    return tf.where(positions >= size, 2 * (size - 1) - positions, positions)


def _within(positions: tf.Tensor, size: int) -> tf.Tensor:
    return (positions >= 0) & (positions < size)


def augment_batch(images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """Pad-and-random-crop plus horizontal flip of the examples `indices` in epoch `epoch`."""
    return apply_augmentation(images, *augmentation_draws(indices, epoch, spec), spec)


def random_resized_views(images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """The random_resized recipe on a batch of decoded same-size images (in memory)."""
    draws = random_resized_draws(indices, epoch, spec)
    size = spec.image_size or images.shape[1]
    crops = tf.map_fn(
        lambda args: random_resized_crop(args[0], size, args[1], spec.crop_min_area),
        (images, draws),
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
    )
    return flipped(crops, flips(indices, epoch, spec, draws[:, 4]))


def augmented(images: tf.Tensor, indices: tf.Tensor, epoch: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """A gathered in-memory batch as training sees it (as it is when spec.augment is off)."""
    if not spec.augment:
        return images
    if spec.crop == "random_resized":
        return random_resized_views(images, indices, epoch, spec)
    return augment_batch(images, indices, epoch, spec)


# --- in the train step: RandAugment, MixUp and CutMix, Keras' own layers --------------------

# Beside trainer.data.plan's streams (1-6), so their draws never share random numbers.
STEP_STREAM = 7


class KeyedSeeds(keras.random.SeedGenerator):
    """A SeedGenerator without state: its n-th seed is a pure function of (key, n).

    Why: Keras' random layers draw from a SeedGenerator whose state is a variable that
    advances with every draw and that no checkpoint of ours holds, so a resumed run would
    draw other numbers. One of these is made for each replica's batch of each step from a
    key of (seed, global step, replica): the same draws whenever that step is trained.
    Keras takes it wherever it takes a SeedGenerator (it checks the type, then calls
    `next()`). The parent's __init__ is not called: it would make the state variable.
    """

    def __init__(self, key: tf.Tensor) -> None:
        self.key, self.count, self.name = key, 0, "keyed_seeds"

    def next(self, ordered: bool = True) -> tf.Tensor:
        """The next seed: the call's number folded into the key (counted while tracing)."""
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.key, self.count)


def step_key(seed: int, step: tf.Tensor, replica) -> tf.Tensor:
    """The key of one replica's batch at global step `step`: (seed, step, replica) hashed."""
    base = tf.constant([seed, STEP_STREAM], tf.int64)
    keyed = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(keyed, tf.cast(replica, tf.int64))


class MixedTargets(NamedTuple):
    """What the loss sees of a mixed batch: Keras' soft labels and the dominant class.

    `soft` [B, classes] is the layer's `transform_labels` of the one-hot labels (lambda of
    the image's own class, 1 - lambda of its partner's); `dominant` [B] is its argmax, as
    Keras' categorical accuracy and `class_weight` read soft labels (ties: the lower class).
    """

    soft: tf.Tensor
    dominant: tf.Tensor


@dataclass(frozen=True)
class BatchAugmentation:
    """data.randaugment_ops, data.mixup_alpha, data.cutmix_alpha: applied to each replica's
    batch inside the train step, before the forward pass, on whichever device it runs.

    In the step, not in tf.data: the device feed (data.placement=device) and the host
    pipeline then give the same batches, images cross to the device as uint8, and the
    draws are keyed by the global step. Each draw comes from `KeyedSeeds(step_key(...))`,
    so a resumed run trains on exactly the same mixed images. A batch is mixed within
    itself (Keras' layers permute the batch they are given): each replica mixes its own
    slice, so the pairs depend on the number of replicas, as unsynchronised statistics do.
    """

    seed: int
    num_classes: int
    randaugment: keras.layers.RandAugment | None = None
    mixup: keras.layers.MixUp | None = None
    cutmix: keras.layers.CutMix | None = None

    def __call__(self, images: tf.Tensor, labels: tf.Tensor, step: tf.Tensor, replica) -> tuple[tf.Tensor, object]:
        """(float32 images, targets): the labels as they were, or MixedTargets when mixing."""
        seeds = KeyedSeeds(step_key(self.seed, step, replica))
        images = tf.cast(images, tf.float32)
        if self.randaugment is not None:
            images = rand_augmented(self.randaugment, images, seeds)
        if self.mixup is None and self.cutmix is None:
            return images, labels
        onehot = tf.one_hot(labels, self.num_classes)
        if self.mixup is not None and self.cutmix is not None:
            # timm's rule for both: each batch is mixed one way or the other, with p=1/2.
            use_mixup = keras.random.uniform((), seed=seeds) < 0.5
            images, soft = tf.cond(
                use_mixup,
                lambda: mixed(self.mixup, images, onehot, seeds),
                lambda: mixed(self.cutmix, images, onehot, seeds),
            )
        else:
            images, soft = mixed(self.mixup or self.cutmix, images, onehot, seeds)
        return images, MixedTargets(soft, tf.argmax(soft, axis=-1, output_type=tf.int32))


def mixed(layer, images: tf.Tensor, onehot: tf.Tensor, seeds: KeyedSeeds) -> tuple[tf.Tensor, tf.Tensor]:
    """A MixUp or CutMix layer's own transformation of a batch, drawn from `seeds`."""
    transformation = layer.get_random_transformation(images, training=True, seed=seeds)
    return layer.transform_images(images, transformation), layer.transform_labels(onehot, transformation)


def rand_augmented(layer: keras.layers.RandAugment, images: tf.Tensor, seeds: KeyedSeeds) -> tf.Tensor:
    """RandAugment's own operations and `transform_images`, with every draw from `seeds`.

    Its `get_random_transformation` ignores the seed it is given (it draws from the layer's
    own SeedGenerator), so the transformation is made here from its operation layers, each
    given `seeds`. The operations are chosen per image (the paper's rule; Keras' own draw
    chooses them per batch): shaped [num_ops, B, 1, 1, 1], the layer's selection broadcasts.
    """
    names = layer._AUGMENT_LAYERS  # the layer's operations, in the order its selection counts them
    transforms = {
        name: getattr(layer, name).get_random_transformation(images, training=True, seed=seeds) for name in names
    }
    batch = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    choices = keras.random.randint((layer.num_ops, batch, 1, 1, 1), 0, len(names), seed=seeds)
    return layer.transform_images(images, {"transforms": transforms, "layer_idxes": choices})


def batch_augmentation(data: DataConfig, seed: int, num_classes: int) -> BatchAugmentation | None:
    """The configured in-step augmentation, or None when its keys are all off (the step is
    then traced exactly as without them). Layers in float32 whatever the precision policy:
    a mixed image is an exact convex combination."""
    if not (data.randaugment_ops or data.mixup_alpha or data.cutmix_alpha):
        return None
    return BatchAugmentation(
        seed=seed,
        num_classes=num_classes,
        randaugment=keras.layers.RandAugment(
            value_range=(0, 255), num_ops=data.randaugment_ops, factor=data.randaugment_magnitude, dtype="float32"
        )
        if data.randaugment_ops
        else None,
        mixup=keras.layers.MixUp(alpha=data.mixup_alpha, dtype="float32") if data.mixup_alpha else None,
        # factor (a, a): Beta(a, a), the paper's draw (a single number would draw a from U(0, a)).
        cutmix=keras.layers.CutMix(factor=(data.cutmix_alpha, data.cutmix_alpha), dtype="float32")
        if data.cutmix_alpha
        else None,
    )
