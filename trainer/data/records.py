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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.config import DataConfig
from trainer.data.decode import decode, image_problem, native_stderr_quiet, tf_reason
from trainer.data.pipeline import InputSpec, _stream_seed, replica_slices, steps_per_epoch
from trainer.data.sources import CONVERT_SPELLING, Dataset, FileSplit, Progress, path_bytes, shown
from trainer.errors import DataError, StoreUnreachableError
from trainer.files import short, write_json, write_text
from trainer.preemption import signals_interrupt
from trainer.storage import is_url

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
    # labels.txt's length: every label read is checked against it (0: not checked).
    num_classes: int = 0
    # Each shard's (smallest, largest) label, when a counting pass read them.
    label_ranges: list[tuple[int, int]] | None = None

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


# What the per-record label assertion says. The error path does not parse it (it reads the
# failed records' labels again and names the shard); it is for anyone reading the raw error.
LABEL_RANGE_MESSAGE = "TFRecord label outside labels.txt"


def checked_label(label: tf.Tensor, ordinal: tf.Tensor, num_classes: int) -> tf.Tensor:
    """`label`, asserted to be in [0, num_classes): a label past labels.txt would index no
    class (training on it silently, then failing at evaluation). Two scalar compares a record."""
    if not num_classes:
        return label
    valid = tf.logical_and(label >= 0, label < num_classes)
    with tf.control_dependencies([tf.debugging.Assert(valid, [LABEL_RANGE_MESSAGE, ordinal, label])]):
        return tf.identity(label)


# --- reading ---------------------------------------------------------------------------------


def read_record_dataset(config: DataConfig, progress: Progress | None = None) -> Dataset:
    """The shards and class names under data.path (any tf.io.gfile location).

    Every label is checked against labels.txt before the first step: when the shards are
    counted (no usable shards.json) the same pass reads the labels; a shards.json of ours
    records how many classes it was written with. Any label met later is checked too, per
    record, so a wrong one stops the run at its first batch, not at an evaluation."""
    root = config.path.rstrip("/")
    say = progress or (lambda _line: None)
    class_names = _read_class_names(root)
    index = _read_index(root, say)
    train, test = (_split_shards(root, name, index, say) for name in ("train", "test"))
    _check_class_count(root, index, class_names)
    for split in (train, test):
        check_label_range(split, len(class_names))
    train, test = (replace(split, num_classes=len(class_names)) for split in (train, test))
    dataset = Dataset(
        train.limited(config.train_examples),
        test.limited(config.test_examples),
        class_names,
        f"TFRecord shards {root}",
        image_size=config.image_size or int(index.get("image_size", 0)) or _own_size(train),
    )
    if not dataset.image_size:
        raise DataError(
            f"set data.image_size for the TFRecord shards in {root} (their {INDEX_FILE} names no size, and their "
            "first images are not all one square size), e.g. --set data.image_size=224"
        )
    return dataset


def _own_size(split: RecordSplit, sample: int = 16) -> int:
    """The images' shared square size from the headers of the first records (as a folder's
    own size is found), or 0: what a missing or damaged shards.json no longer says."""
    from trainer.data.decode import header_size

    sizes = set()
    with native_stderr_quiet():
        for _, raw in split.raw_records().take(sample).as_numpy_iterator():
            try:
                sizes.add(tuple(int(value) for value in header_size(parse_record(tf.constant(raw))[0])))
            except tf.errors.OpError:
                continue  # a bad record: decoding names it later
    (height, width), *others = sizes or {(0, 1)}
    return height if not others and height == width else 0


def _read_class_names(root: str) -> list[str]:
    labels_path = f"{root}/{LABELS_FILE}"
    # Through trainer.storage, the first read of data.path: an unreachable store or an
    # unknown scheme is one line here, before anything else is read or written.
    if not storage.exists(labels_path):
        raise DataError(
            f"{labels_path} is missing: a TFRecord folder needs the class names, one per line "
            "(launch data convert writes it)"
        )
    _refuse_special(labels_path)
    try:
        text = storage.read_text(labels_path)
    except UnicodeDecodeError as err:
        raise DataError(f"{labels_path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{labels_path} names no class; it needs the class names, one per line, in label order")
    return names


def _refuse_special(path: str) -> None:
    """A pipe or a device named like a shard or labels.txt: reading it would wait forever."""
    kind = storage.special_kind(path)
    if kind:
        raise DataError(f"{path} is {kind}, not a regular file; replace it with the file it stands for")


def _read_index(root: str, say: Progress) -> dict:
    """shards.json, checked: a damaged one (cut short, edited, another tool's) is said and
    left out, and the shards are counted instead; a valid one spares that pass."""
    path = f"{root}/{INDEX_FILE}"
    if not storage.exists(path):
        return {}
    try:
        index = json.loads(storage.read_text(path))
    except StoreUnreachableError:
        raise  # no answer is no damage: counting the shards would meet the same store
    except (ValueError, RecursionError, OSError) as err:
        say(f"Warning: {path} is damaged ({type(err).__name__}); counting the records of the shards instead")
        return {}
    if not isinstance(index, dict):
        say(f"Warning: {path} is damaged (a {type(index).__name__}, not an object); counting the records instead")
        return {}
    size = index.get("image_size", 0)
    if not _whole(size) or size > 2**16:
        say(f"Warning: {path} has a damaged image_size ({size!r}); reading the size from the first images instead")
        index = {key: value for key, value in index.items() if key != "image_size"}
    return index


def _whole(value) -> bool:
    """A JSON integer >= 0 (not a bool, float or string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _split_shards(root: str, split: str, index: dict, say: Progress) -> RecordSplit:
    shards = sorted(
        path
        for prefix in _SPLIT_PREFIXES[split]
        for path in storage.glob(f"{root}/{prefix}-*")
        if ".tfrecord" in path.rsplit("/", 1)[-1]
    )
    if not shards:
        raise DataError(f"no {split} shards in {root} (expected {root}/{_SPLIT_PREFIXES[split][0]}-*.tfrecord)")
    for shard in shards:
        _refuse_special(shard)
    counts, why = _indexed_counts(index, split, shards)
    if counts is not None:
        return RecordSplit(shards, counts)
    if why:
        say(f"Warning: {root}/{INDEX_FILE} {why}; counting the {split} records instead")
    counted = _count_shards(shards)
    return RecordSplit(
        shards, [count for count, _, _ in counted], label_ranges=[(low, high) for _, low, high in counted]
    )


def _indexed_counts(index: dict, split: str, shards: list[str]) -> tuple[list[int] | None, str]:
    """The shards' record counts from shards.json, or (None, why not) when it is absent ("")
    or does not match the shards (another set of files, a count edited or cut)."""
    if not index:
        return None, ""
    entry = index.get(split)
    if not isinstance(entry, dict):
        return None, f"has no valid {split!r} entry"
    names, counts, sizes = entry.get("shards"), entry.get("counts"), entry.get("bytes")
    if not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts):
        return None, f"has a damaged {split!r} entry"
    if not all(isinstance(name, str) for name in names) or not all(_whole(count) for count in counts):
        return None, f"has a damaged {split!r} entry"
    known = dict(zip(names, counts))
    found = [known.get(path.rsplit("/", 1)[-1]) for path in shards]
    if None in found or len(set(names)) != len(shards):
        return None, f"lists other {split} shards than the folder holds"
    if isinstance(sizes, list) and len(sizes) == len(names):
        expected = dict(zip(names, sizes))
        actual = _sizes(shards)
        changed = [path for path, size in zip(shards, actual) if expected[path.rsplit("/", 1)[-1]] != size]
        if changed:
            return None, f"does not match {changed[0]} (its size changed since shards.json was written)"
    return found, ""


def _sizes(paths: list[str]) -> list[int]:
    """Byte sizes of files (a stat each, in parallel: each is a request on an object store)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(storage.size, paths))


def _label_of(raw: tf.Tensor) -> tf.Tensor:
    features = tf.io.parse_single_example(raw, {LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)})
    return features[LABEL_KEY]


def _count_shard(path: str) -> tuple[int, int, int]:
    """(records, smallest label, largest label) of one shard, in one pass that decodes nothing."""
    start = (np.int64(0), np.int64(2**62), np.int64(-(2**62)))
    try:
        count, low, high = (
            tf.data.TFRecordDataset(path)
            .map(_label_of)
            .reduce(
                start, lambda state, label: (state[0] + 1, tf.minimum(state[1], label), tf.maximum(state[2], label))
            )
        )
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        raise DataError(
            f"TFRecord shard {path} is damaged ({tf_reason(err.message)}); copy or write it again"
        ) from None
    except tf.errors.OpError as err:  # no network mid-count: one line, as at the first read
        unreachable = storage.unreachable(err, path)
        if unreachable is None:
            raise
        raise unreachable from None
    return int(count), int(low), int(high)


def _count_shards(shards: list[str]) -> list[tuple[int, int, int]]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(_count_shard, shards))


def _labels_path(split: RecordSplit) -> str:
    return f"{split.shards[0].rsplit('/', 1)[0]}/{LABELS_FILE}"


def _check_class_count(root: str, index: dict, class_names: list[str]) -> None:
    """shards.json of ours says how many classes the shards were written with: a labels.txt
    that lost some (edited, or a class name it cannot hold) is refused before any step."""
    classes = index.get("classes")
    if _whole(classes) and classes > len(class_names):
        raise DataError(
            f"{root}/{LABELS_FILE} lists {len(class_names)} class(es), but these shards were written with {classes} "
            f"(their {INDEX_FILE}); restore the missing class names, one per line in label order"
        )


def check_label_range(split: RecordSplit, num_classes: int) -> None:
    """Refuse a shard whose labels (read while counting it) are not in [0, num_classes)."""
    for shard, (low, high) in zip(split.shards, split.label_ranges or []):
        if low < 0 or high >= num_classes:
            raise label_error(split, shard, low if low < 0 else high, num_classes)


def label_error(split: RecordSplit, where: str, label: int, num_classes: int) -> DataError:
    if label < 0:
        return DataError(
            f"{where} has a record without a label (or a negative one, {label}); every record needs "
            f"{LABEL_KEY} in [0, {num_classes})"
        )
    return DataError(
        f"{where} has label {label}, but {_labels_path(split)} lists {num_classes} class(es) (labels count from 0): "
        "add the missing class names, one per line in label order, or use the labels.txt these shards came with"
    )


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
    """Every record decoded in parallel (canonical order): uint8 [N, size, size, 3], labels.

    N is the records the shards hold: fewer than `len(split)` when shards.json promised
    more (the caller says so). A record that does not decode, or whose label is past
    labels.txt, is one DataError naming it."""
    from trainer.data.decode import decode_view

    def view(ordinal, raw):
        encoded, name, label = parse_record(raw)
        return decode_view(encoded, name, size, crop), label, ordinal

    images, labels = np.empty((len(split), size, size, 3), np.uint8), np.empty(len(split), np.int32)
    ordinals = np.empty(len(split), np.int64)
    start = 0
    views = split.raw_records().map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        for batch_images, batch_labels, batch_ordinals in views.batch(256).prefetch(2).as_numpy_iterator():
            end = start + len(batch_labels)
            images[start:end], labels[start:end], ordinals[start:end] = batch_images, batch_labels, batch_ordinals
            start = end
    except tf.errors.OpError:
        raise bad_record_error(split, split.raw_records().skip(start).take(1024)) from None
    wrong = _label_problem(split, labels[:start], ordinals[:start])
    if wrong:
        raise wrong
    return images[:start], labels[:start]


def _label_problem(split: RecordSplit, labels: np.ndarray, ordinals: np.ndarray) -> DataError | None:
    """The first of these labels outside [0, labels.txt's length), as a DataError."""
    if not split.num_classes or not len(labels):
        return None
    wrong = np.flatnonzero((labels < 0) | (labels >= split.num_classes))
    if not len(wrong):
        return None
    first = wrong[0]
    return label_error(split, _place(split, int(ordinals[first])), int(labels[first]), split.num_classes)


def _place(split: RecordSplit, ordinal: int) -> str:
    """Where record `ordinal` is: "record 5 of DIR/train-00001-of-00004.tfrecord"."""
    ends = np.cumsum(split.counts)
    shard = min(int(np.searchsorted(ends, ordinal, side="right")), len(split.shards) - 1)
    return f"record {ordinal - int(ends[shard] - split.counts[shard])} of {split.shards[shard]}"


def unreadable_records(split: RecordSplit) -> list[int]:
    """Ordinals of the records whose image does not decode (one parallel pass)."""
    checked = split.raw_records().map(
        lambda ordinal, raw: (ordinal, tf.shape(decode_record(raw)[0])[0]), num_parallel_calls=tf.data.AUTOTUNE
    )
    with native_stderr_quiet():  # libjpeg's own complaint about each bad image
        readable = {int(ordinal) for ordinal, _ in checked.ignore_errors().as_numpy_iterator()}
    return [ordinal for ordinal in range(sum(split.counts)) if ordinal not in readable]


def skip_unreadable_records(split: RecordSplit, name: str, say: Progress) -> RecordSplit:
    """data.on_bad_image=skip for shards: leave out the records that do not decode, and say which."""
    bad = unreadable_records(split)
    if not bad:
        return split
    if len(bad) == sum(split.counts):
        first = next(split.raw_records().take(1).as_numpy_iterator())
        raise DataError(
            f"none of the {len(bad)} {name} records holds a decodable image, so there is nothing to "
            f"{'train on' if name == 'train' else 'evaluate'} (first: {_undecodable(split, *first)})"
        )
    places = "; ".join(_place(split, ordinal) for ordinal in bad[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    )
    say(f"Warning: skipping {len(bad)} unreadable {name} record(s) (data.on_bad_image=skip): {places}")
    return replace(split, skipped=tuple(bad))


def bad_record_error(split: RecordSplit, records: tf.data.Dataset) -> DataError:
    """Why `records` ((ordinal, raw) pairs) failed, as one line (see find_bad_record)."""
    return find_bad_record(split, records) or DataError(
        f"the input pipeline failed on the TFRecord shards in {split.shards[0].rsplit('/', 1)[0]}, "
        "but every record checked decodes (a passing read failure?); run again"
    )


def find_bad_record(split: RecordSplit, records: tf.data.Dataset) -> DataError | None:
    """The first of `records` ((ordinal, raw) pairs) with an image that does not decode or
    a label past labels.txt, as one line naming its shard and place in it; None if none.

    Two passes over these records only (the error path): one decodes in parallel and
    keeps what decodes, one finds the first that did not."""

    def check(ordinal, raw):
        image, label = decode_record(raw)
        return ordinal, label, tf.shape(image)[0]

    decoded = records.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    with native_stderr_quiet():
        good = {int(ordinal): int(label) for ordinal, label, _ in decoded.as_numpy_iterator()}
    wrong = _label_problem(split, np.fromiter(good.values(), np.int64), np.fromiter(good.keys(), np.int64))
    if wrong:
        return wrong
    last = -1
    try:
        for ordinal, raw in records.as_numpy_iterator():
            last = int(ordinal)
            if last not in good:
                return _undecodable_error(split, last, raw)
    except tf.errors.OpError as err:  # the shard itself: cut short, or not TFRecord
        place = _place(split, last + 1)
        return DataError(f"{place} cannot be read ({tf_reason(err.message)}); copy or write the shard again")
    return None


def _undecodable_error(split: RecordSplit, ordinal: int, raw: bytes) -> DataError:
    fix = "rewrite the shard without it, or set data.on_bad_image=skip"
    return DataError(f"{_undecodable(split, ordinal, raw)}; {fix}")


def _undecodable(split: RecordSplit, ordinal: int, raw: bytes) -> str:
    """'record 4 of DIR/train-00000-of-00001.tfrecord (x.jpg) is not a decodable image: why'."""
    try:
        encoded, name, _ = (value.numpy() for value in parse_record(tf.constant(raw)))
    except tf.errors.OpError:
        return f"{_place(split, int(ordinal))} is not a tf.train.Example with {IMAGE_KEY} and {LABEL_KEY}"
    named = name.decode("utf-8", "backslashreplace")
    problem = image_problem(encoded, named) or "it decodes on its own (a passing failure?)"
    return f"{_place(split, int(ordinal))} ({named}) is not a decodable image: {problem}"


def first_records_error(split: RecordSplit, count: int) -> DataError:
    """Why the first `count` records (previews, the statistics sample) failed."""
    return bad_record_error(split, split.raw_records().take(count))


def input_error(train, test, spec: InputSpec, per_epoch: int, step: int, steps: int) -> DataError:
    """A failure of the streamed TFRecord input during training, as one line naming the
    record: the training records of the failed call (their order is a pure function of
    (seed, epoch), so they are read again, not decoded, up to there), else the test split."""
    found = None
    if isinstance(train, RecordSplit):
        epoch, in_epoch = divmod(step, per_epoch)
        records = _epoch_records(train, spec.seed, tf.constant(epoch, tf.int64), per_epoch * spec.global_batch)
        found = find_bad_record(train, records.skip(in_epoch * spec.global_batch).take(steps * spec.global_batch))
    if found is None and isinstance(test, RecordSplit):
        found = find_bad_record(test, test.raw_records())
    return found or DataError(
        "the input pipeline failed on the TFRecord shards, but no record could be blamed; run again"
    )


def stream_ended_error(split: RecordSplit) -> DataError:
    """The stream ran out before the records shards.json counts: it does not match the shards."""
    root = split.shards[0].rsplit("/", 1)[0]
    return DataError(
        f"the TFRecord shards in {root} hold fewer records than its {INDEX_FILE} says ({sum(split.counts)} "
        f"train); that file is out of date: delete it (the shards are then counted at start)"
    )


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
    _check_outside(source, out)
    _check_new_folder(out)
    config = DataConfig(source="folder", path=source, validation_split=validation_split)
    dataset = read_image_folder(source, config, seed, progress, spelling=CONVERT_SPELLING)
    try:
        dataset.image_size = own_size(dataset.train)
    except DataError:
        dataset.image_size = 0  # mixed sizes: training needs data.image_size, and says so
    progress(f"Converting {len(dataset.train)} train / {len(dataset.test)} test images from {source} to {out}")
    # SIGTERM/SIGHUP raise like Ctrl-C, so convert_folder's cleanup removes what it wrote.
    with signals_interrupt(f"stopped converting; the files written to {out} were removed"):
        return convert_folder(dataset, out, shard_size_mb, progress=progress)


def _check_outside(source: str, out: str) -> None:
    """Shards written inside the image folder would become part of it (a class folder of
    no images, or stray files in train/): that folder would no longer train."""
    source_path, out_path = _resolved(source), _resolved(out)
    if out_path == source_path or out_path.startswith(source_path.rstrip("/") + "/"):
        raise DataError(
            f"--to {out} is inside --from {source}: the shards would become part of the image folder, which "
            "would then no longer train; choose a folder outside it (nothing was written)"
        )


def _check_new_folder(out: str) -> None:
    """--to must be a new or empty folder; asked through trainer.storage, so an unreachable
    store or an unknown scheme is one line before the images are even listed."""
    if not storage.exists(out):
        if not is_url(out) and not os.path.isdir(above := _nearest_existing(out)):  # no folder can be made
            raise DataError(f"--to {out}: {above} is a file, not a folder; choose a new folder (nothing was written)")
        if not is_url(out):
            _check_name_lengths(out)
        return
    if not storage.isdir(out):
        raise DataError(f"--to {out} is a file, not a folder; choose a new folder (nothing was written)")
    if storage.listdir(out):
        raise DataError(f"--to {out} exists and is not empty; choose a new folder (nothing was written)")


def _check_name_lengths(out: str) -> None:
    """A name past the filesystem's limit (255 bytes on most) would fail only once the
    images are read, as an ENAMETOOLONG traceback: refused first, in words."""
    limit = _name_max(_nearest_existing(out))
    for name in os.fsencode(os.path.abspath(out)).split(b"/"):
        if len(name) > limit:
            raise DataError(
                f"--to {short(os.fsdecode(name), 60)}: a name of {len(name)} bytes is longer than this filesystem "
                f"allows ({limit}); choose a shorter folder name (nothing was written)"
            )


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _make_out(out: str) -> None:
    """Make the --to folder through trainer.storage (TensorFlow's errors as OSErrors): a
    refusal (a file on the way, a read-only or full disk, no permission) is one line."""
    try:
        storage.makedirs(out)
    except StoreUnreachableError:
        raise  # already says what to do: "choose another --to" would send the user the wrong way
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DataError(
            f"--to {out}: cannot make that folder ({reason}); choose another --to (nothing was written)"
        ) from None


def _nearest_existing(path: str) -> str:
    """The deepest folder or file above local `path` that exists (`/` at worst)."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    return above


def _resolved(path: str) -> str:
    return path.rstrip("/") if is_url(path) else os.path.realpath(path)


def convert_folder(
    dataset: Dataset, out: str, shard_size_mb: float = 100.0, image_size: int = 0, progress: Progress = print
) -> dict:
    """Write a listed image folder (train and test FileSplits) as TFRecord shards in `out`.

    The files' bytes are stored as they are (no re-encoding: lossless and fast); files are
    read by a thread pool. Shards hold about `shard_size_mb` each. A conversion that fails
    (an unreadable file, a full disk, Ctrl-C) removes every file it wrote, and `out` if it
    made it: nothing half-written is left to refuse the next try.
    """
    if not isinstance(dataset.train, FileSplit):
        raise DataError("launch data convert reads image folders (data.source=folder or a CIFAR-10 image folder)")
    out = out.rstrip("/")
    made_out = not storage.exists(out)
    _make_out(out)
    written: list[str] = []
    try:
        return _write_all(dataset, out, shard_size_mb, image_size, progress, written)
    except BaseException:
        _remove_written(written, out if made_out else None)
        raise


def _write_all(
    dataset: Dataset, out: str, shard_size_mb: float, image_size: int, progress: Progress, written: list[str]
) -> dict:
    index: dict = {"image_size": image_size or dataset.image_size, "classes": len(dataset.class_names)}
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        shards, counts = _write_split(split, out, name, shard_size_mb, progress, written)
        index[name] = {"shards": shards, "counts": counts, "bytes": _sizes([f"{out}/{shard}" for shard in shards])}
    written += [f"{out}/{LABELS_FILE}", f"{out}/{INDEX_FILE}"]
    write_text(f"{out}/{LABELS_FILE}", "\n".join(dataset.class_names) + "\n")
    write_json(f"{out}/{INDEX_FILE}", index)
    return index


def _remove_written(written: list[str], made_folder: str | None) -> None:
    for path in written:
        try:
            if tf.io.gfile.exists(path):
                tf.io.gfile.remove(path)
        except tf.errors.OpError:
            pass  # best effort: the error being raised is the one to report
    try:
        if made_folder and not tf.io.gfile.listdir(made_folder):
            tf.io.gfile.rmtree(made_folder)
    except tf.errors.OpError:
        pass


def _example(data: bytes, label: int, filename: bytes) -> bytes:
    feature = {
        IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        FILENAME_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _read_example(split: FileSplit, index: int) -> bytes:
    """One file as a record; a file that cannot be read (gone since it was listed, no
    permission) is one DataError naming it."""
    path = split.path(index)
    try:
        with tf.io.gfile.GFile(path_bytes(path), "rb") as handle:
            data = handle.read()
    except tf.errors.OpError as err:
        raise DataError(f"cannot read {shown(path)}: {tf_reason(err.message)}; fix or remove it") from None
    return _example(data, split.labels[index], path_bytes(path))


def _write_split(
    split: FileSplit, out: str, name: str, shard_size_mb: float, progress: Progress, written: list[str]
) -> tuple[list[str], list[int]]:
    """Records in the split's (class round-robin) order, cut into shards of ~shard_size_mb."""
    temp_names, counts, writer, size, tick = [], [], None, 0.0, time.perf_counter()
    pool = ThreadPoolExecutor(8)
    try:
        records = pool.map(lambda index: _read_example(split, index), range(len(split)))
        for done, record in enumerate(records, start=1):
            if writer is None or size >= shard_size_mb * 2**20:
                writer = _next_shard(writer, out, name, temp_names, counts)
                written.append(temp_names[-1])
                size = 0.0
            writer.write(record)
            size += len(record)
            counts[-1] += 1
            if done % 10_000 == 0 or done == len(split):
                rate = done / max(time.perf_counter() - tick, 1e-9)
                progress(f"  {name}: {done}/{len(split)} images ({rate:.0f}/s)")
    finally:
        pool.shutdown(cancel_futures=True)  # a failure stops the reads still queued
        if writer is not None:
            writer.close()
    finals = _final_names(out, name, temp_names)
    written += [f"{out}/{final}" for final in finals]
    return finals, counts


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
