"""Image files to uint8 pixels inside tf.data: decode, check, resize, crop.

Everything here is TensorFlow ops on one example, so `tf.data` runs it in parallel
across cores and the same function serves training, evaluation, caching, previews and
`launch predict`. Formats: whatever `tf.io.decode_image` reads (JPEG, PNG, BMP, GIF's
first frame, WebP); grey, RGBA and 16-bit images come out as 8-bit RGB.

The pixel limit is checked from the file's header before decoding: a 20000x20000 PNG is
a few KB on disk and 1.2 GB once decoded.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator

import tensorflow as tf

# Largest image decoded (width x height). 64 MP is a large camera photo.
MAX_IMAGE_PIXELS = 64 * 2**20
# The ImageNet evaluation recipe: the central 87.5% of the shorter side, resized.
CENTER_CROP_FRACTION = 0.875
# random_resized crops: the aspect ratios drawn from (log-uniformly), as torchvision/Keras.
_ASPECT_RANGE = (3 / 4, 4 / 3)
_HEADER_BYTES = 32


def _header_bytes(raw: tf.Tensor) -> tf.Tensor:
    """The first bytes of `raw` as int64 [_HEADER_BYTES], zero-padded if the file is shorter."""
    header = tf.strings.substr(raw + tf.constant(b"\0" * _HEADER_BYTES), 0, _HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int64)


def _number(data: tf.Tensor, start: int, count: int, big_endian: bool = False) -> tf.Tensor:
    """`count` bytes from `start` as an unsigned integer."""
    weights = [256**i for i in range(count)]
    return tf.reduce_sum(data[start : start + count] * tf.constant(weights[::-1] if big_endian else weights, tf.int64))


def _is(data: tf.Tensor, start: int, magic: bytes) -> tf.Tensor:
    return tf.reduce_all(tf.equal(data[start : start + len(magic)], tf.constant(list(magic), tf.int64)))


def _other_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width) of a PNG, GIF, BMP or WebP from its header bytes, branch-free (every
    format's formula is a few integer ops; the magic bytes pick one). Unknown: (0, 0)."""
    bmp_height = _number(data, 22, 4)
    webp_lossless = _number(data, 21, 4)
    webp = tf.where(
        _is(data, 12, b"VP8 "),
        tf.stack([_number(data, 28, 2) % 16384, _number(data, 26, 2) % 16384]),
        tf.where(
            _is(data, 12, b"VP8L"),
            tf.stack([(webp_lossless // 16384) % 16384 + 1, webp_lossless % 16384 + 1]),
            tf.stack([_number(data, 27, 3) + 1, _number(data, 24, 3) + 1]),  # VP8X
        ),
    )
    candidates = [
        (_is(data, 0, b"\x89PNG"), tf.stack([_number(data, 20, 4, True), _number(data, 16, 4, True)])),
        (_is(data, 0, b"GIF"), tf.stack([_number(data, 8, 2), _number(data, 6, 2)])),
        # BMP height is signed (negative: rows stored top-down).
        (
            _is(data, 0, b"BM"),
            tf.stack([tf.where(bmp_height >= 2**31, 2**32 - bmp_height, bmp_height), _number(data, 18, 4)]),
        ),
        (_is(data, 8, b"WEBP"), webp),
    ]
    size = tf.zeros([2], tf.int64)
    for matches, value in reversed(candidates):
        size = tf.where(matches, value, size)
    return size


def header_size(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) read from an encoded image's header, without decoding it.

    JPEG's size sits after a variable run of markers (TensorFlow's extract_jpeg_shape
    finds it); the other formats' at fixed offsets. Unknown formats give (0, 0): decoding
    them fails next, with TensorFlow's message.
    """
    is_jpeg = tf.equal(tf.strings.substr(raw, 0, 2), b"\xff\xd8")
    size = tf.cond(
        is_jpeg, lambda: tf.io.extract_jpeg_shape(raw, tf.int64)[:2], lambda: _other_size(_header_bytes(raw))
    )
    return size[0], size[1]


def _check_pixels(height: tf.Tensor, width: tf.Tensor, name: tf.Tensor) -> tf.Operation:
    return tf.debugging.Assert(
        height * width <= MAX_IMAGE_PIXELS,
        [name, "is", width, "x", height, f"pixels, over the {MAX_IMAGE_PIXELS // 2**20} MP limit for one image"],
        name="pixel_limit",
    )


def _decode_all(raw: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode(raw: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [H, W, 3], refusing images over the pixel limit before decoding.

    `name` (the file) goes into the error message of an image over the limit.
    """
    height, width = header_size(raw)
    with tf.control_dependencies([_check_pixels(height, width, name)]):
        return _decode_all(raw)


def decode_window(raw: tf.Tensor, name: tf.Tensor, window: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Only the part of an encoded image that `window(height, width)` -> [top, left, h, w]
    (int32) picks. A JPEG decodes just that part (decode_and_crop_jpeg: a random crop of a
    photo costs a fraction of a full decode); other formats are decoded whole, then cut."""
    height, width = header_size(raw)
    with tf.control_dependencies([_check_pixels(height, width, name)]):
        is_jpeg = tf.equal(tf.strings.substr(raw, 0, 2), b"\xff\xd8")

        def jpeg() -> tf.Tensor:
            return tf.image.decode_and_crop_jpeg(raw, window(height, width), channels=3)

        def other() -> tf.Tensor:
            image = _decode_all(raw)
            shape = tf.shape(image, out_type=tf.int64)
            top, left, crop_height, crop_width = tf.unstack(window(shape[0], shape[1]))
            return image[top : top + crop_height, left : left + crop_width]

        return tf.ensure_shape(tf.cond(is_jpeg, jpeg, other), [None, None, 3])


def read_and_decode(path: tf.Tensor) -> tf.Tensor:
    """One image file (any tf.io.gfile path) -> uint8 [H, W, 3]."""
    return decode(tf.io.read_file(path), path)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """The whole image at size x size (aspect not kept, as Keras' image_dataset_from_directory).

    Images already that size pass through untouched, so a dataset stored at its training
    size (CIFAR-10) is bit-identical whether it is cached or streamed.
    """
    shape = tf.shape(image)

    def resized() -> tf.Tensor:
        return to_uint8(tf.image.resize(image, [size, size], method="bilinear", antialias=True))

    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.ensure_shape(tf.cond(same, lambda: image, resized), [size, size, 3])


def center_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """[top, left, h, w] of the central 87.5% square: the random_resized recipe's evaluation view."""
    side = tf.maximum(tf.cast(CENTER_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32), tf.int32), 1)
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def random_window(height: tf.Tensor, width: tf.Tensor, draws: tf.Tensor, min_area: float) -> tf.Tensor:
    """[top, left, h, w] of a crop of draws-chosen area and aspect.

    `draws`: uniform numbers in [0, 1) (area, aspect, top, left), so the crop is a pure
    function of the example's random draws. A crop that would not fit is shrunk to fit,
    keeping its aspect: one draw, never a retry loop.
    """
    rows, cols = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = rows * cols * (min_area + (1.0 - min_area) * draws[0])
    low, high = tf.math.log(_ASPECT_RANGE[0]), tf.math.log(_ASPECT_RANGE[1])
    aspect = tf.exp(low + (high - low) * draws[1])  # width / height
    crop_width, crop_height = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
    fit = tf.minimum(1.0, tf.minimum(cols / crop_width, rows / crop_height))
    crop_height = tf.clip_by_value(tf.cast(crop_height * fit, tf.int32), 1, tf.cast(height, tf.int32))
    crop_width = tf.clip_by_value(tf.cast(crop_width * fit, tf.int32), 1, tf.cast(width, tf.int32))
    top = tf.cast((rows - tf.cast(crop_height, tf.float32)) * draws[2], tf.int32)
    left = tf.cast((cols - tf.cast(crop_width, tf.float32)) * draws[3], tf.int32)
    return tf.stack([top, left, crop_height, crop_width])


def resized_crop(crop: tf.Tensor, size: int) -> tf.Tensor:
    """A crop at size x size: bilinear, as TensorFlow's ImageNet pipelines resize crops."""
    return tf.ensure_shape(to_uint8(tf.image.resize(crop, [size, size], method="bilinear")), [size, size, 3])


def _cut(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    top, left, height, width = tf.unstack(window)
    return image[top : top + height, left : left + width]


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The evaluation view of the random_resized recipe on decoded pixels."""
    shape = tf.shape(image)
    return resized_crop(_cut(image, center_window(shape[0], shape[1])), size)


def random_resized_crop(image: tf.Tensor, size: int, draws: tf.Tensor, min_area: float) -> tf.Tensor:
    """A random-resized crop of decoded pixels (the same window as from the file)."""
    shape = tf.shape(image)
    return resized_crop(_cut(image, random_window(shape[0], shape[1], draws, min_area)), size)


def decode_random_resized(raw: tf.Tensor, name: tf.Tensor, size: int, draws: tf.Tensor, min_area: float) -> tf.Tensor:
    """A random-resized crop straight from the encoded bytes (JPEG: only the crop is decoded)."""
    return resized_crop(decode_window(raw, name, lambda h, w: random_window(h, w, draws, min_area)), size)


def decode_view(raw: tf.Tensor, name: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Evaluation's view straight from the encoded bytes."""
    if crop == "random_resized":
        return resized_crop(decode_window(raw, name, center_window), size)
    return resize(decode(raw, name), size)


def eval_view(image: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """How evaluation and prediction see an image: resized (pad recipe) or center-cropped."""
    return center_crop(image, size) if crop == "random_resized" else resize(image, size)


# --- explaining a failed decode (error paths only: plain Python, eager) ----------------------

# TensorFlow's framing of an op error: "{{function_node __wrapped__...}}", "[[{{node ...}}]]",
# "[Op:ExtractJpegShape]", a trailing "name:". None of it tells the user anything.
_TF_INTERNALS = re.compile(r"\{\{[^{}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]|\bname:\s*$", re.MULTILINE)


def tf_reason(message: str) -> str:
    """The words of a TensorFlow error message, without TensorFlow's internals around them."""
    lines = [line.strip(" \t;") for line in _TF_INTERNALS.sub("", message).splitlines()]
    return next((line for line in lines if line), "TensorFlow gave no reason")


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Silence the process's own stderr (fd 2) while a failed image is decoded again to
    say why: libjpeg prints "Improper call to JPEG library in state 201" straight to it on
    every attempt, which would bury the one line that matters. Error paths only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def image_problem(raw: bytes, name: str) -> str | None:
    """Why encoded bytes do not decode, in words ("not a whole JPEG (200 bytes)"), or None
    if they do. `name` names the image in a pixel-limit refusal."""
    encoded = tf.constant(raw)
    try:
        with native_stderr_quiet():
            height, width = (int(value) for value in header_size(encoded))
            if height * width > MAX_IMAGE_PIXELS:
                return (
                    f"{width}x{height} pixels ({height * width / 2**20:.0f} MP), over the "
                    f"{MAX_IMAGE_PIXELS // 2**20} MP limit for one image; shrink it first"
                )
            decode(encoded, tf.constant(name))
    except tf.errors.OpError as err:
        return _why_not(raw, err.message)
    return None


def _why_not(raw: bytes, message: str) -> str:
    if not raw:
        return "an empty file, not an image"
    if raw[:2] == b"\xff\xd8" and b"\xff\xd9" not in raw[-64:]:
        return f"not a whole JPEG ({len(raw)} bytes)"
    if "Unknown image file format" in message:
        return f"not an image: its first bytes ({raw[:8]!r}) are no JPEG, PNG, GIF, BMP or WebP header"
    return tf_reason(message)
