"""Image folders (data.source=folder): `root/train/<class>/*` + `root/test/<class>/*`, or
one `root/<class>/*` tree split by data.validation_split. Files are listed, not decoded
(trainer.data.prepare decides what to decode, and when), through one os.scandir per
folder locally, through tf.io.gfile for URLs (gs://, ram://).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.config import DataConfig
from trainer.data.splits import Dataset, FileSplit, path_bytes, shown
from trainer.errors import DataError
from trainer.say import Say
from trainer.storage import is_url

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Spelling:
    """How the user named what a folder listing checks, so its errors say what to change:
    config keys for training, command-line flags for `launch data convert`."""

    path: str = "data.path"
    validation_split: str = "data.validation_split"
    skip_hint: str = ", or set data.on_bad_image=skip"  # how to leave a bad file out; "" if there is no way

    def setting(self, key: str, value: object) -> str:
        """`data.path=x` for a config key, `--from x` for a flag."""
        return f"{key} {value}" if key.startswith("--") else f"{key}={value}"


CONFIG_SPELLING = Spelling()
CONVERT_SPELLING = Spelling(path="--from", validation_split="--validation-split", skip_hint="")


def read_image_folder(
    root: str,
    config: DataConfig,
    seed: int,
    progress: Say | None = None,
    spelling: Spelling = CONFIG_SPELLING,
) -> Dataset:
    """List (not decode) `root/train/<class>/*` + `root/test/<class>/*`, or one `root/<class>/*`
    tree split by `config.validation_split`. Classes are the sorted folder names.

    Only the first `*_examples` files are kept (taken round-robin over classes, so a small
    slice stays balanced). Any tf.io.gfile location works (gs://, ram://). An entry that
    cannot be an image file (a broken link, a pipe) is refused here, or left out under
    data.on_bad_image=skip: found once at listing, it never fails a read mid-run.
    """
    root = root.rstrip("/") or "/"
    if not _isdir(root):
        raise DataError(
            f"{spelling.setting(spelling.path, root)} is not a folder (expected train/<class>/ and test/<class>/, "
            "or <class>/)"
        )
    split_layout = _isdir(_join(root, "train"))
    if split_layout and config.validation_split:
        raise DataError(
            f"{spelling.setting(spelling.validation_split, config.validation_split)} is for one <class>/ tree, but "
            f"{root} already has train/ and test/; set {spelling.setting(spelling.validation_split, 0)}"
        )
    tick = time.perf_counter()
    lister = _Lister(progress, config.on_bad_image == "skip", spelling)
    if split_layout:
        train, test, names = _split_folders(root, lister)
    else:
        train, test, names = _one_tree(root, config, seed, lister)
    if progress and time.perf_counter() - tick > 1:
        progress(f"Listed {len(train) + len(test)} image files in {time.perf_counter() - tick:.1f}s")
    train = train.limited(config.train_examples)
    test = test.limited(config.test_examples)
    return Dataset(train, test, names, f"image folder {root}")


def _join(*parts: str) -> str:
    return "/".join(part.rstrip("/") for part in parts)


def _isdir(path: str) -> bool:
    """Through trainer.storage for a URL: tf.io.gfile.isdir says False for an unreachable
    store, which would be reported as "not a folder"; storage.isdir raises it as one line."""
    return storage.isdir(path) if is_url(path) else os.path.isdir(path_bytes(path))


def _listdir(folder: str) -> list[str]:
    """Entry names of a gfile location (an object store's names are UTF-8 by definition;
    ram:// is the one place a byte name could still come from)."""
    try:
        return tf.io.gfile.listdir(folder)
    except UnicodeDecodeError:
        raise DataError(f"{folder} holds a name that is not UTF-8; rename it") from None


def _subfolders(folder: str) -> list[str]:
    if is_url(folder):
        return [name.rstrip("/") for name in _listdir(folder) if tf.io.gfile.isdir(_join(folder, name))]
    return [os.fsdecode(entry.name) for entry in _scan(folder) if _is_folder(entry)]


def _scan(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path_bytes(folder)) as entries:
            return list(entries)
    except OSError as err:
        raise DataError(f"cannot list {shown(folder)}: {err.strerror or err}") from None


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link loop: no folder (and no class)
        return False


def _class_names(folder: str) -> list[str]:
    names = sorted(_subfolders(folder))
    if not names:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/images)")
    for name in names:
        _check_class_name(name, folder)
    return names


def _check_class_name(name: str, folder: str) -> None:
    """A class name is written as one line of labels.txt, which readers strip: it must be
    text, on one line, and neither blank nor edged with spaces (or it would not come back)."""
    if shown(name) != name:
        raise DataError(
            f"class folder {shown(name)} in {folder} has a name that is not UTF-8; rename it (class names "
            "are written as text to labels.txt and dataset.json), e.g. with convmv -f latin1 -t utf8"
        )
    if not name.isprintable():
        raise DataError(
            f"class folder {name!r} in {folder} has a line break, tab or other control character in its "
            "name; rename it (class names are written one per line, e.g. to labels.txt)"
        )
    if name != name.strip():
        raise DataError(
            f"class folder {name!r} in {folder} is blank or starts or ends with a space; rename it (class "
            "names are written one per line to labels.txt, whose readers strip them: it would not come back as it is)"
        )


class _Lister:
    """Lists a class folder's image files, refusing (or, with skip, leaving out and naming)
    the entries that cannot be read as files."""

    def __init__(self, progress: Say | None, skip: bool, spelling: Spelling) -> None:
        self.progress, self.skip, self.spelling = progress, skip, spelling

    def images(self, folder: str) -> list[str]:
        files = sorted(_image_names(folder) if is_url(folder) else self._local_images(folder))
        if not files:
            raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if self.progress and len(files) >= 50_000:
            self.progress(f"  {folder}: {len(files)} files")
        return files

    def split(self, folders: list[str]) -> FileSplit:
        return FileSplit.round_robin(folders, [self.images(folder) for folder in folders])

    def _local_images(self, folder: str) -> list[str]:
        """One scandir: regular files (and links to them) are kept, folders named like
        images are not images and are passed over, anything else is a bad entry."""
        names, bad = [], []
        for entry in _scan(folder):
            name = os.fsdecode(entry.name)
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            problem = _entry_problem(entry)
            if problem is None:
                names.append(name)
            elif problem:
                bad.append(f"{shown(_join(folder, name))} is {problem}")
        if bad and not self.skip:
            raise DataError(f"{bad[0]}; fix or remove it{self.spelling.skip_hint}")
        if bad and self.progress:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            self.progress(
                f"Warning: skipping {len(bad)} unreadable file(s) in {shown(folder)} (data.on_bad_image=skip): "
                + "; ".join(bad[:3])
                + more
            )
        return names


def _image_names(folder: str) -> list[str]:
    """Image names of a gfile location ("x.jpg/", a folder on an object store, is no image)."""
    return [name for name in _listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES)]


def _entry_problem(entry: os.DirEntry) -> str | None:
    """Why a listed entry cannot be read as an image file: None if it is a file (or a link
    to one), "" for a folder (not an image at all, so not listed), else the reason."""
    try:
        if entry.is_file():
            return None
        if entry.is_dir():
            return ""
    except OSError as err:  # stat through the link failed: a loop, no permission
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"not readable ({err.strerror})"
    if entry.is_symlink():
        return f"a broken symbolic link (to {shown(os.fsdecode(os.readlink(entry.path)))})"
    return "not a regular file (a pipe, socket or device)"


def _split_folders(root: str, lister: _Lister) -> tuple[FileSplit, FileSplit, list[str]]:
    train_dir, test_dir = _join(root, "train"), _join(root, "test")
    if not _isdir(test_dir):
        raise DataError(f"{test_dir} is missing: an image folder with train/ needs test/<class>/ too")
    names = _class_names(train_dir)
    test_names = _class_names(test_dir)
    missing = [name for name in names if name not in test_names]
    if missing:
        raise DataError(f"class folder {_join(test_dir, missing[0])} is missing from the test split")
    extra = [name for name in test_names if name not in names]
    if extra:
        raise DataError(f"class folder {_join(test_dir, extra[0])} has no counterpart in {train_dir}")
    train = lister.split([_join(train_dir, name) for name in names])
    test = lister.split([_join(test_dir, name) for name in names])
    return train, test, names


def _one_tree(root: str, config: DataConfig, seed: int, lister: _Lister) -> tuple[FileSplit, FileSplit, list[str]]:
    """root/<class>/*: each class's files split by validation_split, chosen by the seed."""
    key = lister.spelling.validation_split
    if not config.validation_split:
        raise DataError(
            f"{root} has no train/ folder: for one <class>/ tree set {key} (e.g. 0.2) to hold out "
            "a test split, or add train/<class>/ and test/<class>/"
        )
    names = _class_names(root)
    folders = [_join(root, name) for name in names]
    listed = [lister.images(folder) for folder in folders]
    train_files: list[list[str]] = []
    test_files: list[list[str]] = []
    for label, files in enumerate(listed):
        held_out = round(len(files) * config.validation_split)
        if held_out == 0 or held_out == len(files):
            raise DataError(
                f"{lister.spelling.setting(key, config.validation_split)} leaves no "
                f"{'test' if held_out == 0 else 'training'} image of class {names[label]!r} ({len(files)} files); "
                f"use a split between {1 / len(files):.2f} and {1 - 1 / len(files):.2f}"
            )
        # Stratified and fixed by the seed: the same files are held out on every run and worker.
        order = np.random.default_rng([seed, label]).permutation(len(files))
        test_files.append(sorted(files[i] for i in order[:held_out]))
        train_files.append(sorted(files[i] for i in order[held_out:]))
    return FileSplit.round_robin(folders, train_files), FileSplit.round_robin(folders, test_files), names


def load(config: DataConfig, seed: int, say: Say | None = None) -> Dataset:
    """data.source=folder (SOURCES): the folder at data.path."""
    return read_image_folder(config.path, config, seed, say)
