"""Dataset sources: each turns `data.*` settings into decoded uint8 arrays in memory.

Decoding once up front (CIFAR-10 is 180 MB of pixels) keeps the input pipeline a cheap
gather from memory, and lets it rebuild the stream at any step without touching files.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainer.config import DataConfig
from trainer.errors import DataError
from trainer.files import short

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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Largest image decoded (width x height), checked from the header before decoding: a
# 20000x20000 PNG is a few KB on disk and 1.2 GB in memory. 64 MP is a large camera photo.
MAX_IMAGE_PIXELS = 64 * 2**20
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


@dataclass
class Split:
    """One split: images uint8 [N, H, W, C] and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    test: Split
    class_names: list[str]
    origin: str  # where the data came from, for the console and the logs

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    """Load the dataset `config.source` names, limited to `*_examples` if set."""
    if config.source == "synthetic":
        dataset = synthetic_dataset(
            config.synthetic_train_size, config.synthetic_test_size, config.synthetic_classes, seed
        )
    elif config.source == "folder":
        dataset = read_image_folder(Path(config.path), config.train_examples, config.test_examples, expected_size=None)
    else:
        dataset = load_cifar10(config)
    dataset.train = _limit(dataset.train, config.train_examples)
    dataset.test = _limit(dataset.test, config.test_examples)
    return dataset


# --- CIFAR-10 --------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """Where `keras.datasets` keeps downloads (honours KERAS_HOME like Keras does)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def keras_cifar10_folders() -> list[Path]:
    """Where Keras leaves CIFAR-10: Keras 3 extracts into cifar-10-batches-py-target/
    (holding cifar-10-batches-py/), Keras 2 into cifar-10-batches-py/."""
    cache = keras_cache_dir()
    return [cache / "cifar-10-batches-py-target", cache / "cifar-10-batches-py"]


def load_cifar10(config: DataConfig) -> Dataset:
    """Find CIFAR-10: data.path, then $CIFAR10_DIR, then the Keras cache, then download."""
    for where, value in (("data.path", config.path), ("CIFAR10_DIR", os.environ.get("CIFAR10_DIR"))):
        if value:
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise DataError(f"{where}={value} is not a folder; {_OFFLINE_HINT}")
            return _read_cifar10_folder(folder, config, where)
    for cached in keras_cifar10_folders():
        if cached.is_dir():
            return _read_cifar10_folder(cached, config, "Keras cache")
    return _download_cifar10()


def _read_cifar10_folder(folder: Path, config: DataConfig, where: str) -> Dataset:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return read_cifar10_pickles(candidate)
    if (folder / "train").is_dir():
        dataset = read_image_folder(folder, config.train_examples, config.test_examples, expected_size=(32, 32))
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
    import keras  # deferred: only this path needs it

    try:
        folder = keras.utils.get_file(
            fname="cifar-10-batches-py-target", origin=_CIFAR_ORIGIN, extract=True, file_hash=_CIFAR_SHA256
        )
    except Exception as err:  # noqa: BLE001 - any download failure means "offline" to the user
        reason = short(str(err)) or type(err).__name__
        raise DataError(f"CIFAR-10 not found locally and the download failed ({reason}); {_OFFLINE_HINT}") from err
    dataset = read_cifar10_pickles(Path(folder) / "cifar-10-batches-py")
    dataset.origin = f"CIFAR-10 downloaded by Keras into {folder}"
    return dataset


# --- image folders ---------------------------------------------------------------------


def read_image_folder(root: Path, train_limit: int, test_limit: int, expected_size: tuple[int, int] | None) -> Dataset:
    """Read `root/train/<class>/*` and `root/test/<class>/*`; classes are sorted folder names.

    Only the first `*_limit` files are decoded (taken round-robin over classes, so a small
    slice stays balanced); 0 reads everything.
    """
    train_dir, test_dir = root / "train", root / "test"
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} is missing: an image folder needs train/<class>/ and test/<class>/")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not class_names:
        raise DataError(f"{train_dir} has no class folders (expected train/<class>/images)")
    for name in class_names:
        if not name.isprintable():
            raise DataError(
                f"class folder {name!r} in {train_dir} has a line break, tab or other control character in its "
                "name; rename it (class names are written one per line, e.g. to labels.txt)"
            )
    missing = [name for name in class_names if not (test_dir / name).is_dir()]
    if missing:
        raise DataError(f"class folder {test_dir / missing[0]} is missing from the test split")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in class_names)
    if extra:
        raise DataError(f"class folder {test_dir / extra[0]} has no counterpart in {train_dir}")
    train = _read_split(train_dir, class_names, train_limit, expected_size)
    size = expected_size or train.images.shape[1:3]
    test = _read_split(test_dir, class_names, test_limit, tuple(size))
    return Dataset(train, test, class_names, f"image folder {root}")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_split(split_dir: Path, class_names: list[str], limit: int, expected_size: tuple[int, int] | None) -> Split:
    per_class = []
    for name in class_names:
        files = list_images(split_dir / name)
        if not files:
            raise DataError(f"{split_dir / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        per_class.append(files)
    # Round-robin over classes: any prefix of this order is class-balanced.
    order = [
        (files[i], label)
        for i in range(max(len(f) for f in per_class))
        for label, files in enumerate(per_class)
        if i < len(files)
    ]
    if limit:
        order = order[:limit]
    first = read_image(order[0][0])
    size = expected_size or first.shape[:2]
    images = np.empty((len(order), size[0], size[1], 3), dtype=np.uint8)
    for i, (path, _) in enumerate(order):
        pixels = read_image(path)
        if pixels.shape[:2] != tuple(size):
            raise DataError(
                f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, expected {size[1]}x{size[0]} "
                "like the rest of the dataset"
            )
        images[i] = pixels
    labels = np.asarray([label for _, label in order], dtype=np.int32)
    return Split(images, labels)


def read_image(path: Path, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 RGB [H, W, 3], naming the file if it is unusable.

    The pixel count is checked from the header before anything is decoded. `draft_size`
    (width, height) lets JPEG decode at a reduced scale when only a small copy is needed.
    """
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: our own limit, below, is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            _check_pixels(path, *image.size)
            if draft_size:
                image.draft("RGB", draft_size)
            return _rgb8(image)
    except Image.DecompressionBombError:
        raise DataError(
            f"{path} is over the {MAX_IMAGE_PIXELS / 2**20:.0f} MP limit for one image; shrink it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {short(str(err))}") from err


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path} is {width}x{height} pixels ({width * height / 2**20:.0f} MP), over the "
            f"{MAX_IMAGE_PIXELS / 2**20:.0f} MP limit for one image; shrink it first"
        )


def _rgb8(image: Image.Image) -> np.ndarray:
    """8-bit RGB. 16-bit grey ("I;16", "I") is scaled down, not clipped: PIL's own convert
    would turn every value above 255 (mid-grey is 32768) into white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return _grey_rgb8(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode == "F":
        return _grey_rgb8(np.asarray(image, dtype=np.float64))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _grey_rgb8(grey: np.ndarray) -> np.ndarray:
    """Grey values on the 0-255 scale as uint8 RGB (rounded, clipped, channel repeated)."""
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


# --- synthetic ---------------------------------------------------------------------------


def synthetic_dataset(train_size: int, test_size: int, num_classes: int, seed: int) -> Dataset:
    """Small, deterministic and learnable: each class is a fixed colour pattern plus noise.

    A few dozen steps of any CNN separate the classes, so tests can assert that accuracy
    rises; the same seed always gives the same pixels.
    """
    templates_rng = np.random.default_rng([seed, 0])
    # 4x4 coarse colour blocks upsampled to 32x32: distinct, low-frequency class patterns.
    coarse = templates_rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    templates = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)

    def split(size: int, stream: int) -> Split:
        rng = np.random.default_rng([seed, stream])
        labels = rng.integers(0, num_classes, size=size).astype(np.int32)
        noise = rng.normal(0, 56, size=(size, 32, 32, 3))
        images = np.clip(0.5 * templates[labels] + 64 + noise, 0, 255).astype(np.uint8)
        return Split(images, labels)

    names = [f"class_{i}" for i in range(num_classes)]
    return Dataset(split(train_size, 1), split(test_size, 2), names, f"synthetic (seed {seed})")


def _limit(split: Split, limit: int) -> Split:
    if not limit or limit >= len(split):
        return split
    return Split(split.images[:limit], split.labels[:limit])
