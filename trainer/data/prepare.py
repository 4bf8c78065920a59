"""From a listed dataset to the one a run trains on: size, crop recipe, bad files, cache.

`load_dataset` only lists files; `prepare_dataset` decides, and says on the console:
- the training resolution (`data.image_size`, or the images' own when they share one),
- which images cannot be decoded (`data.on_bad_image=skip`: found by one parallel pass,
  so every worker and every resumed run leaves out the same files),
- whether decoded pixels are kept in memory (`data.cache`).
Every decision is a pure function of the data and the config, so a resumed run makes the
same ones and sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import tensorflow as tf

from trainer.config import DataConfig
from trainer.data.decode import decode_view, eval_view, image_problem, native_stderr_quiet, read_and_decode, tf_reason
from trainer.data.info import STATS_SAMPLE, DatasetInfo, dataset_info
from trainer.data.pipeline import InputSpec, file_paths, input_spec, resolve_crop, sample_images, sample_indices
from trainer.data.sources import Dataset, FileSplit, Split, image_sizes, load_dataset, path_bytes, shown
from trainer.errors import DataError

Say = Callable[[str], None]
# Headers read to find a dataset's own size when data.image_size is 0.
_SIZE_SAMPLE = 16
_DECODE_BATCH = 256


def prepare_dataset(dataset: Dataset, config: DataConfig, say: Say = print) -> Dataset:
    """Resolve image_size, drop unreadable files (skip policy) and fill the cache, in place."""
    if isinstance(dataset.train, Split):
        return _prepare_in_memory(dataset, config)
    if not dataset.image_size:
        dataset.image_size = config.image_size or own_size(dataset.train)
    if config.image_size:
        dataset.image_size = config.image_size
    if config.on_bad_image == "skip":
        dataset.train = skip_unreadable(dataset.train, "train", say)
        dataset.test = skip_unreadable(dataset.test, "test", say)
    crop = resolve_crop(config.crop, dataset.image_size)
    if use_memory_cache(dataset, config, crop, say):
        dataset.train = cached(dataset.train, dataset.image_size, "pad", say)
        dataset.test = cached(dataset.test, dataset.image_size, crop, say)
    return dataset


def cached(split, size: int, crop: str, say: Say = print) -> Split:
    """A file or record split decoded into memory (train: whole images resized, crop="pad";
    test: their evaluation view, so evaluation is the same cached or streamed)."""
    if isinstance(split, FileSplit):
        return Split(decode_all(split, size, crop), split.labels)
    from trainer.data.records import INDEX_FILE, decode_all_records

    decoded = Split(*decode_all_records(split, size, crop))
    if len(decoded) < len(split):  # every record was read: the recount is free
        folder, first = split.shards[0].rsplit("/", 1)
        say(
            f"Warning: the {first.split('-')[0]} shards in {folder} hold {len(decoded)} usable records, not the "
            f"{len(split)} their {INDEX_FILE} says (it is out of date; delete it to have them counted): using the "
            f"{len(decoded)}"
        )
    return decoded


def prepare_for_inference(config, say: Say = print) -> tuple[Dataset, InputSpec]:
    """The dataset as a run of `config` trained on it, without decoding the whole of it
    (cache=none: evaluation views and samples are identical either way)."""
    data = replace(config.data, cache="none")
    dataset = prepare_dataset(load_dataset(data, config.seed, progress=say), data, say)
    return dataset, input_spec(config, dataset.image_shape[0])


def training_info(dataset: Dataset, spec: InputSpec) -> tuple[DatasetInfo, np.ndarray]:
    """dataset.json's content and the training sample its statistics come from."""
    sample = sample_images(dataset.train, spec, STATS_SAMPLE)
    return dataset_info(dataset, sample), sample


def _prepare_in_memory(dataset: Dataset, config: DataConfig) -> Dataset:
    """Pixels already in memory: resized once if data.image_size asks for another size."""
    size = config.image_size
    if size and size != dataset.train.images.shape[1]:
        crop = resolve_crop(config.crop, size)
        dataset.train = Split(_resize_array(dataset.train.images, size, "pad"), dataset.train.labels)
        dataset.test = Split(_resize_array(dataset.test.images, size, crop), dataset.test.labels)
    dataset.image_size = dataset.train.images.shape[1]
    return dataset


def _resize_array(images: np.ndarray, size: int, crop: str) -> np.ndarray:
    dataset = tf.data.Dataset.from_tensor_slices(images).map(lambda image: eval_view(image, size, crop))
    return np.stack(list(dataset.as_numpy_iterator())) if len(images) else np.zeros((0, size, size, 3), np.uint8)


def own_size(split: FileSplit) -> int:
    """The images' shared square size, read from a few headers spread over the split."""
    picks = sample_indices(len(split), _SIZE_SAMPLE)
    listed = [split.path(i) for i in picks]
    readable = [(path, size) for path, size in zip(listed, image_sizes(listed)) if size is not None]
    if not readable:
        raise unreadable_error(split, picks)
    paths, sizes = [path for path, _ in readable], [size for _, size in readable]
    if len(set(sizes)) > 1:
        (w1, h1), (w2, h2) = sizes[0], next(size for size in sizes if size != sizes[0])
        other = paths[sizes.index((w2, h2))]
        raise DataError(
            f"the images have different sizes ({shown(paths[0])} is {w1}x{h1}, {shown(other)} is {w2}x{h2}); "
            "set data.image_size to the training resolution, e.g. --set data.image_size=224"
        )
    width, height = sizes[0]
    if width != height:
        raise DataError(
            f"the images are {width}x{height}, not square; set data.image_size to the (square) training "
            f"resolution, e.g. --set data.image_size={min(width, height)}"
        )
    return width


def use_memory_cache(dataset: Dataset, config: DataConfig, crop: str, say: Say) -> bool:
    """data.cache, with `auto` resolved and the reason said on the console."""
    size = dataset.image_size
    decoded = (len(dataset.train) + len(dataset.test)) * size * size * 3
    budget = config.cache_budget_gb * 2**30
    described = f"{decoded / 2**20:.0f} MiB decoded at {size}x{size}"
    if config.cache == "memory":
        say(f"Data cache: memory (data.cache=memory; {described})")
        return True
    if config.cache == "none":
        say("Data cache: none: every image is read and decoded each epoch (data.cache=none)")
        return False
    if crop == "random_resized":
        say(
            "Data cache: none: random_resized crops are taken from the full-resolution files "
            "(data.cache=auto; set data.cache=memory to crop from copies resized to data.image_size)"
        )
        return False
    if decoded > budget:
        say(f"Data cache: none: {described} is over data.cache_budget_gb={config.cache_budget_gb:g} (data.cache=auto)")
        return False
    say(f"Data cache: memory ({described}, within data.cache_budget_gb={config.cache_budget_gb:g})")
    return True


def decode_all(split: FileSplit, size: int, crop: str) -> np.ndarray:
    """Every file of a split decoded in parallel to uint8 [N, size, size, 3] (train: whole
    image resized, crop="pad"; test: its evaluation view)."""
    images = np.empty((len(split), size, size, 3), np.uint8)
    paths = tf.data.Dataset.from_tensor_slices(file_paths(split))
    views = paths.map(
        lambda path: decode_view(tf.io.read_file(path), path, size, crop),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    start = 0
    try:
        for batch in views.batch(_DECODE_BATCH).prefetch(2).as_numpy_iterator():
            images[start : start + len(batch)] = batch
            start += len(batch)
    except tf.errors.OpError:
        raise unreadable_error(split, range(start, min(start + 4 * _DECODE_BATCH, len(split)))) from None
    return images


def readable_indices(split: FileSplit, indices) -> set[int]:
    """Which of `indices` decode: one parallel pass that drops the failures."""
    paths = file_paths(split)
    checked = (
        tf.data.Dataset.from_tensor_slices(np.asarray(list(indices), np.int64))
        .map(lambda i: (i, tf.shape(read_and_decode(paths[i]))[0]), num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
    )
    with native_stderr_quiet():  # libjpeg's own complaint about each bad file, on stderr
        return {int(index) for index, _ in checked.as_numpy_iterator()}


def first_unreadable(split: FileSplit, indices) -> str | None:
    """Why the first file among `indices` that does not decode fails, or None if all decode."""
    indices = list(indices)
    readable = readable_indices(split, indices)
    bad = [i for i in indices if i not in readable]
    return describe_unreadable(split.path(bad[0])) if bad else None


def unreadable_error(split: FileSplit, indices, fallback: FileSplit | None = None) -> DataError:
    """The DataError naming the first file among `indices` (else in `fallback`, e.g. the test
    split, checked whole) that does not decode."""
    reason = first_unreadable(split, indices)
    if reason is None and fallback is not None:
        reason = first_unreadable(fallback, range(len(fallback)))
    if reason is None:
        return DataError("the input pipeline failed while decoding images (no single file could be blamed)")
    return DataError(f"{reason}; fix or remove it, or set data.on_bad_image=skip")


def describe_unreadable(path: str) -> str:
    """Why one file does not decode, in one line and in words (not TensorFlow's internals)."""
    try:
        raw = tf.io.read_file(path_bytes(path)).numpy()
    except tf.errors.OpError as err:  # gone since it was listed, or no permission
        return f"cannot read image {shown(path)}: {tf_reason(err.message)}"
    return (
        f"cannot read image {shown(path)}: {image_problem(raw, shown(path)) or 'it decodes now (a passing failure?)'}"
    )


def skip_unreadable(split, name: str, say: Say):
    """data.on_bad_image=skip: leave out what does not decode, and say which."""
    if not isinstance(split, FileSplit):
        from trainer.data.records import skip_unreadable_records

        return skip_unreadable_records(split, name, say)
    readable = readable_indices(split, range(len(split)))
    if len(readable) == len(split):
        say(f"Checked the {len(split)} {name} images: all decode")
        return split
    bad = [i for i in range(len(split)) if i not in readable]
    listed = ", ".join(shown(split.path(i)) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    say(f"Warning: skipping {len(bad)} unreadable {name} image(s) (data.on_bad_image=skip): {listed}")
    if len(readable) == 0:
        raise DataError(
            f"none of the {len(split)} {name} images can be decoded, so there is nothing to train on "
            f"({describe_unreadable(split.path(0))})"
        )
    return split.subset(np.asarray(sorted(readable), np.int64))
