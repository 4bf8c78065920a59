"""From slices of (epoch, example indices[, raw records]) to (uint8 images, labels[, mask]).

Images stay uint8 until the model: the cast and normalisation happen on the device, which
keeps host work and host-to-device traffic small.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from trainer.data.augment import augment_batch, augmented, flipped, flips, random_resized_draws
from trainer.data.decode import (
    decode,
    decode_random_resized,
    decode_view,
    each_example,
    random_resized_crop,
    resize,
)
from trainer.data.plan import InputSpec
from trainer.data.records import checked_labels, padding_record, parse_records
from trainer.data.splits import Examples, FileSplit, RecordSplit, Split

# The most examples of a slice decoded in one call (trainer.data.decode.each_example),
# chunks in parallel: a call costs more than a 32x32 JPEG's decode, so not one example a
# call; but one call a slice would leave the first batch of large photos to one core and
# hold a slice per core in flight on many-core hosts.
CHUNK = 32


class ExampleLoader:
    """Turns slices of (epoch, example indices) into (uint8 images, labels[, mask]) batches.

    Pixels in memory with the pad recipe: one batched gather and augmentation per slice
    (the fast path). Anything else is read, decoded, cropped and resized example by
    example, a chunk of up to CHUNK examples per call (trainer.data.decode.each_example),
    then joined and augmented as a batch; tf.data runs chunks in parallel and keeps their
    order, so batches are the same whatever the parallelism. TFRecord slices carry each
    raw record beside its ordinal (no random access), files are read by index.
    """

    def __init__(self, examples: Examples, spec: InputSpec):
        self.spec = spec
        self.in_memory = isinstance(examples, Split)
        self.size = spec.image_size
        self.random_resized = spec.augment and spec.crop == "random_resized"
        self.records = isinstance(examples, RecordSplit)
        if isinstance(examples, RecordSplit):
            self.num_classes = examples.num_classes  # labels are read per record: checked there
            return
        self.labels = tf.constant(examples.labels, tf.int32)
        if isinstance(examples, Split):
            self.images = tf.constant(examples.images)
            self.size = spec.image_size or examples.images.shape[1]
        elif isinstance(examples, FileSplit):
            self.paths = examples.paths()

    def batches(self, slices: tf.data.Dataset, training: bool) -> tf.data.Dataset:
        if self.in_memory and not (training and self.random_resized):
            make = self._gather_train if training else self._gather_eval
            return slices.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
        parts = _parts(slices.element_spec[1].shape[0])

        @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
        def cut(epoch, *columns):
            return (tf.fill([parts], epoch), *(tf.reshape(column, [parts, -1]) for column in columns))

        decode = self._decode_train if training else self._decode_eval
        finish = self._finish_train if training else self._finish_eval
        chunks = slices.map(cut).unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return chunks.batch(parts).map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    # In-memory batches.
    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _gather_train(self, epoch, indices):
        batch = tf.gather(self.images, indices)
        return augmented(batch, indices, epoch, self.spec), tf.gather(self.labels, indices)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _gather_eval(self, _, indices):
        mask = indices >= 0
        safe = tf.where(mask, indices, tf.zeros_like(indices))
        return tf.gather(self.images, safe), tf.gather(self.labels, safe), tf.cast(mask, tf.float32)

    # Batches decoded (or cropped) example by example.
    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _decode_train(self, epoch, indices, raws=None):
        sources, labels = self._sources(indices, raws)
        if not self.random_resized:
            images = self._each_example(lambda source: resize(decode(self._bytes(source)), self.size), sources)
            return epoch, indices, images, labels
        draws = random_resized_draws(indices, epoch, self.spec)
        return epoch, indices, self._each_example(lambda pair: self._random_resized(*pair), (sources, draws)), labels

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _finish_train(self, epochs, indices, images, labels):
        epoch, indices, images, labels = epochs[0], _joined(indices), _joined(images), _joined(labels)
        if not self.spec.augment:
            return images, labels
        if self.random_resized:  # cropped already; the flips
            draws = random_resized_draws(indices, epoch, self.spec)
            return flipped(images, flips(indices, epoch, self.spec, draws[:, 4])), labels
        return augment_batch(images, indices, epoch, self.spec), labels

    def _random_resized(self, source: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
        if self.in_memory:
            return random_resized_crop(self.images[source], self.size, draws, self.spec.crop_min_area)
        # A JPEG decodes only the crop's part of the file.
        return decode_random_resized(self._bytes(source), self.size, draws, self.spec.crop_min_area)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _decode_eval(self, _, indices, raws=None):
        mask = indices >= 0  # the last batch's padding (-1): file 0 is decoded in its place, a record not at all
        if raws is not None:
            raws = tf.where(mask, raws, padding_record())
        sources, labels = self._sources(tf.maximum(indices, 0), raws)

        def view(source: tf.Tensor) -> tf.Tensor:
            return decode_view(self._bytes(source), self.size, self.spec.crop)

        if raws is None:
            images = self._each_example(view, sources)
        else:
            blank = tf.zeros([self.size, self.size, 3], tf.uint8)
            images = self._each_example(
                lambda pair: tf.cond(pair[1], lambda: view(pair[0]), lambda: blank), (sources, mask)
            )
        return images, labels, tf.cast(mask, tf.float32)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _finish_eval(self, images, labels, mask):
        return _joined(images), _joined(labels), _joined(mask)

    def _sources(self, indices: tf.Tensor, raws: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(what each example's pixels come from, labels) of a slice: encoded images of
        records, paths of files, indices of images in memory. A failed decode is named
        afterwards (trainer.data.diagnose), so nothing here carries a file's name."""
        if raws is not None:
            encoded, labels = parse_records(raws)
            return encoded, checked_labels(labels, indices, self.num_classes)
        labels = tf.gather(self.labels, indices)
        return (indices, labels) if self.in_memory else (tf.gather(self.paths, indices), labels)

    def _bytes(self, source: tf.Tensor) -> tf.Tensor:
        """One example's encoded image: a record's as parsed, a file's read here."""
        return source if self.records else tf.io.read_file(source)

    def _each_example(self, fn: Callable[[tf.Tensor], tf.Tensor], elements) -> tf.Tensor:
        """uint8 [B, size, size, 3]: `fn` on each example of the slice, in one call."""
        return each_example(fn, elements, tf.TensorSpec([self.size, self.size, 3], tf.uint8))


def _joined(chunks: tf.Tensor) -> tf.Tensor:
    """[parts, n, ...] -> [parts * n, ...]: a slice's chunks back together, in order."""
    return tf.reshape(chunks, tf.concat([[-1], tf.shape(chunks)[2:]], axis=0))


def _parts(examples: int | None) -> int:
    """How many chunks a slice of `examples` is decoded in: the fewest of at most
    CHUNK examples each that divide it evenly (1 if its size is not static)."""
    if not examples:
        return 1
    return next(parts for parts in range(1, examples + 1) if examples % parts == 0 and examples // parts <= CHUNK)
