"""TFRecord shards: the Model Garden / TFDS image layout, read as a stream, written by
`launch data convert`.

Layout: DIR/train-00000-of-00008.tfrecord ... and DIR/test-*.tfrecord (or validation-*),
each record a tf.train.Example with `image/encoded` (the file's bytes, any format
tf.io.decode_image reads) and `image/class/label` (int64, from 0), optionally
`image/filename`; class names one per line in DIR/labels.txt. Our converter also writes
DIR/shards.json (records per shard), which spares a counting pass at start.

A record has no random access, so a streamed epoch's order is built from what can be
skipped without decoding: the shards in an order drawn per (seed, epoch), read a few at a
time in turn, then shuffled in blocks of `SHUFFLE_BLOCK` records by a keyed permutation.
All of it is a pure function of (seed, epoch), so a resumed run skips the raw records
already trained on (no decoding) and continues with the same batches. Every worker reads
the same raw stream and decodes only its replicas' share of each global batch.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.config import DataConfig
from trainer.data.decode import decode
from trainer.data.pipeline import InputSpec, _stream_seed, replica_slices, steps_per_epoch
from trainer.data.sources import Dataset, FileSplit, Progress
from trainer.errors import DataError
from trainer.files import write_json, write_text

LABELS_FILE = "labels.txt"
INDEX_FILE = "shards.json"
IMAGE_KEY, LABEL_KEY, FILENAME_KEY = "image/encoded", "image/class/label", "image/filename"
SHUFFLE_BLOCK = 4096  # records permuted together in a streamed epoch
_INTERLEAVE = 8  # shards read at a time, in turn
_SHARD_ORDER_STREAM, _BLOCK_STREAM = 5, 6
_SPLIT_PREFIXES = {"train": ("train",), "test": ("test", "validation", "val")}


@dataclass
class RecordSplit:
    """One split as TFRecord shards; record i is the i-th in shard order, file order."""

    shards: list[str]
    counts: list[int]
    # Ordinals left out (data.on_bad_image=skip), sorted: filtered from the raw stream.
    skipped: tuple[int, ...] = ()

    def __len__(self) -> int:
        return sum(self.counts) - len(self.skipped)

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
        return RecordSplit(shards, counts)

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


def parse_record(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(encoded image, its file name or "a record", int32 label) of one tf.train.Example."""
    features = tf.io.parse_single_example(
        raw,
        {
            IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
            FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value="a record"),
        },
    )
    return features[IMAGE_KEY], features[FILENAME_KEY], tf.cast(features[LABEL_KEY], tf.int32)


def decode_record(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 image [H, W, 3], int32 label) of one serialized tf.train.Example."""
    encoded, name, label = parse_record(raw)
    return decode(encoded, name), label


# --- reading ---------------------------------------------------------------------------------


def read_record_dataset(config: DataConfig) -> Dataset:
    """The shards and class names under data.path (any tf.io.gfile location)."""
    root = config.path.rstrip("/")
    labels_path = f"{root}/{LABELS_FILE}"
    if not tf.io.gfile.exists(labels_path):
        raise DataError(
            f"{labels_path} is missing: a TFRecord folder needs the class names, one per line "
            "(launch data convert writes it)"
        )
    with tf.io.gfile.GFile(labels_path) as handle:
        class_names = [line.strip() for line in handle.read().splitlines() if line.strip()]
    index = _read_index(root)
    train, test = (_split_shards(root, name, index) for name in ("train", "test"))
    dataset = Dataset(
        train.limited(config.train_examples),
        test.limited(config.test_examples),
        class_names,
        f"TFRecord shards {root}",
        image_size=config.image_size or int(index.get("image_size", 0)),
    )
    if not dataset.image_size:
        raise DataError(f"set data.image_size for the TFRecord shards in {root} (their {INDEX_FILE} names no size)")
    return dataset


def _read_index(root: str) -> dict:
    path = f"{root}/{INDEX_FILE}"
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path) as handle:
            return json.loads(handle.read())
    except (ValueError, tf.errors.OpError):
        return {}  # damaged: the shards are counted instead


def _split_shards(root: str, split: str, index: dict) -> RecordSplit:
    shards = sorted(
        path
        for prefix in _SPLIT_PREFIXES[split]
        for path in tf.io.gfile.glob(f"{root}/{prefix}-*")
        if ".tfrecord" in path.rsplit("/", 1)[-1]
    )
    if not shards:
        raise DataError(f"no {split} shards in {root} (expected {root}/{_SPLIT_PREFIXES[split][0]}-*.tfrecord)")
    known = dict(zip(index.get(split, {}).get("shards", []), index.get(split, {}).get("counts", [])))
    counts = [known.get(path.rsplit("/", 1)[-1]) for path in shards]
    if None in counts:
        counts = [int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)) for path in shards]
    return RecordSplit(shards, [int(count) for count in counts])


# --- the streamed pipeline ------------------------------------------------------------------


def _epoch_records(split: RecordSplit, seed: int, epoch: tf.Tensor, keep: int) -> tf.data.Dataset:
    """(ordinal, raw record) of one epoch, in the epoch's order, its first `keep` records."""
    offsets = np.concatenate([[0], np.cumsum(split.counts)[:-1]]).astype(np.int64)
    shards, counts = tf.constant(split.shards), tf.constant(split.counts, tf.int64)
    order = tf.random.experimental.index_shuffle(
        tf.range(len(split.shards), dtype=tf.int64),
        _stream_seed(seed, _SHARD_ORDER_STREAM, epoch),
        tf.constant(len(split.shards) - 1, tf.int64),
    )

    def shard_records(shard: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(shards[shard]).take(counts[shard])
        return records.enumerate(tf.constant(offsets)[shard])

    stream = tf.data.Dataset.from_tensor_slices(order).interleave(
        shard_records, cycle_length=_INTERLEAVE, block_length=1
    )

    def permute_block(block: tf.Tensor, ordinals: tf.Tensor, raws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.shape(ordinals, out_type=tf.int64)[0]
        seed_pair = _stream_seed(seed, _BLOCK_STREAM, epoch * 1_000_003 + block)
        permutation = tf.random.experimental.index_shuffle(tf.range(size), seed_pair, size - 1)
        return tf.gather(ordinals, permutation), tf.gather(raws, permutation)

    return (
        split.without_skipped(stream)
        .batch(SHUFFLE_BLOCK)
        .enumerate()
        .map(lambda block, pair: permute_block(block, *pair))
        .unbatch()
        .take(keep)
    )


def record_train_dataset_fn(split: RecordSplit, spec: InputSpec, start_step: int, total_steps: int):
    """Global steps [start, total) from TFRecord shards; a resume skips raw records only."""
    from trainer.data.pipeline import ExampleLoader

    per_epoch = steps_per_epoch(len(split), spec.global_batch)
    keep = per_epoch * spec.global_batch
    start_epoch, start_in_epoch = divmod(start_step, per_epoch)
    end_epoch = -(-total_steps // per_epoch)
    loader = ExampleLoader(split, spec)

    def epoch_steps(epoch: tf.Tensor, skip_steps) -> tf.data.Dataset:
        records = _epoch_records(split, spec.seed, epoch, keep).skip(skip_steps * spec.global_batch)
        return records.batch(spec.global_batch, drop_remainder=True).map(lambda ordinals, raws: (epoch, ordinals, raws))

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        first = epoch_steps(tf.constant(start_epoch, tf.int64), start_in_epoch)
        later = tf.data.Dataset.range(start_epoch + 1, end_epoch).flat_map(lambda epoch: epoch_steps(epoch, 0))
        steps = first.concatenate(later).take(total_steps - start_step)
        return loader.batches(replica_slices(steps, context, spec.global_batch), training=True)

    return dataset_fn


def record_eval_dataset_fn(split: RecordSplit, spec: InputSpec):
    """Every record once, in canonical order, padded and masked like the in-memory one."""
    from trainer.data.pipeline import ExampleLoader

    loader, global_batch = ExampleLoader(split, spec), spec.global_batch

    def pad(ordinals: tf.Tensor, raws: tf.Tensor):
        padding = global_batch - tf.shape(ordinals)[0]
        return (
            tf.constant(0, tf.int64),
            tf.pad(ordinals, [[0, padding]], constant_values=-1),
            tf.pad(raws, [[0, padding]], constant_values=""),
        )

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batches = split.raw_records().batch(global_batch).map(pad)
        return loader.batches(replica_slices(batches, context, global_batch), training=False)

    return dataset_fn


def record_first_slices(split: RecordSplit, count: int) -> tf.data.Dataset:
    """One slice of the first `count` records, as pipeline.first_views needs it."""
    count = min(count, len(split))
    ordinals, raws = next(iter(split.raw_records().batch(count)))
    return tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), ordinals, raws))


def decode_all_records(split: RecordSplit, size: int, crop: str) -> tuple[np.ndarray, np.ndarray]:
    """Every record decoded in parallel (canonical order): uint8 [N, size, size, 3], labels."""
    from trainer.data.decode import decode_view

    def view(_ordinal, raw):
        encoded, name, label = parse_record(raw)
        return decode_view(encoded, name, size, crop), label

    images, labels = np.empty((len(split), size, size, 3), np.uint8), np.empty(len(split), np.int32)
    start = 0
    views = split.raw_records().map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for batch_images, batch_labels in views.batch(256).prefetch(2).as_numpy_iterator():
        images[start : start + len(batch_labels)], labels[start : start + len(batch_labels)] = (
            batch_images,
            batch_labels,
        )
        start += len(batch_labels)
    return images, labels


def unreadable_records(split: RecordSplit) -> list[int]:
    """Ordinals of the records whose image does not decode (one parallel pass)."""
    checked = split.raw_records().map(
        lambda ordinal, raw: (ordinal, tf.shape(decode_record(raw)[0])[0]), num_parallel_calls=tf.data.AUTOTUNE
    )
    readable = {int(ordinal) for ordinal, _ in checked.ignore_errors().as_numpy_iterator()}
    return [ordinal for ordinal in range(sum(split.counts)) if ordinal not in readable]


# --- writing: launch data convert -----------------------------------------------------------


def convert(
    source: str,
    out: str,
    shard_size_mb: float = 100.0,
    validation_split: float = 0.0,
    seed: int = 0,
    progress: Progress = print,
) -> dict:
    """`launch data convert`: an image folder (train/ + test/, or one <class>/ tree split by
    `validation_split`) to TFRecord shards in a new folder `out` (local or gs://...)."""
    from trainer.data.prepare import own_size
    from trainer.data.sources import read_image_folder

    out = out.rstrip("/")
    if tf.io.gfile.exists(out) and tf.io.gfile.listdir(out):
        raise DataError(f"--to {out} exists and is not empty; choose a new folder (nothing was written)")
    config = DataConfig(source="folder", path=source, validation_split=validation_split)
    dataset = read_image_folder(source, config, seed, progress)
    try:
        dataset.image_size = own_size(dataset.train)
    except DataError:
        dataset.image_size = 0  # mixed sizes: training needs data.image_size, and says so
    progress(f"Converting {len(dataset.train)} train / {len(dataset.test)} test images from {source} to {out}")
    return convert_folder(dataset, out, shard_size_mb, progress=progress)


def convert_folder(
    dataset: Dataset, out: str, shard_size_mb: float = 100.0, image_size: int = 0, progress: Progress = print
) -> dict:
    """Write a listed image folder (train and test FileSplits) as TFRecord shards in `out`.

    The files' bytes are stored as they are (no re-encoding: lossless and fast); files are
    read by a thread pool. Shards hold about `shard_size_mb` each.
    """
    if not isinstance(dataset.train, FileSplit):
        raise DataError("launch data convert reads image folders (data.source=folder or a CIFAR-10 image folder)")
    out = out.rstrip("/")
    tf.io.gfile.makedirs(out)
    index: dict = {"image_size": image_size or dataset.image_size}
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        shards, counts = _write_split(split, out, name, shard_size_mb, progress)
        index[name] = {"shards": shards, "counts": counts}
    write_text(f"{out}/{LABELS_FILE}", "\n".join(dataset.class_names) + "\n")
    write_json(f"{out}/{INDEX_FILE}", index)
    return index


def _example(data: bytes, label: int, filename: str) -> bytes:
    feature = {
        IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        FILENAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_split(split: FileSplit, out: str, name: str, shard_size_mb: float, progress: Progress):
    """Records in the split's (class round-robin) order, cut into shards of ~shard_size_mb."""

    def read(index: int) -> bytes:
        path = split.path(index)
        with tf.io.gfile.GFile(path, "rb") as handle:
            return _example(handle.read(), split.labels[index], path)

    temp_names, counts, writer, size, tick = [], [], None, 0.0, time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for done, record in enumerate(pool.map(read, range(len(split)), chunksize=64), start=1):
            if writer is None or size >= shard_size_mb * 2**20:
                writer = _next_shard(writer, out, name, temp_names, counts)
                size = 0.0
            writer.write(record)
            size += len(record)
            counts[-1] += 1
            if done % 10_000 == 0 or done == len(split):
                rate = done / max(time.perf_counter() - tick, 1e-9)
                progress(f"  {name}: {done}/{len(split)} images ({rate:.0f}/s)")
    writer.close()
    return _final_names(out, name, temp_names), counts


def _next_shard(writer, out: str, name: str, temp_names: list[str], counts: list[int]):
    if writer is not None:
        writer.close()
    temp_names.append(f"{out}/.{name}-{len(temp_names):05d}.tfrecord.tmp")
    counts.append(0)
    return tf.io.TFRecordWriter(temp_names[-1])


def _final_names(out: str, name: str, temp_names: list[str]) -> list[str]:
    """train-00000-of-00004.tfrecord ...: renamed once all are written (never half a set)."""
    finals = [f"{name}-{i:05d}-of-{len(temp_names):05d}.tfrecord" for i in range(len(temp_names))]
    for temp, final in zip(temp_names, finals):
        tf.io.gfile.rename(temp, f"{out}/{final}", overwrite=True)
    return finals
