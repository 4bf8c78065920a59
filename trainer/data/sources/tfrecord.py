"""TFRecord shards (data.source=tfrecord) under data.path, any tf.io.gfile location: the
layout is trainer.data.records'. Reading starts with labels.txt (the first read of
data.path, so an unreachable store is one line before anything else), then shards.json,
checked key by key (a damaged one is said and the shards counted instead), then every
label is checked against labels.txt before the first step.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.config import DataConfig
from trainer.data.decode import header_size, native_stderr_quiet, tf_reason
from trainer.data.records import INDEX_FILE, LABELS_FILE, SPLIT_PREFIXES, label_error, label_of, parse_record
from trainer.data.splits import Dataset, RecordSplit
from trainer.errors import DataError, StoreUnreachableError
from trainer.say import Say


def read_record_dataset(config: DataConfig, progress: Say | None = None) -> Dataset:
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


def _read_index(root: str, say: Say) -> dict:
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


def _split_shards(root: str, split: str, index: dict, say: Say) -> RecordSplit:
    shards = sorted(
        path
        for prefix in SPLIT_PREFIXES[split]
        for path in storage.glob(f"{root}/{prefix}-*")
        if ".tfrecord" in path.rsplit("/", 1)[-1]
    )
    if not shards:
        raise DataError(f"no {split} shards in {root} (expected {root}/{SPLIT_PREFIXES[split][0]}-*.tfrecord)")
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
        actual = shard_sizes(shards)
        changed = [path for path, size in zip(shards, actual) if expected[path.rsplit("/", 1)[-1]] != size]
        if changed:
            return None, f"does not match {changed[0]} (its size changed since shards.json was written)"
    return found, ""


def shard_sizes(paths: list[str]) -> list[int]:
    """Byte sizes of files (a stat each, in parallel: each is a request on an object store)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(storage.size, paths))


def _count_shard(path: str) -> tuple[int, int, int]:
    """(records, smallest label, largest label) of one shard, in one pass that decodes nothing."""
    start = (np.int64(0), np.int64(2**62), np.int64(-(2**62)))
    try:
        count, low, high = (
            tf.data.TFRecordDataset(path)
            .map(label_of)
            .reduce(
                start, lambda state, label: (state[0] + 1, tf.minimum(state[1], label), tf.maximum(state[2], label))
            )
        )
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        raise DataError(
            f"TFRecord shard {path} is damaged ({tf_reason(err.message)}); copy or write it again"
        ) from None
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as err:  # a broken link, no permission
        raise DataError(f"cannot read TFRecord shard {path} ({tf_reason(err.message)}); copy it again") from None
    except tf.errors.OpError as err:  # no network mid-count: one line, as at the first read
        unreachable = storage.unreachable(err, path)
        if unreachable is None:
            raise
        raise unreachable from None
    return int(count), int(low), int(high)


def _count_shards(shards: list[str]) -> list[tuple[int, int, int]]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(_count_shard, shards))


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


def load(config: DataConfig, seed: int, say: Say | None = None) -> Dataset:
    """data.source=tfrecord (SOURCES): the shards at data.path (no seed: their order is drawn
    per epoch by trainer.data.plan)."""
    return read_record_dataset(config, say)
