"""From slices of (epoch, example indices[, raw records]) to (uint8 images, labels[, mask]).

Images stay uint8 until the model: the cast and normalisation happen on the device, which
keeps host work and host-to-device traffic small.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.data.augment import augment_batch, augmented, flipped, flips, random_resized_draws
from trainer.data.decode import decode, decode_random_resized, decode_view, random_resized_crop, resize
from trainer.data.plan import InputSpec
from trainer.data.records import checked_label, parse_record
from trainer.data.splits import Examples, FileSplit, RecordSplit, Split


class ExampleLoader:
    """Turns slices of (epoch, example indices) into (uint8 images, labels[, mask]) batches.

    Pixels in memory with the pad recipe: one batched gather and augmentation per slice
    (the fast path). Anything else goes example by example through a parallel map (read,
    decode, crop, resize), then is batched again: tf.data keeps the order, so batches are
    the same whatever the parallelism. TFRecord slices carry each raw record beside its
    ordinal (no random access), files are read by index.
    """

    def __init__(self, examples: Examples, spec: InputSpec):
        self.spec = spec
        self.in_memory = isinstance(examples, Split)
        self.size = spec.image_size
        self.random_resized = spec.augment and spec.crop == "random_resized"
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
    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _gather_train(self, epoch, indices):
        batch = tf.gather(self.images, indices)
        return augmented(batch, indices, epoch, self.spec), tf.gather(self.labels, indices)

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def _gather_eval(self, _, indices):
        mask = indices >= 0
        safe = tf.where(mask, indices, tf.zeros_like(indices))
        return tf.gather(self.images, safe), tf.gather(self.labels, safe), tf.cast(mask, tf.float32)

    # One example at a time.
    def _source(self, index: tf.Tensor, raw: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(encoded image, label) of a file or TFRecord example. A failed decode is named
        afterwards (trainer.data.diagnose), so nothing here carries the file's name."""
        if raw is not None:
            encoded, _, label = parse_record(raw)
            return encoded, checked_label(label, index, self.num_classes)
        return tf.io.read_file(tf.gather(self.paths, index)), tf.gather(self.labels, index)

    def _train_example(self, epoch, index, raw=None):
        spec = self.spec
        draws = random_resized_draws(index[None], epoch, spec)[0] if self.random_resized else None
        if self.in_memory:
            image, label = self.images[index], self.labels[index]
            if self.random_resized:
                image = random_resized_crop(image, self.size, draws, spec.crop_min_area)
        else:
            encoded, label = self._source(index, raw)
            if self.random_resized:  # a JPEG decodes only the crop
                image = decode_random_resized(encoded, self.size, draws, spec.crop_min_area)
            else:
                image = resize(decode(encoded), self.size)
        return epoch, index, image, label

    def _finish_train(self, epochs, indices, images, labels):
        if not self.spec.augment:
            return images, labels
        if self.random_resized:
            draws = random_resized_draws(indices, epochs[0], self.spec)
            return flipped(images, flips(indices, epochs[0], self.spec, draws[:, 4])), labels
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
        encoded, label = self._source(index, raw)
        return decode_view(encoded, self.size, self.spec.crop), label

    def _finish_eval(self, images, labels, mask):
        return images, labels, mask
