"""Dataset sources: each turns `data.*` settings into examples the input pipeline can index.

Two kinds of split. `Split`: decoded uint8 pixels in memory (CIFAR-10's pickles, the
synthetic set, any cached dataset). `FileSplit`: image files listed, not decoded, at start
(each is read and decoded inside tf.data when a batch needs it), so a folder of any size
and any image sizes costs a file name per image until then. TFRecord shards are in
trainer.data.records.
"""

from __future__ import annotations

import errno
import os
import pickle
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from trainer import storage
from trainer.config import DataConfig
from trainer.data.decode import MAX_IMAGE_PIXELS
from trainer.errors import DataError
from trainer.files import short
from trainer.storage import is_url

Progress = Callable[[str], None]
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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
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


def path_bytes(path: str) -> bytes:
    """A listed path as the file system's own bytes. A name that is not UTF-8 (Latin-1
    `caf\\xe9.jpg` from an old share) is listed with surrogate escapes, as Python's os does;
    this turns it back into the bytes that open that very file (TensorFlow takes bytes)."""
    return path.encode("utf-8", "surrogateescape")


def shown(path: str) -> str:
    """A path fit for a message: as it is, or its bytes' repr if it is not UTF-8 (printing
    surrogate escapes would fail, or show a replacement character the user cannot type)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(path_bytes(path))[1:]
    return path


@dataclass
class Split:
    """One split in memory: images uint8 [N, H, W, C] and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def limited(self, limit: int) -> Split:
        return self if not limit or limit >= len(self) else Split(self.images[:limit], self.labels[:limit])

    def subset(self, keep: np.ndarray) -> Split:
        return Split(self.images[keep], self.labels[keep])


@dataclass
class FileSplit:
    """One split as files: example i is `folders[labels[i]]/names[i]`.

    Names are kept relative to their class folder: a 500,000-file dataset holds 500,000
    short names and one folder per class, not 500,000 full paths.
    """

    folders: list[str]
    names: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def round_robin(cls, folders: list[str], files: list[list[str]]) -> FileSplit:
        """Interleave the classes' sorted files: any prefix of this order is class-balanced."""
        names, labels = [], []
        for i in range(max(len(f) for f in files)):
            for label, class_files in enumerate(files):
                if i < len(class_files):
                    names.append(class_files[i])
                    labels.append(label)
        return cls(folders, names, np.asarray(labels, np.int32))

    def path(self, index: int) -> str:
        return f"{self.folders[self.labels[index]]}/{self.names[index]}"

    def limited(self, limit: int) -> FileSplit:
        if not limit or limit >= len(self):
            return self
        return FileSplit(self.folders, self.names[:limit], self.labels[:limit])

    def subset(self, keep: np.ndarray) -> FileSplit:
        return FileSplit(self.folders, [self.names[i] for i in keep], self.labels[keep])


@dataclass
class Dataset:
    train: Split | FileSplit
    test: Split | FileSplit
    class_names: list[str]
    origin: str  # where the data came from, for the console and the logs
    # The training resolution when the images are not in memory yet (files, records).
    image_size: int = 0
    notes: list[str] = field(default_factory=list)  # what preparing it decided, for the console

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if isinstance(self.train, Split):
            return tuple(self.train.images.shape[1:])  # type: ignore[return-value]
        return (self.image_size, self.image_size, 3)


def load_dataset(config: DataConfig, seed: int, progress: Progress | None = None) -> Dataset:
    """Find and list (or, for small in-memory sources, read) the dataset `config.source` names,
    limited to `*_examples` if set. Image files are not decoded here: see trainer.data.prepare."""
    if config.source == "synthetic":
        dataset = synthetic_dataset(
            config.synthetic_train_size, config.synthetic_test_size, config.synthetic_classes, seed
        )
    elif config.source == "folder":
        return read_image_folder(config.path, config, seed, progress)
    elif config.source == "tfrecord":
        from trainer.data.records import read_record_dataset

        return read_record_dataset(config, progress)
    else:
        dataset = load_cifar10(config, seed)
    dataset.train = dataset.train.limited(config.train_examples)
    dataset.test = dataset.test.limited(config.test_examples)
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
    import keras  # deferred: only this path needs it

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


# --- image folders ---------------------------------------------------------------------


def read_image_folder(
    root: str,
    config: DataConfig,
    seed: int,
    progress: Progress | None = None,
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

    def __init__(self, progress: Progress | None, skip: bool, spelling: Spelling) -> None:
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


def image_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """(width, height) of image files from their headers only (PIL reads no pixels here);
    None for a file that is not a readable image (decoding it names it later)."""
    sizes: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            with tf.io.gfile.GFile(path_bytes(path), "rb") as handle, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    sizes.append(image.size)
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            tf.errors.OpError,
            Image.DecompressionBombError,
        ):
            sizes.append(None)
    return sizes


def read_image(path: Path, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 RGB [H, W, 3], naming the file if it is unusable.

    The pixel count is checked from the header before anything is decoded. `draft_size`
    (width, height) lets JPEG decode at a reduced scale when only a small copy is needed.
    A pipe or device is refused first: open() on a FIFO waits for a writer forever.
    """
    kind = storage.special_kind(path)
    if kind:
        raise DataError(f"{path} is not a regular file ({kind}); name an image file")
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
