"""Image files to uint8 pixels inside tf.data: decode, check, resize, crop.

Everything here is TensorFlow ops on one example, so `tf.data` runs it in parallel
across cores and the same function serves training, evaluation, caching, previews and
`launch predict`. Formats: whatever `tf.io.decode_image` reads (JPEG, PNG, BMP, GIF's
first frame, WebP); grey, RGBA and 16-bit images come out as 8-bit RGB.

The pixel limit is checked from the file's header before decoding: a 20000x20000 PNG is
a few KB on disk and 1.2 GB once decoded.
"""

from __future__ import annotations

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


def decode(raw: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [H, W, 3], refusing images over the pixel limit before decoding.

    `name` (the file) goes into the error message of an image over the limit.
    """
    height, width = header_size(raw)
    pixels = height * width
    check = tf.debugging.Assert(
        pixels <= MAX_IMAGE_PIXELS,
        [name, "is", width, "x", height, f"pixels, over the {MAX_IMAGE_PIXELS // 2**20} MP limit for one image"],
        name="pixel_limit",
    )
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


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


def _crop_box(image: tf.Tensor, top, left, height, width) -> tf.Tensor:
    """Normalised [y1, x1, y2, x2] of a crop given in pixels."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    return tf.stack([top / shape[0], left / shape[1], (top + height) / shape[0], (left + width) / shape[1]])


def _crop_resized(image: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
    """Crop and resize in one op: only the crop's pixels are interpolated."""
    crop = tf.image.crop_and_resize(tf.cast(image[None], tf.float32), box[None], [0], [size, size])
    return to_uint8(crop[0])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The evaluation view of the random_resized recipe: the central 87.5% square, resized."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    side = CENTER_CROP_FRACTION * tf.minimum(shape[0], shape[1])
    box = _crop_box(image, (shape[0] - side) / 2, (shape[1] - side) / 2, side, side)
    return _crop_resized(image, box, size)


def random_resized_crop(image: tf.Tensor, size: int, draws: tf.Tensor, min_area: float) -> tf.Tensor:
    """A crop of draws-chosen area and aspect, resized to size x size.

    `draws`: 4 uniform numbers in [0, 1) (area, aspect, top, left), so the crop is a pure
    function of the example's random draws. A crop that would not fit is shrunk to fit,
    keeping its aspect: one draw, never a retry loop.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    area = shape[0] * shape[1] * (min_area + (1.0 - min_area) * draws[0])
    low, high = tf.math.log(_ASPECT_RANGE[0]), tf.math.log(_ASPECT_RANGE[1])
    aspect = tf.exp(low + (high - low) * draws[1])  # width / height
    width, height = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
    fit = tf.minimum(1.0, tf.minimum(shape[1] / width, shape[0] / height))
    width, height = width * fit, height * fit
    top, left = (shape[0] - height) * draws[2], (shape[1] - width) * draws[3]
    return _crop_resized(image, _crop_box(image, top, left, height, width), size)


def eval_view(image: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """How evaluation and prediction see an image: resized (pad recipe) or center-cropped."""
    return center_crop(image, size) if crop == "random_resized" else resize(image, size)
