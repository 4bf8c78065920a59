"""The TFRecord format: the Model Garden / TFDS image layout, one record at a time.

Layout: DIR/train-00000-of-00008.tfrecord ... and DIR/test-*.tfrecord (or validation-*),
each record a tf.train.Example with `image/encoded` (the file's bytes, any format
tf.io.decode_image reads) and `image/class/label` (int64, from 0), optionally
`image/filename`; class names one per line in DIR/labels.txt. Our converter also writes
DIR/shards.json (records per shard), which spares a counting pass at start.

Reading the shards is trainer.data.sources.tfrecord, streaming them in a seeded order is
trainer.data.plan, writing them is trainer.data.convert; this module is what all three
agree on: the names of the files and of the features, and how one record is parsed.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.data.splits import RecordSplit
from trainer.errors import DataError

LABELS_FILE = "labels.txt"
INDEX_FILE = "shards.json"
IMAGE_KEY, LABEL_KEY, FILENAME_KEY = "image/encoded", "image/class/label", "image/filename"
SPLIT_PREFIXES = {"train": ("train",), "test": ("test", "validation", "val")}
# What the per-record label assertion says. The error path does not parse it (it reads the
# failed records' labels again and names the shard); it is for anyone reading the raw error.
LABEL_RANGE_MESSAGE = "TFRecord label outside labels.txt"


_FEATURES = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value="a record"),
}


def parse_record(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(encoded image, its file name or "a record", int32 label) of one tf.train.Example."""
    features = tf.io.parse_single_example(raw, _FEATURES)
    return features[IMAGE_KEY], features[FILENAME_KEY], tf.cast(features[LABEL_KEY], tf.int32)


def parse_records(raws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(encoded images, int32 labels) of a batch of tf.train.Examples, in one op."""
    features = tf.io.parse_example(raws, {key: _FEATURES[key] for key in (IMAGE_KEY, LABEL_KEY)})
    return features[IMAGE_KEY], tf.cast(features[LABEL_KEY], tf.int32)


def label_of(raw: tf.Tensor) -> tf.Tensor:
    """The int64 label of a record without parsing its image (-1 if it has none)."""
    features = tf.io.parse_single_example(raw, {LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)})
    return features[LABEL_KEY]


def checked_labels(labels: tf.Tensor, ordinals: tf.Tensor, num_classes: int) -> tf.Tensor:
    """`labels`, asserted to be in [0, num_classes): a label past labels.txt would index no
    class (training on it silently, then failing at evaluation). Two compares a batch."""
    if not num_classes:
        return labels
    valid = tf.reduce_all((labels >= 0) & (labels < num_classes))
    with tf.control_dependencies([tf.debugging.Assert(valid, [LABEL_RANGE_MESSAGE, ordinals, labels])]):
        return tf.identity(labels)


def example(data: bytes, label: int, filename: bytes) -> bytes:
    """One image file's bytes as a serialized tf.train.Example (what `data convert` writes)."""
    feature = {
        IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        FILENAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def label_error(split: RecordSplit, where: str, label: int, num_classes: int) -> DataError:
    if label < 0:
        return DataError(
            f"{where} has a record without a label (or a negative one, {label}); every record needs "
            f"{LABEL_KEY} in [0, {num_classes})"
        )
    return DataError(
        f"{where} has label {label}, but {split.folder}/{LABELS_FILE} lists {num_classes} class(es) (labels count "
        "from 0): add the missing class names, one per line in label order, or use the labels.txt these shards "
        "came with"
    )


def padding_record() -> bytes:
    """A record that parses (no image bytes, label 0): what stands in for an evaluation
    batch's padding before a batch of records is parsed; its image is never decoded."""
    return example(b"", 0, b"")
