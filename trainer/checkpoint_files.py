"""The files of checkpoints in a folder (any filesystem): which steps it holds, one's files, deleting one.

A checkpoint of step N is `ckpt-N.index` plus its `ckpt-N.data-*` files, as
`tf.train.CheckpointManager` names them. It counts as present once its index is there:
data first and index last when writing (trainer.staging), index first when deleting.
Shared by the store (trainer.checkpoints) and the uploader (trainer.staging), which
otherwise need nothing of each other; this module needs only trainer.storage.
"""

from __future__ import annotations

import os
import re

from trainer import storage

INDEX_SUFFIX = ".index"
_INDEX_FILE = re.compile(r"^ckpt-([0-9]+)\.index$")  # [0-9], not \d: '٩٩' is no step


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints present in `directory` (any filesystem), newest first.

    A checkpoint one of whose files is a pipe or a device (local folders) is left out:
    TensorFlow would open it and wait for a writer forever."""
    names = storage.listdir(directory)
    steps = {int(m.group(1)) for name in names if (m := _INDEX_FILE.match(name))}
    special = {name for name in names if storage.special_kind(storage.join(directory, name))}
    blocked = {step for step in steps if any(name.startswith(f"ckpt-{step}.") for name in special)}
    return sorted(steps - blocked, reverse=True)


def checkpoint_file_names(directory: str | os.PathLike, step: int) -> list[str]:
    """Names of the files of the checkpoint of `step` in `directory` (index and data)."""
    return [name for name in storage.listdir(directory) if name.startswith(f"ckpt-{step}.")]


def remove_checkpoint(directory: str, step: int) -> None:
    """Delete the files of one checkpoint, its index first: from then on it is no longer
    listed (checkpoint_steps), so a kill half-way leaves no checkpoint that looks whole."""
    names = checkpoint_file_names(directory, step)
    for name in sorted(names, key=lambda name: not name.endswith(INDEX_SUFFIX)):
        storage.remove(storage.join(directory, name))
