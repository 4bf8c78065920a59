"""`launch data convert`: an image folder to TFRecord shards (trainer.data.records' layout).

The files' bytes are stored as they are (no re-encoding: lossless and fast), read by a
thread pool, written to temporary names and renamed once all are written; a conversion
that fails or is stopped removes every file it wrote. Everything about --to is checked
before the first image is read.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

from trainer import storage
from trainer.config import DataConfig
from trainer.data.decode import tf_reason
from trainer.data.prepare import own_size
from trainer.data.records import INDEX_FILE, LABELS_FILE, example
from trainer.data.sources.folder import CONVERT_SPELLING, read_image_folder
from trainer.data.sources.tfrecord import shard_sizes
from trainer.data.splits import Dataset, FileSplit, path_bytes, shown
from trainer.errors import DataError, StoreUnreachableError
from trainer.files import short, write_json, write_text
from trainer.preemption import signals_interrupt
from trainer.say import Say
from trainer.storage import is_url


def convert(
    source: str,
    out: str,
    shard_size_mb: float = 100.0,
    validation_split: float = 0.0,
    seed: int = 0,
    progress: Say = print,
) -> dict:
    """`launch data convert`: an image folder (train/ + test/, or one <class>/ tree split by
    `validation_split`) to TFRecord shards in a new folder `out` (local or gs://...)."""
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
    dataset: Dataset, out: str, shard_size_mb: float = 100.0, image_size: int = 0, progress: Say = print
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
    dataset: Dataset, out: str, shard_size_mb: float, image_size: int, progress: Say, written: list[str]
) -> dict:
    index: dict = {"image_size": image_size or dataset.image_size, "classes": len(dataset.class_names)}
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        shards, counts = _write_split(split, out, name, shard_size_mb, progress, written)
        index[name] = {"shards": shards, "counts": counts, "bytes": shard_sizes([f"{out}/{shard}" for shard in shards])}
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


def _read_example(split: FileSplit, index: int) -> bytes:
    """One file as a record; a file that cannot be read (gone since it was listed, no
    permission) is one DataError naming it."""
    path = split.path(index)
    try:
        with tf.io.gfile.GFile(path_bytes(path), "rb") as handle:
            data = handle.read()
    except tf.errors.OpError as err:
        raise DataError(f"cannot read {shown(path)}: {tf_reason(err.message)}; fix or remove it") from None
    return example(data, split.labels[index], path_bytes(path))


def _write_split(
    split: FileSplit, out: str, name: str, shard_size_mb: float, progress: Say, written: list[str]
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
