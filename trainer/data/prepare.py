"""From a listed dataset to the one a run trains on: size, crop recipe, bad files, cache.

`load_dataset` only lists files; `prepare_dataset` decides, and says on the console:
- the training resolution (`data.image_size`, or the images' own when they share one),
- which images cannot be decoded (`data.on_bad_image=skip`: found by one parallel pass,
  so every worker and every resumed run leaves out the same files),
- whether decoded pixels are kept in memory (`data.cache`); a folder both skipped and
  cached is decoded once, the failures dropped by the same pass that fills the cache.
Every decision is a pure function of the data and the config, so a resumed run makes the
same ones and sees the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from trainer.config import DataConfig
from trainer.data.decode import decode_view, each_example, eval_view, header_size, native_stderr_quiet
from trainer.data.diagnose import (
    describe_unreadable,
    first_unreadable,
    label_problem,
    readable_indices,
    undecodable,
    unreadable_records,
    window_error,
)
from trainer.data.info import STATS_SAMPLE, DatasetInfo, class_weights, dataset_info
from trainer.data.pipeline import sample_images
from trainer.data.plan import InputSpec, input_spec, resolve_crop, sample_indices
from trainer.data.records import INDEX_FILE, parse_record
from trainer.data.skips import SkipMemo
from trainer.data.sources import load_dataset
from trainer.data.splits import Dataset, Examples, FileSplit, RecordSplit, Split, path_bytes, shown
from trainer.errors import DataError
from trainer.say import Say

# Headers read to find a dataset's own size when data.image_size is 0.
_SIZE_SAMPLE = 16
_DECODE_BATCH = 256


def prepare_dataset(dataset: Dataset, config: DataConfig, say: Say = print, memo: SkipMemo | None = None) -> Dataset:
    """Resolve image_size, drop unreadable files (skip policy) and fill the cache, in place.
    `memo`: the workdir's record of unreadable files, so a resumed run does not look again."""
    class_weights(config.class_weights, dataset.class_names, dataset.train)  # a wrong name: refused before any pass
    if isinstance(dataset.train, Split):
        return _prepare_in_memory(dataset, config)
    dataset.image_size = config.image_size or dataset.image_size or own_size(dataset.train)
    crop = resolve_crop(config.crop, dataset.image_size)
    steps = _Steps(
        dataset.image_size, config.on_bad_image == "skip", use_memory_cache(dataset, config, crop, say), say, memo
    )
    dataset.train = steps.prepared(dataset.train, "train", "pad")
    dataset.test = steps.prepared(dataset.test, "test", crop)
    return dataset


@dataclass
class _Steps:
    """What preparing a split does, decided once for the dataset."""

    size: int
    skip: bool
    memory: bool
    say: Say
    memo: SkipMemo | None

    def prepared(self, split: Examples, name: str, view: str) -> Examples:
        """Leave out what does not decode (skip), then fill the memory cache: for files one
        pass does both; an earlier start's findings (memo) spare the skip pass altogether."""
        one_pass = self.skip and self.memory and _skipped_while_cached(split, view)
        known = self.memo.known(name, split) if self.skip and self.memo else None
        if known is not None:
            split, one_pass = _without(split, known, name, self.say, self.memo.path), False
        elif self.skip and not one_pass:
            split = skip_unreadable(split, name, self.say, self.memo)
        if self.memory:
            split = cached(split, self.size, view, self.say, skip=one_pass, name=name, memo=self.memo)
        return split


def _skipped_while_cached(split: Examples, view: str) -> bool:
    """Whether filling a memory cache can be the skip pass too: for files whose cached view
    decodes them whole (a random_resized view of a JPEG decodes only its window, so it
    could pass a file cut short). Records keep their own pass: it also counts them."""
    return isinstance(split, FileSplit) and view != "random_resized"


def cached(
    split: Examples,
    size: int,
    crop: str,
    say: Say = print,
    skip: bool = False,
    name: str = "train",
    memo: SkipMemo | None = None,
) -> Split:
    """A file or record split decoded into memory (train: whole images resized, crop="pad";
    test: its evaluation view, so evaluation is the same cached or streamed). `skip`: files
    that do not decode are left out (named, and remembered in `memo`), as data.on_bad_image=
    skip's own pass would."""
    if isinstance(split, Split):
        return split
    images, labels, indices = decode_all(split, size, crop, drop_failures=skip)
    if skip:
        bad = _missing(len(split), indices)
        _without_files(split, bad, name, say)
        if memo:
            memo.remember(name, split, bad)
    if isinstance(split, RecordSplit):
        _check_records(split, labels, indices, say)
    return Split(images, labels)


def _missing(count: int, present: np.ndarray) -> list[int]:
    """The indices in [0, count) not in `present`."""
    return np.setdiff1d(np.arange(count), present).tolist()


def _check_records(split: RecordSplit, labels: np.ndarray, ordinals: np.ndarray, say: Say) -> None:
    wrong = label_problem(split, labels, ordinals)
    if wrong:
        raise wrong
    if len(labels) < len(split):  # every record was read: the recount is free
        first = split.shards[0].rsplit("/", 1)[1]
        say(
            f"Warning: the {first.split('-')[0]} shards in {split.folder} hold {len(labels)} usable records, not the "
            f"{len(split)} their {INDEX_FILE} says (it is out of date; delete it to have them counted): using the "
            f"{len(labels)}"
        )


def prepare_for_inference(config, say: Say = print, memo: SkipMemo | None = None) -> tuple[Dataset, InputSpec]:
    """The dataset as a run of `config` trained on it, without decoding the whole of it
    (cache=none: evaluation views and samples are identical either way). `memo`: the
    training run's skip findings, read only (evaluating writes nothing)."""
    data = replace(config.data, cache="none")
    dataset = prepare_dataset(load_dataset(data, config.seed, progress=say), data, say, memo)
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


# --- the images' own size ---------------------------------------------------------------------


def header_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """(width, height) of image files from their headers (trainer.data.decode.header_size,
    the reader the pipeline's pixel limit uses); None for a file that is not a readable image
    (decoding it names it later)."""
    sizes: list[tuple[int, int] | None] = []
    with native_stderr_quiet():
        for path in paths:
            try:
                height, width = (int(value) for value in header_size(tf.io.read_file(path_bytes(path))))
            except tf.errors.OpError:
                height = width = 0
            sizes.append((width, height) if height and width else None)
    return sizes


def own_size(split: FileSplit) -> int:
    """The images' shared square size, read from a few headers spread over the split."""
    picks = sample_indices(len(split), _SIZE_SAMPLE)
    listed = [split.path(i) for i in picks]
    readable = [(path, size) for path, size in zip(listed, header_sizes(listed)) if size is not None]
    if not readable:
        raise first_unreadable(split, picks) or DataError(
            f"none of the images sampled from {shown(split.folders[0])}'s split has a readable size"
        )
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


# --- the memory cache ----------------------------------------------------------------------


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


def _view_batches(split: FileSplit | RecordSplit, size: int, crop: str, drop_failures: bool) -> tf.data.Dataset:
    """Batches of (views, labels, indices) of every example, in the split's order, decoded
    in parallel: a batch in one call (each_example), or example by example when failures
    are dropped (ignore_errors drops the failed element: a batch's good images with the bad)."""
    view, items = _view_of(split, size, crop)
    if drop_failures:
        views = items.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return views.ignore_errors().batch(_DECODE_BATCH)
    signature = (tf.TensorSpec([size, size, 3], tf.uint8), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int64))

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def views(*batch: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return each_example(lambda item: view(*item), batch, signature)

    return items.batch(_DECODE_BATCH).map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _view_of(split: FileSplit | RecordSplit, size: int, crop: str) -> tuple[Callable, tf.data.Dataset]:
    """(one item -> (view, label, index), the split's items in order)."""
    if isinstance(split, RecordSplit):

        @tf.autograph.experimental.do_not_convert  # tensor-only (tf.cond, tf.where): tracing needs no AutoGraph
        def record_view(ordinal, raw):
            encoded, _, label = parse_record(raw)
            return decode_view(encoded, size, crop), label, ordinal

        return record_view, split.raw_records()
    paths, labels = split.paths(), tf.constant(split.labels, tf.int32)

    @tf.autograph.experimental.do_not_convert  # AutoGraph converted ~50 decode functions per pipeline built
    def file_view(index):
        return decode_view(tf.io.read_file(tf.gather(paths, index)), size, crop), tf.gather(labels, index), index

    return file_view, tf.data.Dataset.range(len(split))


def decode_all(
    split: FileSplit | RecordSplit, size: int, crop: str, drop_failures: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every example decoded in parallel: uint8 [N, size, size, 3] (train: whole image
    resized, crop="pad"; test: its evaluation view), labels [N] and each one's index (file
    index or record ordinal). N is what the split holds: fewer than `len(split)` when shards
    promised more, or when `drop_failures` leaves out what does not decode. Otherwise a
    failure is one DataError naming the file or record."""
    images, labels = np.empty((len(split), size, size, 3), np.uint8), np.empty(len(split), np.int32)
    indices = np.empty(len(split), np.int64)
    start = 0
    try:
        with native_stderr_quiet() if drop_failures else contextlib.nullcontext():
            batches = _view_batches(split, size, crop, drop_failures).prefetch(2)
            for batch_images, batch_labels, batch_indices in batches.as_numpy_iterator():
                end = start + len(batch_labels)
                images[start:end], labels[start:end], indices[start:end] = batch_images, batch_labels, batch_indices
                start = end
    except tf.errors.OpError:
        raise window_error(split, range(start, min(start + 4 * _DECODE_BATCH, len(split)))) from None
    return images[:start], labels[:start], indices[:start]


# --- data.on_bad_image=skip ----------------------------------------------------------------


def skip_unreadable(split: Examples, name: str, say: Say, memo: SkipMemo | None = None) -> Examples:
    """data.on_bad_image=skip: leave out what does not decode, and say which."""
    if isinstance(split, Split):
        return split
    if isinstance(split, RecordSplit):
        bad = unreadable_records(split)
    else:
        bad = _missing(len(split), np.fromiter(readable_indices(split, range(len(split))), np.int64))
    if memo:
        memo.remember(name, split, bad)
    return _without(split, bad, name, say)


def _without(split: FileSplit | RecordSplit, bad: list[int], name: str, say: Say, earlier: str = "") -> Examples:
    """The split without the examples `bad` (found now, or at an `earlier` start: that
    file's path), which are named on the console."""
    if isinstance(split, RecordSplit):
        return _without_records(split, bad, name, say, earlier)
    return _without_files(split, bad, name, say, earlier)


def _without_files(split: FileSplit, bad: list[int], name: str, say: Say, earlier: str = "") -> FileSplit:
    """Name the files left out (`bad`, sorted indices); the split without them."""
    when = f" (found at an earlier start: {earlier})" if earlier else ""
    if not bad:
        say(f"Checked the {len(split)} {name} images: all decode{when}")
        return replace(split, checked=True)
    listed = ", ".join(shown(split.path(i)) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    say(f"Warning: skipping {len(bad)} unreadable {name} image(s) (data.on_bad_image=skip{when}): {listed}")
    if len(bad) == len(split):
        raise DataError(
            f"none of the {len(split)} {name} images can be decoded, so there is nothing to "
            f"{'train on' if name == 'train' else 'evaluate'} "
            f"({describe_unreadable(split.path(0))})"
        )
    return replace(split.subset(_missing(len(split), np.asarray(bad, np.int64))), checked=True)


def _without_records(split: RecordSplit, bad: list[int], name: str, say: Say, earlier: str = "") -> RecordSplit:
    """data.on_bad_image=skip for shards: the records that do not decode left out, and named."""
    if not bad:
        return replace(split, checked=True)
    if len(bad) == sum(split.counts):
        first = next(split.raw_records().take(1).as_numpy_iterator())
        raise DataError(
            f"none of the {len(bad)} {name} records holds a decodable image, so there is nothing to "
            f"{'train on' if name == 'train' else 'evaluate'} (first: {undecodable(split, *first)})"
        )
    places = "; ".join(split.place(ordinal) for ordinal in bad[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    )
    when = f"; found at an earlier start: {earlier}" if earlier else ""
    say(f"Warning: skipping {len(bad)} unreadable {name} record(s) (data.on_bad_image=skip{when}): {places}")
    return replace(split, skipped=tuple(bad), checked=True)
