"""CIFAR-10 (data.source=cifar10): data.path, then $CIFAR10_DIR, then the Keras cache,
then a download with Keras' own fetcher. The official python batches are read with a
restricted unpickler (a pickle can run any code it names); a folder of CIFAR-10 JPEGs
(train/<class>/, test/<class>/) is read as an image folder.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import keras
import numpy as np

from trainer import storage
from trainer.config import DataConfig
from trainer.data.sources.folder import read_image_folder
from trainer.data.splits import Dataset, Split
from trainer.errors import DataError
from trainer.files import short
from trainer.say import Say

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# What the CIFAR-10 python batches may contain besides dicts, lists, bytes and ints: one
# uint8 numpy array. Anything else in a "data_batch_N" (os.system, eval, ...) is refused.
_CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)
_CIFAR_ORIGIN = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_OFFLINE_HINT = (
    "set CIFAR10_DIR or data.path to a folder holding cifar-10-batches-py or train/<class>/ "
    "and test/<class>/ images, or use data.source=synthetic"
)


def keras_cache_dir() -> Path:
    """Where `keras.datasets` keeps downloads (honours KERAS_HOME like Keras does)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def keras_cifar10_folders() -> list[Path]:
    """Where Keras leaves CIFAR-10: Keras 3 extracts into cifar-10-batches-py-target/
    (holding cifar-10-batches-py/), Keras 2 into cifar-10-batches-py/."""
    cache = keras_cache_dir()
    return [cache / "cifar-10-batches-py-target", cache / "cifar-10-batches-py"]


def load_cifar10(config: DataConfig, seed: int) -> Dataset:
    """Find CIFAR-10: data.path, then $CIFAR10_DIR, then the Keras cache, then download."""
    for where, value in (("data.path", config.path), ("CIFAR10_DIR", os.environ.get("CIFAR10_DIR"))):
        if value:
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise DataError(f"{where}={value} is not a folder; {_OFFLINE_HINT}")
            return _read_cifar10_folder(folder, config, seed, where)
    for cached in keras_cifar10_folders():
        if cached.is_dir():
            return _read_cifar10_folder(cached, config, seed, "Keras cache")
    return _download_cifar10()


def _read_cifar10_folder(folder: Path, config: DataConfig, seed: int, where: str) -> Dataset:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return read_cifar10_pickles(candidate)
    if (folder / "train").is_dir():
        dataset = read_image_folder(str(folder), config, seed)
        dataset.image_size = config.image_size or 32
        dataset.origin = f"CIFAR-10 image folder {folder} (from {where})"
        return dataset
    raise DataError(
        f"{where}={folder} holds neither cifar-10-batches-py (data_batch_1..5, test_batch) "
        "nor train/<class>/ and test/<class>/ image folders"
    )


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: a pickle can run any code it names."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never does (refused)")


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels of one `data_batch_N`/`test_batch` file."""
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int32)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, AttributeError) as err:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {short(str(err))}") from err
    if len(labels) != len(data):
        raise DataError(f"cannot read CIFAR-10 batch {path}: {len(data)} images but {len(labels)} labels")
    return data.transpose(0, 2, 3, 1), labels


def read_cifar10_pickles(folder: Path) -> Dataset:
    """Read the official python version (`cifar-10-batches-py`), refusing foreign pickles."""

    train_parts = [read_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = read_cifar10_batch(folder / "test_batch")
    train = Split(
        np.concatenate([images for images, _ in train_parts]),
        np.concatenate([labels for _, labels in train_parts]),
    )
    return Dataset(train, Split(test_images, test_labels), list(CIFAR10_CLASSES), f"CIFAR-10 pickles {folder}")


def _download_cifar10() -> Dataset:
    """Download with Keras' own fetcher (same cache and checksum as keras.datasets.cifar10),
    then read the batches with the restricted unpickler above, whatever the Keras version."""
    try:
        with storage.download_deadline():
            folder = keras.utils.get_file(
                fname="cifar-10-batches-py-target", origin=_CIFAR_ORIGIN, extract=True, file_hash=_CIFAR_SHA256
            )
    except Exception as err:  # noqa: BLE001 - any download failure means "offline" to the user
        reason = short(str(err).split(" -- ")[-1]) or type(err).__name__
        raise DataError(
            f"CIFAR-10 not found locally and the download failed ({reason}: {_CIFAR_ORIGIN}); {_OFFLINE_HINT} "
            f"(or download that file by hand and unpack it into {keras_cache_dir()})"
        ) from None
    dataset = read_cifar10_pickles(Path(folder) / "cifar-10-batches-py")
    dataset.origin = f"CIFAR-10 downloaded by Keras into {folder}"
    return dataset


def load(config: DataConfig, seed: int, say: Say | None = None) -> Dataset:
    """data.source=cifar10 (SOURCES)."""
    return load_cifar10(config, seed)
