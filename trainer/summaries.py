"""TensorBoard event files: keeping curves continuous across restarts.

A run killed between writing a summary and saving the next checkpoint leaves points
that the resumed run writes again. Before resuming at step S, events with a step
above S are removed from the existing files, so every step has exactly one point.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from tensorboard.compat.proto import event_pb2


def drop_events_after(logdir: Path, step: int) -> int:
    """Rewrite event files under `logdir` without events past `step`; returns how many went."""
    dropped = 0
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        temporary = path.with_name(path.name + ".tmp")
        with tf.io.TFRecordWriter(str(temporary)) as writer:
            for record in kept:
                writer.write(record)
        temporary.replace(path)
    return dropped
