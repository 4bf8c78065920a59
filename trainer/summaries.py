"""TensorBoard event files: keeping curves continuous across restarts.

A run killed between writing a summary and saving the next checkpoint leaves points
that the resumed run writes again. Before resuming at step S, events with a step
above S are removed from the existing files, so every step has exactly one point.

A run killed while TensorBoard flushed can also leave a file whose last record is cut
short. Reading stops there: the readable records are kept (the file is rewritten without
the damaged tail, atomically) and a warning says so; a resume never fails on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from trainer import storage
from trainer.files import short
from trainer.say import Say


def read_records(path: str | os.PathLike) -> tuple[list[bytes], str | None]:
    """The readable records of an event file, and why reading stopped early (or None)."""
    records: list[bytes] = []
    iterator = iter(tf.data.TFRecordDataset(str(path)))
    while True:
        try:
            records.append(bytes(next(iterator).numpy()))
        except StopIteration:
            return records, None
        except tf.errors.OpError as err:  # DataLossError: truncated or corrupted record
            return records, short(str(err), 120)


def _events(records: list[bytes]) -> Iterator[event_pb2.Event]:
    for record in records:
        yield event_pb2.Event.FromString(record)


def drop_events_after(logdir: str | os.PathLike, step: int, warn: Say = print) -> int:
    """Rewrite event files under `logdir` without events past `step`; returns how many went."""
    dropped = 0
    for path in _event_files(storage.walk_files(logdir)):
        records, damage = read_records(path)
        kept = [record for record, event in zip(records, _events(records)) if event.step <= step]
        if damage:
            warn(f"Warning: {path} ends in a damaged record ({damage}); keeping the {len(records)} readable ones")
        elif len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        _rewrite(path, kept)
    return dropped


def _event_files(paths: list[str]) -> list[str]:
    return [path for path in paths if storage.name_of(path).startswith("events.out.tfevents.")]


def _rewrite(path: str, records: list[bytes]) -> None:
    temporary = storage.join(storage.parent_of(path), f".{storage.name_of(path)}.tmp")
    with tf.io.TFRecordWriter(temporary) as writer:
        for record in records:
            writer.write(record)
    storage.rename(temporary, path)


def scalar_at(logdir: str | os.PathLike, tag: str, step: int) -> float | None:
    """The value of scalar `tag` logged at `step` under `logdir`, if any file has it."""
    found = None
    for path in _event_files(sorted(storage.join(logdir, name) for name in storage.listdir(logdir))):
        for event in _events(read_records(path)[0]):
            if event.step != step:
                continue
            for value in event.summary.value:
                if value.tag == tag:
                    found = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
    return found
