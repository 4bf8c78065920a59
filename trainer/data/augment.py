"""Training augmentation: pad-and-crop with flips (CIFAR's recipe) and random-resized crops
(ImageNet's), each example's draws keyed by (seed, epoch, example index) (trainer.data.plan).

So an image is augmented the same way whichever batch, replica, device or resumed run it
lands in, and the device feed (trainer.data.device) reproduces the host pipeline exactly.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.data.decode import random_resized_crop
from trainer.data.plan import AUGMENT_STREAM, FLIP_STREAM, InputSpec, example_draws

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

    Only gathers, pads and selects: cheap wherever the images are, host or accelerator.
    """
    crop_padding = spec.crop_padding
    if not crop_padding:
        return flipped(images, flip)
    height, width = images.shape[1], images.shape[2]
    pad = [[0, 0], [crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]]
    padded = tf.pad(images, pad, mode="REFLECT" if spec.pad_mode == "reflect" else "CONSTANT")
    rows = offset_y[:, None] + tf.range(height)[None, :]
    # The flip is folded into the column gather (right to left), saving two passes over the batch.
    columns = tf.where(flip[:, None], tf.range(width - 1, -1, -1)[None, :], tf.range(width)[None, :])
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, offset_x[:, None] + columns, axis=2, batch_dims=1)


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
