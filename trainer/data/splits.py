"""What a dataset is, whatever it came from: its splits, their three kinds, their names.

- `Split`: decoded uint8 pixels in memory (CIFAR-10's pickles, the synthetic set, any
  cached dataset): the pipeline gathers batches from an array.
- `FileSplit`: image files listed, not decoded, at start (each is read and decoded inside
  tf.data when a batch needs it), so a folder of any size costs a file name per image.
- `RecordSplit`: TFRecord shards, read as a stream (no random access).

The input pipeline dispatches on these types (`isinstance`), never on their attributes;
every other module of trainer.data imports them from here, so this module imports none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from trainer.errors import DataError


def path_bytes(path: str) -> bytes:
    """A listed path as the file system's own bytes. A name that is not UTF-8 (Latin-1
    `caf\\xe9.jpg` from an old share) is listed with surrogate escapes, as Python's os does;
    this turns it back into the bytes that open that very file (TensorFlow takes bytes)."""
    return path.encode("utf-8", "surrogateescape")


def shown(path: str) -> str:
    """A path fit for a message: as it is, or its bytes' repr if it is not UTF-8 (printing
    surrogate escapes would fail, or show a replacement character the user cannot type)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(path_bytes(path))[1:]
    return path


@dataclass
class Split:
    """One split in memory: images uint8 [N, H, W, C] and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def limited(self, limit: int) -> Split:
        return self if not limit or limit >= len(self) else Split(self.images[:limit], self.labels[:limit])

    def subset(self, keep: np.ndarray) -> Split:
        return Split(self.images[keep], self.labels[keep])


@dataclass
class FileSplit:
    """One split as files: example i is `folders[labels[i]]/names[i]`.

    Names are kept relative to their class folder: a 500,000-file dataset holds 500,000
    short names and one folder per class, not 500,000 full paths.
    """

    folders: list[str]
    names: list[str]
    labels: np.ndarray
    # Every file decoded when data.on_bad_image=skip checked them (a file that fails later
    # went bad since: the advice differs).
    checked: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def round_robin(cls, folders: list[str], files: list[list[str]]) -> FileSplit:
        """Interleave the classes' sorted files: any prefix of this order is class-balanced."""
        names, labels = [], []
        for i in range(max(len(f) for f in files)):
            for label, class_files in enumerate(files):
                if i < len(class_files):
                    names.append(class_files[i])
                    labels.append(label)
        return cls(folders, names, np.asarray(labels, np.int32))

    def path(self, index: int) -> str:
        return f"{self.folders[self.labels[index]]}/{self.names[index]}"

    def limited(self, limit: int) -> FileSplit:
        if not limit or limit >= len(self):
            return self
        return replace(self, names=self.names[:limit], labels=self.labels[:limit])

    def subset(self, keep: np.ndarray) -> FileSplit:
        return replace(self, names=[self.names[i] for i in keep], labels=self.labels[keep])

    def paths(self) -> tf.Tensor:
        """The full paths as one string tensor: folder of the label + "/" + name, as the
        file system's bytes (path_bytes), so a name that is not UTF-8 is read too."""
        folders = tf.constant([path_bytes(folder) for folder in self.folders], tf.string)
        names = tf.constant([path_bytes(name) for name in self.names], tf.string)
        return tf.strings.join([tf.gather(folders, self.labels), names], separator="/")


@dataclass
class RecordSplit:
    """One split as TFRecord shards; record i is the i-th in shard order, file order."""

    shards: list[str]
    counts: list[int]
    # Ordinals left out (data.on_bad_image=skip), sorted: filtered from the raw stream.
    skipped: tuple[int, ...] = ()
    # labels.txt's length: every label read is checked against it (0: not checked).
    num_classes: int = 0
    # Each shard's (smallest, largest) label, when a counting pass read them.
    label_ranges: list[tuple[int, int]] | None = None
    # Every record kept decoded when data.on_bad_image=skip checked them.
    checked: bool = False

    def __len__(self) -> int:
        return sum(self.counts) - len(self.skipped)

    @property
    def folder(self) -> str:
        return self.shards[0].rsplit("/", 1)[0]

    def limited(self, limit: int) -> RecordSplit:
        """The first `limit` records (whole shards, then part of one)."""
        if not limit or limit >= len(self):
            return self
        if self.skipped:
            raise DataError("data.train_examples/test_examples cannot be combined with skipped TFRecord images")
        shards, counts, left = [], [], limit
        for shard, count in zip(self.shards, self.counts):
            if left == 0:
                break
            shards.append(shard)
            counts.append(min(count, left))
            left -= counts[-1]
        return replace(self, shards=shards, counts=counts, label_ranges=None)

    def raw_records(self) -> tf.data.Dataset:
        """(ordinal, raw record) of every record in canonical order (shards, then file order)."""
        per_shard = [tf.data.TFRecordDataset(shard).take(count) for shard, count in zip(self.shards, self.counts)]
        stream = per_shard[0]
        for more in per_shard[1:]:
            stream = stream.concatenate(more)
        return self.without_skipped(stream.enumerate())

    def without_skipped(self, records: tf.data.Dataset) -> tf.data.Dataset:
        if not self.skipped:
            return records
        skipped = tf.constant(self.skipped, tf.int64)

        def kept(ordinal: tf.Tensor, _raw: tf.Tensor) -> tf.Tensor:
            position = tf.searchsorted(skipped, ordinal[None])[0]
            return tf.logical_not(
                tf.reduce_any(tf.equal(tf.gather(skipped, tf.minimum(position, len(self.skipped) - 1)), ordinal))
            )

        return records.filter(kept)

    def place(self, ordinal: int) -> str:
        """Where record `ordinal` is: "record 5 of DIR/train-00001-of-00004.tfrecord"."""
        ends = np.cumsum(self.counts)
        shard = min(int(np.searchsorted(ends, ordinal, side="right")), len(self.shards) - 1)
        return f"record {ordinal - int(ends[shard] - self.counts[shard])} of {self.shards[shard]}"


# What a split can be; the pipeline, preparation and diagnosis dispatch on the type.
Examples = Split | FileSplit | RecordSplit


@dataclass
class Dataset:
    train: Examples
    test: Examples
    class_names: list[str]
    origin: str  # where the data came from, for the console and the logs
    # The training resolution when the images are not in memory yet (files, records).
    image_size: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if isinstance(self.train, Split):
            return tuple(self.train.images.shape[1:])  # type: ignore[return-value]
        return (self.image_size, self.image_size, 3)
