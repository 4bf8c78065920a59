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

import numpy as np
import tensorflow as tf

# Largest image decoded (width x height). 64 MP is a large camera photo.
MAX_IMAGE_PIXELS = 64 * 2**20
# The ImageNet evaluation recipe: the central 87.5% of the shorter side, resized.
CENTER_CROP_FRACTION = 0.875
# random_resized crops: the aspect ratios drawn from (log-uniformly), as torchvision/Keras.
_ASPECT_RANGE = (3 / 4, 4 / 3)
_HEADER_BYTES = 32


def _fields(*places: tuple[int, int, bool]) -> np.ndarray:
    """Rows of weights that read unsigned integers (offset, byte count, big-endian) out of
    the header bytes in one matrix product."""
    rows = np.zeros([len(places), _HEADER_BYTES])
    for row, (offset, count, big_endian) in zip(rows, places):
        weights = [256.0**i for i in range(count)]
        row[offset : offset + count] = weights[::-1] if big_endian else weights
    return rows


def _magics(*rows: tuple[tuple[int, bytes], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(expected bytes, mask) rows: each row's magic bytes at their offsets."""
    expected, mask = np.zeros([len(rows), _HEADER_BYTES], np.int64), np.zeros([len(rows), _HEADER_BYTES])
    for row, places in enumerate(rows):
        for offset, magic in places:
            expected[row, offset : offset + len(magic)] = list(magic)
            mask[row, offset : offset + len(magic)] = 1.0
    return expected, mask


# The formats besides JPEG whose size sits at fixed offsets, in the order they are tried:
# PNG, GIF, BMP, then WebP's three kinds (VP8, VP8L, VP8X). Heights, then widths.
_SIZE_FIELDS = _fields(
    *[(20, 4, True), (8, 2, False), (22, 4, False), (28, 2, False), (21, 4, False), (27, 3, False)],
    *[(16, 4, True), (6, 2, False), (18, 4, False), (26, 2, False), (21, 4, False), (24, 3, False)],
)
# VP8 keeps 14 bits of each; VP8L packs (width - 1, height - 1) in 14 bits each; VP8X stores
# (width - 1, height - 1) in 3 bytes each.
_SIZE_DIVISOR = np.array([[1, 1, 1, 1, 16384, 1], [1] * 6], np.int64)
_SIZE_MODULUS = np.array([[2**40, 2**40, 2**40, 16384, 16384, 2**40]] * 2, np.int64)
_SIZE_PLUS = np.array([[0, 0, 0, 0, 1, 1]] * 2, np.int64)
_BMP_HEIGHT = np.array([[False, False, True, False, False, False], [False] * 6])  # signed: negative is top-down
_MAGIC, _MAGIC_MASK = _magics(
    ((0, b"\x89PNG"),),
    ((0, b"GIF"),),
    ((0, b"BM"),),
    ((0, b"RIFF"), (8, b"WEBP")),
    ((12, b"VP8 "),),
    ((12, b"VP8L"),),
    ((12, b"VP8X"),),
)
# Which magics each kind needs (rows: the six kinds above; columns: the magics). A WebP
# without one of its three chunk tags has no size here, so it is refused: libwebp still
# decodes a bare VP8L stream after "WEBP", whose size bytes sit elsewhere (a review found
# a 26-byte file that decoded to 268 MP).
_KIND_NEEDS = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0],  # PNG
        [0, 1, 0, 0, 0, 0, 0],  # GIF (its frames are walked: _gif_extent)
        [0, 0, 1, 0, 0, 0, 0],  # BMP
        [0, 0, 0, 1, 1, 0, 0],  # WebP, VP8
        [0, 0, 0, 1, 0, 1, 0],  # WebP, VP8L
        [0, 0, 0, 1, 0, 0, 1],  # WebP, VP8X
    ],
    np.float64,
)
_GIF = 1  # its row above


def _called_not_inlined(fn: Callable) -> Callable:
    """`fn` as a function that stays one call node in the graphs that use it.

    For the branches of a tf.cond that almost every image skips (another format than
    JPEG, a size to resize from): TensorFlow inlines a branch into the calling graph, and
    its executor then visits every node of the skipped branch (as dead) for every image;
    for a 32x32 JPEG those visits cost more than its decode (issue #26).
    """
    return tf.function(fn, autograph=False, reduce_retracing=True, experimental_attributes={"_noinline": True})


def _header_bytes(raw: tf.Tensor) -> tf.Tensor:
    """The first bytes of `raw` as int64 [_HEADER_BYTES], zero-padded if the file is shorter."""
    header = tf.strings.substr(raw + tf.constant(b"\0" * _HEADER_BYTES), 0, _HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int64)


@_called_not_inlined
def _other_size(raw: tf.Tensor) -> tf.Tensor:
    """(height, width, frame pixels) of a PNG, GIF, BMP or WebP from its header bytes
    (frame pixels: a GIF's, see _gif_extent; 0 for the others); unknown: zeros.

    A few matrix ops, not a graph per format: tf.data runs this for every image file (in
    a tf.cond's branch that JPEGs skip, but whose every node the executor still visits),
    and node count is what a 32x32 image's decode costs (issue #26: the previous form, ~200
    nodes, took 12% of the streamed pipeline's time). Values stay exact: float64 holds
    4-byte integers.
    """
    data = _header_bytes(raw)
    fields = tf.cast(tf.linalg.matvec(_SIZE_FIELDS, tf.cast(data, tf.float64)), tf.int64)
    sizes = tf.reshape(fields, [2, 6]) // _SIZE_DIVISOR % _SIZE_MODULUS + _SIZE_PLUS
    sizes = tf.where(_BMP_HEIGHT & (sizes >= 2**31), 2**32 - sizes, sizes)
    wrong_bytes = tf.reduce_sum(tf.cast(tf.not_equal(data, _MAGIC), tf.float64) * _MAGIC_MASK, axis=1)
    matched = tf.cast(tf.equal(wrong_bytes, 0.0), tf.float64)
    kinds = tf.equal(tf.linalg.matvec(_KIND_NEEDS, matched), _KIND_NEEDS.sum(axis=1))
    first = tf.argmax(tf.cast(kinds, tf.int32), output_type=tf.int32)
    size = tf.concat([tf.where(tf.reduce_any(kinds), sizes[:, first], tf.zeros([2], tf.int64)), [0]], axis=0)
    return tf.cond(kinds[_GIF], lambda: _gif_extent(raw), lambda: size)


@_called_not_inlined
def _gif_extent(raw: tf.Tensor) -> tf.Tensor:
    """(height, width, frame pixels) a GIF decodes to, from a walk over its blocks.

    The logical screen in its header is not what the decoder allocates: giflib reads every
    frame (one byte a pixel, even for the first frame alone) and TensorFlow's canvas holds
    the largest frame, which may lie outside the screen (a review's 75 KB GIF with an 8x8
    screen decoded to 10000x10000). So: the canvas covers the screen and every frame's
    extent, and the frames' pixels are summed. One step per block or data sub-block (at
    most 255 bytes each), only for GIFs (a call node for everything else).
    """
    data = tf.cast(tf.io.decode_raw(raw + tf.constant(b"\0" * 16), tf.uint8), tf.int64)
    end = tf.cast(tf.strings.length(raw), tf.int64)

    def byte(at: tf.Tensor) -> tf.Tensor:
        return tf.gather(data, tf.minimum(tf.cast(at, tf.int64), end + 15))

    def word(at) -> tf.Tensor:  # little-endian 16 bits
        return byte(at) + 256 * byte(at + 1)

    def color_table(flags: tf.Tensor) -> tf.Tensor:
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

    def step(at, in_data, height, width, pixels, _done):
        mark, at_block = byte(at), tf.logical_not(in_data)
        image, extension = at_block & tf.equal(mark, 0x2C), at_block & tf.equal(mark, 0x21)
        frame_height, frame_width = word(at + 7), word(at + 5)
        # A descriptor: 10 bytes, a local colour table, the LZW code size, then data sub-blocks.
        after_block = tf.where(image, at + 11 + color_table(byte(at + 9)), at + 2)
        following = tf.where(in_data, at + 1 + mark, after_block)
        more = tf.where(in_data, tf.not_equal(mark, 0), image | extension)
        height = tf.where(image, tf.maximum(height, word(at + 3) + frame_height), height)
        width = tf.where(image, tf.maximum(width, word(at + 1) + frame_width), width)
        pixels = tf.where(image, pixels + frame_height * frame_width, pixels)
        done = (at_block & tf.logical_not(image | extension)) | (following >= end)
        return following, more, height, width, pixels, done

    start = 13 + color_table(byte(10))
    state = (start, tf.constant(False), word(8), word(6), tf.constant(0, tf.int64), start >= end)
    _, _, height, width, pixels, _ = tf.while_loop(lambda *state: tf.logical_not(state[-1]), step, state)
    return tf.stack([height, width, pixels])


def header_size(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) read from an encoded image's header, without decoding it.

    JPEG's size sits after a variable run of markers (TensorFlow's extract_jpeg_shape
    finds it); the other formats' at fixed offsets, but a GIF's is the canvas its frames
    need (_gif_extent). Unknown formats give (0, 0), and decoding refuses them.
    """
    size = _header_size(raw)
    return size[0], size[1]


def _is_jpeg(raw: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(raw, 0, 2), b"\xff\xd8")


def _header_size(raw: tf.Tensor) -> tf.Tensor:
    """int64 [3]: height, width, and a third figure under the pixel limit unless the image
    decodes more than its canvas (a GIF's frames: _gif_extent; a JPEG's channel count)."""
    return tf.cond(_is_jpeg(raw), lambda: tf.io.extract_jpeg_shape(raw, tf.int64), lambda: _other_size(raw))


def _within_limit(raw: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """`raw`, or no bytes at all unless its header's size (_header_size) is known and
    within the pixel limit: decoding then fails at once, allocating nothing, and the
    failure is explained the way every failed decode is (trainer.data.diagnose decodes the
    file again in Python, and `image_problem` names the limit). A tf.debugging.Assert here
    cost ~10% of a streamed 32x32 image's decode. Each figure is bounded before the
    product, which could otherwise wrap (a PNG header of 2^32-1 x 2^32-1)."""
    known = tf.reduce_all((size > [0, 0, -1]) & (size <= MAX_IMAGE_PIXELS))
    return tf.where(known & (size[0] * size[1] <= MAX_IMAGE_PIXELS), raw, "")


def _decode_all(raw: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode(raw: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [H, W, 3], refusing images over the pixel limit before decoding."""
    return _decode_all(_within_limit(raw, _header_size(raw)))


def decode_window(raw: tf.Tensor, window: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """Only the part of an encoded image that `window(height, width)` -> [top, left, h, w]
    (int32) picks. A JPEG decodes just that part (decode_and_crop_jpeg: a random crop of a
    photo costs a fraction of a full decode); other formats are decoded whole, then cut."""
    size = _header_size(raw)
    height, width = size[0], size[1]
    raw = _within_limit(raw, size)

    def jpeg() -> tf.Tensor:
        return tf.image.decode_and_crop_jpeg(raw, window(height, width), channels=3)

    def other() -> tf.Tensor:
        image = _decode_all(raw)
        shape = tf.shape(image, out_type=tf.int64)
        top, left, crop_height, crop_width = tf.unstack(window(shape[0], shape[1]))
        return image[top : top + crop_height, left : left + crop_width]

    return tf.ensure_shape(tf.cond(_is_jpeg(raw), jpeg, other), [None, None, 3])


def each_example(fn: Callable, elements, signature) -> tf.Tensor:
    """`fn` on each example of a batch (`elements`: a tensor or a tuple of tensors, split
    along their first axis), one after the other, within one call: decode a batch inside
    one tf.data map call, tf.data running several batches at once.

    Why not tf.data's unbatch, a parallel map per example and batch: tf.data's own cost per
    element is larger than a 32x32 JPEG's decode. Streaming the CIFAR-10 folder on 2 cores
    went from 16k img/s that way to 32k img/s this way (issue #26), the same pixels.
    """
    return tf.map_fn(fn, elements, fn_output_signature=signature, parallel_iterations=1)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """The whole image at size x size (aspect not kept, as Keras' image_dataset_from_directory).

    Images already that size pass through untouched, so a dataset stored at its training
    size (CIFAR-10) is bit-identical whether it is cached or streamed.
    """
    same = tf.reduce_all(tf.equal(tf.shape(image), [size, size, 3]))
    return tf.ensure_shape(tf.cond(same, lambda: image, lambda: _resized(image, size)), [size, size, 3])


@_called_not_inlined
def _resized(image: tf.Tensor, size: int) -> tf.Tensor:
    return to_uint8(tf.image.resize(image, [size, size], method="bilinear", antialias=True))


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


def decode_random_resized(raw: tf.Tensor, size: int, draws: tf.Tensor, min_area: float) -> tf.Tensor:
    """A random-resized crop straight from the encoded bytes (JPEG: only the crop is decoded)."""
    return resized_crop(decode_window(raw, lambda h, w: random_window(h, w, draws, min_area)), size)


def decode_view(raw: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Evaluation's view straight from the encoded bytes."""
    if crop == "random_resized":
        return resized_crop(decode_window(raw, center_window), size)
    return resize(decode(raw), size)


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


def image_problem(raw: bytes) -> str | None:
    """Why encoded bytes do not decode, in words ("not a whole JPEG (200 bytes)", "over
    the 64 MP limit"), or None if they do. The pipeline's own decode only fails; this says why."""
    encoded = tf.constant(raw)
    try:
        with native_stderr_quiet():
            refusal = _refusal(*(int(value) for value in _header_size(encoded)), raw)
            if refusal:
                return refusal
            decode(encoded)
    except tf.errors.OpError as err:
        return _why_not(raw, err.message)
    return None


def _refusal(height: int, width: int, frame_pixels: int, raw: bytes) -> str | None:
    """Why the header refuses an image before decoding (over the limit, or no size to
    check: unknown, or a known format without one), or None."""
    limit = f"the {MAX_IMAGE_PIXELS // 2**20} MP limit for one image; shrink it first"
    if height * width > MAX_IMAGE_PIXELS:
        return f"{width}x{height} pixels ({height * width / 2**20:.0f} MP), over {limit}"
    if frame_pixels > MAX_IMAGE_PIXELS:  # a GIF's frames (for a JPEG this is its channel count)
        return f"its frames hold {frame_pixels / 2**20:.0f} MP (every frame is decoded), over {limit}"
    if height * width:
        return None
    if not raw:
        return "an empty file, not an image"
    if raw[:3] == b"GIF" or raw[:4] in (b"\x89PNG", b"RIFF") or raw[:2] == b"BM":
        return "its header gives no size (0x0) to check against the pixel limit, so it is not decoded; save it again"
    return f"not an image: its first bytes ({raw[:8]!r}) are no JPEG, PNG, GIF, BMP or WebP header"


def _why_not(raw: bytes, message: str) -> str:
    """Why an image whose header passed (`_refusal`: empty, unknown and unsized are said
    there) failed to decode."""
    if raw[:2] == b"\xff\xd8" and b"\xff\xd9" not in raw[-64:]:
        return f"not a whole JPEG ({len(raw)} bytes)"
    return tf_reason(message)
