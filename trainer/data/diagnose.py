"""Which images do not decode, and why, in one line naming the file or record.

tf.data reports a failed decode as an op error deep inside a pipeline; the user needs the
file and the reason. Everything here runs off the hot path: at start (data.on_bad_image=
skip's one pass), or after a failure, when the examples the failed batches held are
checked again. One pass serves files and TFRecord records alike (`_decoding`): a parallel
map that decodes and drops what fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.data.decode import decode, image_problem, native_stderr_quiet, tf_reason
from trainer.data.plan import InputSpec, batch_indices, epoch_records, steps_per_epoch
from trainer.data.records import IMAGE_KEY, INDEX_FILE, LABEL_KEY, label_error, parse_record
from trainer.data.splits import Dataset, Examples, FileSplit, RecordSplit, Split, path_bytes, shown
from trainer.errors import DataError

_FILE_FIX = "fix or remove it, or set data.on_bad_image=skip"
_RECORD_FIX = "rewrite the shard without it, or set data.on_bad_image=skip"
# A split data.on_bad_image=skip checked (split.checked): a file that fails now decoded
# then (or unreadable.json in the workdir said so); setting skip again would not help.
_SINCE_CHECKED = (
    "it decoded when the images were checked at the start (or unreadable.json in the workdir said so); "
    "fix or remove it and run again, or delete that unreadable.json to have every image checked again"
)


# --- one pass: which examples decode ---------------------------------------------------------


def _decoding(items: tf.data.Dataset, encoded: Callable[..., tuple[tf.Tensor, tf.Tensor]]) -> dict[int, int]:
    """{index: label} of the items that decode; `encoded(*item)` -> (bytes, label),
    item[0] is the index. Failures are dropped (ignore_errors), quietly: libjpeg prints its
    own complaint about each bad file on stderr."""

    def check(*item):
        data, label = encoded(*item)
        return item[0], label, tf.shape(decode(data))[0]

    checked = items.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    found: dict[int, int] = {}
    with native_stderr_quiet():  # batched: one Python step per 1,024 images, not per image
        for indices, labels, _ in checked.batch(1024).as_numpy_iterator():
            found.update(zip(indices.tolist(), labels.tolist()))
    return found


def _file_items(split: FileSplit, indices: Iterable[int]) -> tuple[tf.data.Dataset, Callable]:
    paths, labels = split.paths(), tf.constant(split.labels, tf.int32)
    items = tf.data.Dataset.from_tensor_slices(np.asarray(list(indices), np.int64))
    return items, lambda i: (tf.io.read_file(paths[i]), labels[i])


def _record_item(ordinal: tf.Tensor, raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    encoded, _, label = parse_record(raw)
    return encoded, label


def readable_indices(split: FileSplit, indices: Iterable[int]) -> set[int]:
    """Which of `indices` decode: one parallel pass that drops the failures."""
    return set(_decoding(*_file_items(split, indices)))


def _gone_shard(split: RecordSplit) -> DataError | None:
    """A local shard that cannot be opened any more (deleted or moved since it was listed,
    a broken link): checked before a pass over records, whose ignore_errors would retry
    opening it forever (tf.data drops the error and asks the same reader again)."""
    for shard in split.shards:
        if not storage.is_url(shard) and not os.path.isfile(path_bytes(shard)):
            return DataError(
                f"TFRecord shard {shard} is gone since it was listed (deleted, moved or a broken link); "
                "copy it back and run again"
            )
    return None


def unreadable_records(split: RecordSplit) -> list[int]:
    """Ordinals of the records whose image does not decode (one parallel pass)."""
    gone = _gone_shard(split)
    if gone:
        raise gone
    readable = _decoding(split.raw_records(), _record_item)
    return [ordinal for ordinal in range(sum(split.counts)) if ordinal not in readable]


# --- files ------------------------------------------------------------------------------------


def describe_unreadable(path: str) -> str:
    """Why one file does not decode, in one line and in words (not TensorFlow's internals)."""
    try:
        raw = tf.io.read_file(path_bytes(path)).numpy()
    except tf.errors.OpError as err:  # gone since it was listed, or no permission
        return f"cannot read image {shown(path)}: {tf_reason(err.message)}"
    return f"cannot read image {shown(path)}: {image_problem(raw) or 'it decodes now (a passing failure?)'}"


def first_unreadable(split: FileSplit, indices: Iterable[int]) -> DataError | None:
    """The first file among `indices` that does not decode, as one line; None if all decode."""
    indices = list(indices)
    readable = readable_indices(split, indices)
    bad = [i for i in indices if i not in readable]
    fix = _SINCE_CHECKED if split.checked else _FILE_FIX
    return DataError(f"{describe_unreadable(split.path(bad[0]))}; {fix}") if bad else None


# --- records ------------------------------------------------------------------------------------


def label_problem(split: RecordSplit, labels: np.ndarray, ordinals: np.ndarray) -> DataError | None:
    """The first of these labels outside [0, labels.txt's length), as a DataError."""
    if not split.num_classes or not len(labels):
        return None
    wrong = np.flatnonzero((labels < 0) | (labels >= split.num_classes))
    if not len(wrong):
        return None
    first = wrong[0]
    return label_error(split, split.place(int(ordinals[first])), int(labels[first]), split.num_classes)


def undecodable(split: RecordSplit, ordinal: int, raw: bytes) -> str:
    """'record 4 of DIR/train-00000-of-00001.tfrecord (x.jpg) is not a decodable image: why'."""
    try:
        encoded, name, _ = (value.numpy() for value in parse_record(tf.constant(raw)))
    except tf.errors.OpError:
        return f"{split.place(int(ordinal))} is not a tf.train.Example with {IMAGE_KEY} and {LABEL_KEY}"
    named = name.decode("utf-8", "backslashreplace")
    if not named.isprintable():  # the record's own file name: a line break would forge a second line
        named = named.encode("unicode_escape").decode("ascii")
    problem = image_problem(encoded) or "it decodes on its own (a passing failure?)"
    return f"{split.place(int(ordinal))} ({named}) is not a decodable image: {problem}"


def find_bad_record(split: RecordSplit, records: tf.data.Dataset) -> DataError | None:
    """The first of `records` ((ordinal, raw) pairs) with an image that does not decode or
    a label past labels.txt, as one line naming its shard and place in it; None if none.

    Two passes over these records only (the error path): one decodes in parallel and
    keeps what decodes, one finds the first that did not."""
    gone = _gone_shard(split)
    if gone:
        return gone
    good = _decoding(records, _record_item)
    wrong = label_problem(split, np.fromiter(good.values(), np.int64), np.fromiter(good.keys(), np.int64))
    if wrong:
        return wrong
    last = -1
    try:
        for ordinal, raw in records.as_numpy_iterator():
            last = int(ordinal)
            if last not in good:
                fix = _SINCE_CHECKED if split.checked else _RECORD_FIX
                return DataError(f"{undecodable(split, last, raw)}; {fix}")
    except tf.errors.OpError as err:  # the shard itself: cut short, or not TFRecord
        place = split.place(last + 1)
        return DataError(f"{place} cannot be read ({tf_reason(err.message)}); copy or write the shard again")
    return None


def stream_ended_error(split: RecordSplit) -> DataError:
    """The stream ran out before the records shards.json counts: it does not match the shards."""
    return DataError(
        f"the TFRecord shards in {split.folder} hold fewer records than its {INDEX_FILE} says ({sum(split.counts)} "
        f"train); that file is out of date: delete it (the shards are then counted at start)"
    )


# --- one line for a failed pipeline ------------------------------------------------------------


def _blameless(split: Examples) -> DataError:
    if isinstance(split, RecordSplit):
        return DataError(
            f"the input pipeline failed on the TFRecord shards in {split.folder}, but every record checked decodes "
            "(a passing read failure?); run again"
        )
    return DataError("the input pipeline failed while decoding images (no single file could be blamed)")


def window_error(split: Examples, window: range) -> DataError:
    """Why examples `window` (in the split's own order) failed to load: previews, the
    statistics sample, a memory cache being filled."""
    if isinstance(split, RecordSplit):
        found = find_bad_record(split, split.raw_records().skip(window.start).take(len(window)))
    else:
        found = first_unreadable(split, window) if isinstance(split, FileSplit) else None
    return found or _blameless(split)


def _whole_split(split: Examples) -> DataError | None:
    if isinstance(split, RecordSplit):
        return find_bad_record(split, split.raw_records())
    return first_unreadable(split, range(len(split))) if isinstance(split, FileSplit) else None


def _training_window(split: Examples, spec: InputSpec, steps: range) -> DataError | None:
    """The first bad example among those global steps `steps` trained on. Their order is a
    pure function of (seed, epoch): files are found by index, records read again (not
    decoded) up to there (within the epoch of steps.start)."""
    if not steps or isinstance(split, Split):
        return None
    if isinstance(split, FileSplit):
        return first_unreadable(split, batch_indices(steps, len(split), spec))
    per_epoch = steps_per_epoch(len(split), spec.global_batch)
    epoch, in_epoch = divmod(steps.start, per_epoch)
    records = epoch_records(split, spec.seed, tf.constant(epoch, tf.int64), per_epoch * spec.global_batch)
    window = records.skip(in_epoch * spec.global_batch).take(len(steps) * spec.global_batch)
    return find_bad_record(split, window)


def input_error(dataset: Dataset, spec: InputSpec, steps: range = range(0)) -> DataError | None:
    """A decode failure of the streamed input, as one line naming the file or record: the
    training examples of global steps `steps` (tf.data reports errors in order, so the
    culprit is in the failed call's batches), else the test split checked whole (an
    evaluation failed). None when nothing is streamed: in-memory batches cannot fail to
    decode, so the failure was something else and is raised as it is."""
    train, test = dataset.train, dataset.test
    if isinstance(train, Split) and isinstance(test, Split):
        return None
    return input_culprit(dataset, spec, steps) or _blameless(train if not isinstance(train, Split) else test)


def input_culprit(dataset: Dataset, spec: InputSpec, steps: range = range(0)) -> DataError | None:
    """The file or record `input_error` would name, or None when none of them fails now:
    for errors that need not come from the input (a file not found may be a checkpoint's)."""
    return _training_window(dataset.train, spec, steps) or _whole_split(dataset.test)
