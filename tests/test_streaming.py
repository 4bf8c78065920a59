"""Your own images at any size: listed folders streamed through tf.data, TFRecord shards,
the cache, bad files, ram:// and exact resume of streamed sources (issue #14)."""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import smoke_config
from tests.test_fault_tolerance import _checkpoint_tensors
from trainer.config import DataConfig
from trainer.data import loader
from trainer.data.convert import convert
from trainer.data.pipeline import eval_dataset_fn, train_dataset_fn
from trainer.data.plan import InputSpec
from trainer.data.prepare import prepare_dataset
from trainer.data.skips import SkipMemo
from trainer.data.sources import load_dataset
from trainer.data.sources.synthetic import synthetic_dataset
from trainer.data.splits import FileSplit, Split
from trainer.errors import DataError
from trainer.preemption import EXIT_PREEMPTED
from trainer.training import train

CLASSES = ("ant", "bee", "cat")
# Sizes and encodings a folder of real photos mixes: (width, height, format, PIL mode).
KINDS = (
    (40, 30, "JPEG", "RGB"),
    (64, 48, "PNG", "RGBA"),
    (33, 33, "PNG", "I;16"),
    (50, 70, "BMP", "RGB"),
    (36, 36, "GIF", "P"),
    (48, 40, "WEBP", "RGB"),
)
SUFFIX = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}


def quiet(_line: str) -> None:
    pass


def global_batches(dataset_fn, workers: int = 1, replicas_per_worker: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each step's global batch (images, labels), put back together from every worker's
    pipeline: worker w yields its replicas' slices of a step one after another."""
    per_worker = []
    for worker in range(workers):
        context = tf.distribute.InputContext(workers, worker, workers * replicas_per_worker)
        per_worker.append([(e[0].numpy(), e[1].numpy()) for e in dataset_fn(context)])
    steps = len(per_worker[0]) // replicas_per_worker
    batches = []
    for step in range(steps):
        slices = [
            e
            for elements in per_worker
            for e in elements[step * replicas_per_worker : (step + 1) * replicas_per_worker]
        ]
        batches.append((np.concatenate([i for i, _ in slices]), np.concatenate([lab for _, lab in slices])))
    return batches


def _encoded(pixels: np.ndarray, width: int, height: int, fmt: str, mode: str) -> bytes:
    image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_mixed_folder(root: str, per_class: int = 24, layout: str = "split", seed: int = 0) -> str:
    """A learnable folder (the synthetic class patterns) of mixed sizes, formats and modes,
    written through tf.io.gfile so `root` may be a ram:// URL."""
    data = synthetic_dataset(per_class * len(CLASSES) * 4, 8, len(CLASSES), seed)
    count = {name: 0 for name in CLASSES}
    for i, (pixels, label) in enumerate(zip(data.train.images, data.train.labels)):
        name = CLASSES[label]
        if count[name] >= 2 * per_class:
            continue
        split = ("train" if count[name] % 2 == 0 else "test") if layout == "split" else ""
        width, height, fmt, mode = KINDS[i % len(KINDS)]
        folder = "/".join(part for part in (root, split, name) if part)
        tf.io.gfile.makedirs(folder)
        with tf.io.gfile.GFile(f"{folder}/{i:04d}.{SUFFIX[fmt]}", "wb") as handle:
            handle.write(_encoded(pixels, width, height, fmt, mode))
        count[name] += 1
    return root


# For runs whose tests look at the final evaluation or the weights only: no evaluation but
# the one every run makes at its end (an interval past the run's epochs), no TensorBoard images.
FINAL_EVAL_ONLY = ("train.eval_every_epochs=100", "tensorboard.images=false")


def _config(path: str, *overrides: str):
    return smoke_config(
        "data.source=folder",
        f"data.path={path}",
        "data.image_size=24",
        "data.batch_size=16",
        "model.width=8",
        "train.steps_per_loop=3",
        "runtime.deterministic=true",
        *overrides,
    )


def test_a_folder_of_mixed_sizes_formats_and_modes_trains_evaluates_and_predicts(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"))
    config = _config(root, "train.epochs=4", "data.cache=none", "train.eval_every_epochs=4")  # the final one counts
    result = train(config, tmp_path / "run", echo=quiet)
    assert result.step == 4 * (72 // 16) and result.final_eval.examples == 72
    assert result.final_eval.accuracy > 0.6  # three learnable classes, from every kind of file
    runner = CliRunner()
    evaluated = runner.invoke(cli, ["evaluate", "--workdir", str(tmp_path / "run")])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"Test accuracy {result.final_eval.accuracy:.2%}" in evaluated.output  # streamed eval = training's
    photo = next((tmp_path / "photos" / "test" / "bee").glob("*.png"))
    predicted = runner.invoke(cli, ["predict", "--workdir", str(tmp_path / "run"), "--json", str(photo)])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output.splitlines()[-1])["label"] in CLASSES
    grid = runner.invoke(
        cli, ["data", "show", "--out", str(tmp_path / "grid.png"), "--augmented", "--config", _yaml(tmp_path, config)]
    )
    assert grid.exit_code == 0, grid.output
    assert Image.open(tmp_path / "grid.png").size[0] > 24 * 4


def _yaml(tmp_path, config) -> str:
    from trainer.config import save_config

    path = tmp_path / "config.yaml"
    save_config(config, path)
    return str(path)


def test_mixed_sizes_without_image_size_is_one_error_line(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    result = CliRunner().invoke(
        cli,
        ["train", "--config", "configs/smoke.yaml", "--workdir", str(tmp_path / "w"), "--set", "data.source=folder"]
        + ["--set", f"data.path={root}"],
    )
    assert result.exit_code == 2
    assert result.output.count("Error:") == 1 and "set data.image_size" in result.output
    assert not (tmp_path / "w").exists()  # nothing written


def test_the_validation_split_is_stratified_and_fixed_by_the_seed(tmp_path):
    root = write_mixed_folder(str(tmp_path / "tree"), per_class=10, layout="tree")  # 20 files a class
    config = DataConfig(source="folder", path=root, validation_split=0.25)
    first, again = load_dataset(config, seed=3), load_dataset(config, seed=3)
    other = load_dataset(config, seed=4)
    assert np.bincount(first.test.labels).tolist() == [5, 5, 5]
    assert np.bincount(first.train.labels).tolist() == [15, 15, 15]
    assert first.test.names == again.test.names and first.train.names == again.train.names
    assert first.test.names != other.test.names
    assert not set(first.test.names) & set(first.train.names)
    with pytest.raises(DataError, match="set data.validation_split"):
        load_dataset(DataConfig(source="folder", path=root), seed=0)


def test_streamed_and_cached_batches_are_identical(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    data = DataConfig(source="folder", path=root, image_size=24, cache="none")
    streamed = prepare_dataset(load_dataset(data, 0), data, quiet)
    cached = DataConfig(source="folder", path=root, image_size=24, cache="memory")
    in_memory = prepare_dataset(load_dataset(cached, 0), cached, quiet)
    assert isinstance(streamed.train, FileSplit) and isinstance(in_memory.train, Split)
    spec = InputSpec(global_batch=8, seed=5, augment=True, crop_padding=2, image_size=24)
    a = global_batches(train_dataset_fn(streamed.train, spec, 0, 6))
    b = global_batches(train_dataset_fn(in_memory.train, spec, 0, 6))
    assert len(a) == len(b) == 6
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def _evaluated(dataset_fn) -> list[np.ndarray]:
    return [np.asarray(column) for column in zip(*(e for e in dataset_fn(tf.distribute.InputContext())))]


def test_streamed_batches_do_not_depend_on_the_chunks_a_slice_is_decoded_in(tmp_path, monkeypatch):
    """A slice is decoded a chunk of examples per call (trainer.data.loader.CHUNK), joined
    in order: chunks of 1 and 5 (a batch of 12 in 3 of 4, of 10 in 2 of 5) give the cached
    pixels (pad), the crops of one chunk a slice (random_resized, CHUNK as shipped) and the
    cached padded evaluation."""
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    data = DataConfig(source="folder", path=root, image_size=24, cache="none")
    streamed = prepare_dataset(load_dataset(data, 0), data, quiet)
    cached = DataConfig(source="folder", path=root, image_size=24, cache="memory")
    in_memory = prepare_dataset(load_dataset(cached, 0), cached, quiet)
    pad = InputSpec(global_batch=12, seed=5, augment=True, crop_padding=2, image_size=24)
    resized = replace(pad, crop="random_resized")
    evaluation = replace(pad, global_batch=10, augment=False)
    expected = {
        "pad": global_batches(train_dataset_fn(in_memory.train, pad, 0, 2)),
        "random_resized": global_batches(train_dataset_fn(streamed.train, resized, 0, 2)),  # one chunk a slice
    }
    expected_eval = _evaluated(eval_dataset_fn(in_memory.test, evaluation))
    assert len(streamed.test) % 10 and len(expected_eval[0]) == -(-len(streamed.test) // 10)  # a padded last batch
    for chunk in (1, 5):
        monkeypatch.setattr(loader, "CHUNK", chunk)
        for spec in (pad, resized):
            batches = global_batches(train_dataset_fn(streamed.train, spec, 0, 2))
            for (images, labels), (want_images, want_labels) in zip(batches, expected[spec.crop], strict=True):
                np.testing.assert_array_equal(images, want_images)
                np.testing.assert_array_equal(labels, want_labels)
        for column, want in zip(_evaluated(eval_dataset_fn(streamed.test, evaluation)), expected_eval, strict=True):
            np.testing.assert_array_equal(column, want)


def test_a_slice_is_cut_into_the_fewest_even_chunks_of_at_most_chunk_examples():
    assert [loader._parts(size) for size in (128, 32, 33, 96, 30, 37, 64, 1, None)] == [4, 1, 3, 3, 1, 37, 2, 1, 1]


@pytest.mark.parametrize("crop", ["pad", "random_resized"])
def test_a_streamed_source_gives_the_same_batches_on_1_and_2_replicas_and_2_workers(tmp_path, crop):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    data = DataConfig(source="folder", path=root, image_size=24, cache="none")
    split = prepare_dataset(load_dataset(data, 0), data, quiet).train
    spec = InputSpec(global_batch=8, seed=1, augment=True, crop=crop, image_size=24)
    fn = train_dataset_fn(split, spec, 0, 6)
    single = global_batches(fn)
    assert len(single) == 6
    for workers, replicas in ((1, 2), (2, 1)):
        for (images, labels), (expected_images, expected_labels) in zip(global_batches(fn, workers, replicas), single):
            np.testing.assert_array_equal(images, expected_images)
            np.testing.assert_array_equal(labels, expected_labels)


def _stop_and_resume(tmp_path, config, stop_at: int, name: str, echo=quiet):
    os.environ["TRAINER_STOP_AT_STEP"] = str(stop_at)
    try:
        stopped = train(config, tmp_path / name, echo=quiet)
    finally:
        del os.environ["TRAINER_STOP_AT_STEP"]
    assert stopped.exit_code == EXIT_PREEMPTED and stopped.step == stop_at
    return train(config, tmp_path / name, echo=echo)


@pytest.mark.parametrize("source", ["folder", "tfrecord"])
def test_a_streamed_source_resumes_exactly_mid_epoch(tmp_path, source):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=16)
    if source == "tfrecord":
        convert(root, str(tmp_path / "shards"), shard_size_mb=0.02, progress=quiet)  # several shards
        root = str(tmp_path / "shards")
    config = _config(
        root,
        f"data.source={source}",
        "data.cache=none",
        "data.crop=random_resized",
        "train.epochs=2",
        *FINAL_EVAL_ONLY,
    )
    straight = train(config, tmp_path / "straight", echo=quiet)
    total = straight.step
    resumed = _stop_and_resume(tmp_path, config, 5, "resumed")  # step 5 of 6 per epoch
    assert resumed.step == total
    expected = _checkpoint_tensors(str(tmp_path / "straight" / "checkpoints" / f"ckpt-{total}"))
    actual = _checkpoint_tensors(str(tmp_path / "resumed" / "checkpoints" / f"ckpt-{total}"))
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_tfrecord_from_convert_matches_the_folder_it_came_from(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=16)
    result = CliRunner().invoke(
        cli, ["data", "convert", "--from", root, "--to", str(tmp_path / "shards"), "--shard-size", "0.02"]
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 48 train records in" in result.output
    again = CliRunner().invoke(cli, ["data", "convert", "--from", root, "--to", str(tmp_path / "shards")])
    assert again.exit_code == 2 and "not empty" in again.output  # never writes over shards
    shards, common = str(tmp_path / "shards"), ("train.epochs=3", *FINAL_EVAL_ONLY)
    folder = train(_config(root, *common, "data.cache=memory"), tmp_path / "folder", echo=quiet)
    records = train(_config(shards, "data.source=tfrecord", *common, "data.cache=memory"), tmp_path / "rec", echo=quiet)
    # Cached, the records are the folder's files in the same order: the very same run.
    assert records.final_eval.accuracy == folder.final_eval.accuracy
    assert records.final_eval.loss == pytest.approx(folder.final_eval.loss, rel=1e-6)
    streamed = train(
        _config(shards, "data.source=tfrecord", *common, "data.cache=none"), tmp_path / "streamed", echo=quiet
    )
    assert abs(streamed.final_eval.accuracy - folder.final_eval.accuracy) < 0.2  # another order: within noise


def test_data_on_a_ram_filesystem_trains_from_a_folder_and_from_tfrecord(tmp_path):
    root = write_mixed_folder("ram://streaming-test/photos", per_class=8)
    folder = train(_config(root, "train.epochs=1", "data.cache=none"), tmp_path / "folder", echo=quiet)
    assert folder.step == 24 // 16 and folder.final_eval.examples == 24
    convert(root, "ram://streaming-test/shards", progress=quiet)
    assert tf.io.gfile.exists("ram://streaming-test/shards/labels.txt")
    records = train(
        _config("ram://streaming-test/shards", "data.source=tfrecord", "train.epochs=1", "data.cache=none"),
        tmp_path / "records",
        echo=quiet,
    )
    assert records.step == folder.step and records.final_eval.examples == 24


def _plant_bad_files(root: str) -> list[str]:
    truncated = f"{root}/train/cat/zz-truncated.jpg"
    whole = (
        tf.io.gfile.GFile(f"{root}/train/cat/0000.jpg", "rb").read()
        if tf.io.gfile.exists(f"{root}/train/cat/0000.jpg")
        else _encoded(np.zeros((8, 8, 3), np.uint8), 40, 30, "JPEG", "RGB")
    )
    with tf.io.gfile.GFile(truncated, "wb") as handle:
        handle.write(whole[: len(whole) // 3])
    text = f"{root}/train/bee/zz-notes.png"
    with tf.io.gfile.GFile(text, "wb") as handle:
        handle.write(b"not an image at all")
    return [truncated, text]


def test_a_bad_image_met_while_streaming_is_one_line_naming_it(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    bad = _plant_bad_files(root)
    config = _config(root, "train.epochs=1", "data.cache=none")
    with pytest.raises(DataError) as err:  # the stats sample reads a spread of training files first
        train(config, tmp_path / "run", echo=quiet)
    assert "cannot read image" in str(err.value) and any(path in str(err.value) for path in bad)


@pytest.mark.parametrize("images", ["true", "false"])  # met by the TensorBoard sample, or first at an evaluation
def test_a_bad_test_image_is_named(tmp_path, images):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    broken = f"{root}/test/ant/zz-broken.jpg"
    with open(broken, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 truncated")
    config = _config(root, "train.epochs=1", "data.cache=none", f"tensorboard.images={images}")
    with pytest.raises(DataError) as err:
        train(config, tmp_path / "run", echo=quiet)
    message = str(err.value)
    assert f"cannot read image {broken}" in message
    assert "data.on_bad_image=skip" in message and "\n" not in message


def test_skipped_images_are_counted_and_the_same_after_a_resume(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=16)
    bad = _plant_bad_files(root)
    lines: list[str] = []
    config = _config(root, "train.epochs=2", "data.cache=none", "data.on_bad_image=skip", *FINAL_EVAL_ONLY)
    straight = train(config, tmp_path / "straight", echo=lines.append)
    warning = next(line for line in lines if "skipping" in line)
    assert "skipping 2 unreadable train image(s)" in warning and all(path in warning for path in bad)
    resumed_lines: list[str] = []
    resumed = _stop_and_resume(tmp_path, config, 4, "resumed", echo=resumed_lines.append)
    total = straight.step
    assert resumed.step == total == 2 * (48 // 16)  # the 2 bad files are out of every epoch
    # The resumed start did not decode every image again: the first start's findings were kept.
    assert (tmp_path / "resumed" / "unreadable.json").is_file()
    again = next(line for line in resumed_lines if "skipping" in line)
    assert "skipping 2 unreadable train image(s)" in again and "found at an earlier start" in again
    expected = _checkpoint_tensors(str(tmp_path / "straight" / "checkpoints" / f"ckpt-{total}"))
    actual = _checkpoint_tensors(str(tmp_path / "resumed" / "checkpoints" / f"ckpt-{total}"))
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_skip_with_a_memory_cache_decodes_once_and_caches_what_two_passes_would(tmp_path, monkeypatch):
    """on_bad_image=skip + cache=memory: filling the cache is the skip pass (#25), so each
    file is decoded once at start, and the cached pixels are those of skip-then-cache."""
    from trainer.data import prepare

    root = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    bad = _plant_bad_files(root)
    two_passes = DataConfig(source="folder", path=root, image_size=24, on_bad_image="skip", cache="none")
    streamed = prepare_dataset(load_dataset(two_passes, 0), two_passes, quiet)
    expected_train = prepare.cached(streamed.train, 24, "pad")
    passes: list[int] = []
    decode_all = prepare.decode_all
    monkeypatch.setattr(
        prepare, "decode_all", lambda split, *args, **kw: passes.append(len(split)) or decode_all(split, *args, **kw)
    )
    monkeypatch.setattr(prepare, "readable_indices", lambda *_: pytest.fail("a second decoding pass"))
    lines: list[str] = []
    one_pass = DataConfig(source="folder", path=root, image_size=24, on_bad_image="skip", cache="memory")
    cached = prepare_dataset(load_dataset(one_pass, 0), one_pass, lines.append)
    assert passes == [len(streamed.train) + len(bad), len(streamed.test)]  # every listed file, once
    warning = next(line for line in lines if "skipping" in line)
    assert "skipping 2 unreadable train image(s)" in warning and all(path in warning for path in bad)
    assert "Checked the 12 test images: all decode" in lines
    np.testing.assert_array_equal(cached.train.labels, expected_train.labels)
    np.testing.assert_array_equal(cached.train.images, expected_train.images)


def _skipping(root: str, memo: SkipMemo, cache: str = "none"):
    lines: list[str] = []
    memo.say = lines.append
    config = DataConfig(source="folder", path=root, image_size=24, on_bad_image="skip", cache=cache)
    prepared = prepare_dataset(load_dataset(config, 0), config, lines.append, memo)
    memo.save()  # as the trainer does once it holds the workdir
    return prepared, lines


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_skip_findings_are_kept_in_the_workdir_and_spare_the_next_start_the_pass(tmp_path, monkeypatch, cache):
    from trainer.data import prepare

    root = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    bad = _plant_bad_files(root)
    (tmp_path / "run").mkdir()
    memo_path = str(tmp_path / "run" / "unreadable.json")
    first, _ = _skipping(root, SkipMemo(memo_path, quiet), cache)
    saved = json.loads((tmp_path / "run" / "unreadable.json").read_text())
    assert len(saved["train"]["unreadable"]) == 2 and saved["test"]["unreadable"] == []
    monkeypatch.setattr(prepare, "readable_indices", lambda *_: pytest.fail("the images were checked again"))
    decodes: list[bool] = []
    decode_all = prepare.decode_all
    monkeypatch.setattr(
        prepare, "decode_all", lambda *args, **kw: decodes.append(kw["drop_failures"]) or decode_all(*args, **kw)
    )
    again, lines = _skipping(root, SkipMemo(memo_path, quiet), cache)
    warning = next(line for line in lines if "skipping" in line)
    assert "skipping 2 unreadable train image(s)" in warning and "found at an earlier start" in warning
    assert all(path in warning for path in bad)
    assert len(again.train) == len(first.train) and len(again.test) == len(first.test)
    np.testing.assert_array_equal(again.train.labels, first.train.labels)
    assert decodes == ([False, False] if cache == "memory" else [])  # only the kept files, once


def test_a_changed_file_or_a_damaged_record_of_skips_means_checking_again(tmp_path):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    _plant_bad_files(root)
    memo_path = tmp_path / "unreadable.json"
    _skipping(root, SkipMemo(str(memo_path), quiet))
    changed = sorted((tmp_path / "photos" / "train" / "ant").iterdir())[0]
    with open(changed, "ab") as handle:  # a file changed since (a byte after its end: it still decodes)
        handle.write(b"\0")
    _, lines = _skipping(root, SkipMemo(str(memo_path), quiet))
    assert "The train images differ from those" in "\n".join(lines)
    assert not any("earlier start" in line for line in lines if " train " in line)
    saved = json.loads(memo_path.read_text())
    saved["train"]["unreadable"] = [0, 10**9]  # hostile: an index past the listing
    memo_path.write_text(json.dumps(saved))
    _, lines = _skipping(root, SkipMemo(str(memo_path), quiet))
    assert any("damaged 'train' entry" in line for line in lines)
    memo_path.write_text("{not json")
    split, lines = _skipping(root, SkipMemo(str(memo_path), quiet))
    assert any("is damaged" in line for line in lines) and any("skipping 2 unreadable" in line for line in lines)
    assert json.loads(memo_path.read_text())["train"]["unreadable"]  # rebuilt


@pytest.mark.parametrize("edit", ["unsorted", "every", "version_true"])
def test_an_entry_of_skips_the_trainer_never_writes_is_damage(tmp_path, edit):
    """Review of #25: indices out of order (a TFRecord split searches them as a sorted list,
    so its bad records stayed in while the console said they were skipped), every example
    unreadable (a start that found that wrote nothing: it ended), a version of `true`."""
    from tests.test_hostile_data import bad_records, good_records, write_shards

    shards = write_shards(tmp_path / "shards", good_records(4) + bad_records() + good_records(4), good_records())
    memo_path = tmp_path / "unreadable.json"
    config = DataConfig(source="tfrecord", path=str(shards), image_size=16, on_bad_image="skip", cache="none")
    memo = SkipMemo(str(memo_path), quiet)
    prepare_dataset(load_dataset(config, 0), config, quiet, memo)
    memo.save()
    saved = json.loads(memo_path.read_text())
    assert saved["train"]["unreadable"] == [4, 5]
    if edit == "unsorted":
        saved["train"]["unreadable"] = [5, 4]
    elif edit == "every":
        saved["train"]["unreadable"] = list(range(10))
    else:
        saved["version"] = True
    memo_path.write_text(json.dumps(saved))
    lines: list[str] = []
    dataset = prepare_dataset(load_dataset(config, 0), config, lines.append, SkipMemo(str(memo_path), lines.append))
    assert any("damaged 'train' entry" in line or "not one this version wrote" in line for line in lines), lines
    assert dataset.train.skipped == (4, 5)  # checked again
    ordinals = [int(ordinal) for ordinal, _ in dataset.train.raw_records().as_numpy_iterator()]
    assert ordinals == [0, 1, 2, 3, 6, 7, 8, 9]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", [True, False])
def test_a_shard_that_cannot_be_opened_is_one_line_not_a_hang(tmp_path, index):
    """Review of #25: a listed shard that is a broken link (or gone since it was listed)
    made the skip pass spin forever (tf.data's ignore_errors retries the failed reader);
    without a shards.json, counting it was a traceback."""
    from tests.test_hostile_data import bad_records, good_records, write_shards

    shards = write_shards(tmp_path / "shards", good_records(4) + bad_records(), good_records())
    os.rename(shards / "train-00000-of-00001.tfrecord", shards / "train-00000-of-00002.tfrecord")
    os.symlink(tmp_path / "nowhere.tfrecord", shards / "train-00001-of-00002.tfrecord")
    if index:  # a third-party shards.json: counts, no sizes, so nothing opens the shard before the pass
        listed = {"shards": ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"], "counts": [6, 3]}
        test = {"shards": ["test-00000-of-00001.tfrecord"], "counts": [8]}
        (shards / "shards.json").write_text(json.dumps({"train": listed, "test": test, "image_size": 16}))
    config = DataConfig(source="tfrecord", path=str(shards), image_size=16, on_bad_image="skip", cache="none")
    with pytest.raises(DataError) as err:
        prepare_dataset(load_dataset(config, 0), config, quiet, SkipMemo(str(tmp_path / "unreadable.json"), quiet))
    message = str(err.value)
    assert "train-00001-of-00002.tfrecord" in message and "\n" not in message
    assert ("is gone since it was listed" if index else "cannot read TFRecord shard") in message


def test_a_streamed_file_deleted_mid_run_is_one_line_naming_it(tmp_path, monkeypatch):
    """Review of #25: tf.data reports a file gone since the start as NotFoundError, which
    the loop let through as a traceback."""
    from trainer import training

    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    gone = f"{root}/train/cat/{sorted(os.listdir(f'{root}/train/cat'))[0]}"
    start_monitor = training._start_monitor

    def start_then_delete(*args, **kwargs):  # the data is prepared and sampled: the loop is next
        start_monitor(*args, **kwargs)
        os.remove(gone)

    monkeypatch.setattr(training, "_start_monitor", start_then_delete)
    config = _config(root, "train.epochs=1", "data.cache=none", "data.batch_size=8")  # every file, in epoch 1
    with pytest.raises(DataError) as err:
        train(config, tmp_path / "run", echo=quiet)
    assert f"cannot read image {gone}" in str(err.value) and "\n" not in str(err.value)


def test_a_file_gone_bad_behind_kept_findings_is_named_with_advice_that_fits_skip(tmp_path):
    """Under skip a resumed start trusts unreadable.json (same names, sizes and mtimes). A
    file damaged in place behind its back (same size, mtime restored, as `cp -p` or bit rot
    can) fails mid-run: the line names it and says what helps now; "set skip" would not."""
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=16)
    _plant_bad_files(root)
    config = _config(root, "train.epochs=2", "data.cache=none", "data.on_bad_image=skip")
    os.environ["TRAINER_STOP_AT_STEP"] = "2"
    try:
        train(config, tmp_path / "run", echo=quiet)
    finally:
        del os.environ["TRAINER_STOP_AT_STEP"]
    victim = tmp_path / "photos" / "train" / "ant" / sorted(os.listdir(tmp_path / "photos" / "train" / "ant"))[0]
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)  # same size, not an image any more
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError) as err:
        train(config, tmp_path / "run", echo=quiet)
    message = str(err.value)
    assert f"cannot read image {victim}" in message and "\n" not in message
    assert "delete that unreadable.json" in message and "set data.on_bad_image=skip" not in message


def test_fresh_deletes_the_kept_findings_so_every_image_is_checked_again(tmp_path):
    from trainer.workdir import Workdir

    root = write_mixed_folder(str(tmp_path / "photos"), per_class=8)
    _plant_bad_files(root)
    train(_config(root, "train.max_steps=1", "data.on_bad_image=skip"), tmp_path / "run", echo=quiet)
    findings = tmp_path / "run" / "unreadable.json"
    assert findings.is_file()
    assert str(findings) in Workdir(tmp_path / "run").clear_training_state() and not findings.exists()


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, cache):
    root = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    huge = tmp_path / "photos" / "train" / "ant" / "zz-huge.png"
    Image.new("1", (12000, 12000)).save(huge)  # 144 MP, a few KB on disk
    config = _config(root, "train.epochs=1", f"data.cache={cache}", *FINAL_EVAL_ONLY)
    with pytest.raises(DataError, match=r"zz-huge.png.*12000x12000 pixels.*over the 64 MP limit"):
        train(config, tmp_path / "run", echo=quiet)


def _encoded_as(fmt: str, width: int, height: int, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, fmt, **options)
    return buffer.getvalue()


HEADER_CASES = [
    (fmt, options, size)
    for fmt, options in [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"lossless": True}),  # VP8L
        ("WEBP", {"lossless": False}),  # VP8
        ("WEBP", {"lossless": False, "exif": b"Exif\0\0MM"}),  # VP8X
    ]
    for size in [(1, 1), (33, 17), (300, 5000)]
]


@pytest.mark.parametrize("fmt, options, size", HEADER_CASES)
def test_the_header_gives_every_formats_size_and_decoding_agrees(fmt, options, size):
    from trainer.data.decode import decode, header_size

    raw = tf.constant(_encoded_as(fmt, *size, **options))
    width, height = size
    assert [int(value) for value in header_size(raw)] == [height, width]
    assert decode(raw).shape == (height, width, 3)


def test_a_bottom_up_and_a_top_down_bmp_give_the_same_size():
    from trainer.data.decode import header_size

    bottom_up = bytearray(_encoded_as("BMP", 7, 5))
    top_down = bytearray(bottom_up)
    top_down[22:26] = (-5).to_bytes(4, "little", signed=True)  # a negative height: rows stored top-down
    for raw in (bottom_up, top_down):
        assert [int(value) for value in header_size(tf.constant(bytes(raw)))] == [5, 7]


def _gif(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF's blocks by hand: its screen (width, height), then each frame's descriptor
    (width, height) with one data sub-block; far too little data to decode."""
    blocks = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    for width, height in frames:
        blocks += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return blocks + b"\x3b"


def test_a_gif_is_sized_by_its_frames_and_refused_by_what_they_decode_to():
    from trainer.data.decode import decode, header_size, image_problem

    outside_screen = _gif((8, 8), [(10000, 10000)])  # 40 bytes; giflib would allocate a 10000x10000 frame
    assert [int(value) for value in header_size(tf.constant(outside_screen))] == [10000, 10000]
    assert "10000x10000 pixels (95 MP), over the 64 MP limit" in image_problem(outside_screen)
    many_frames = _gif((4000, 4000), [(4000, 4000)] * 40)  # each frame within the limit, together 610 MP
    assert "its frames hold 610 MP (every frame is decoded), over the 64 MP limit" in image_problem(many_frames)
    for refused in (outside_screen, many_frames):
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode(tf.constant(refused))
    frames = [Image.new("RGB", (21, 13), color) for color in ("red", "green", "blue")]
    animation = io.BytesIO()
    frames[0].save(animation, "GIF", save_all=True, append_images=frames[1:], loop=0, duration=40)
    raw = tf.constant(animation.getvalue())  # a global colour table, extensions, three frames
    assert [int(value) for value in header_size(raw)] == [13, 21] and decode(raw).shape == (13, 21, 3)


def test_a_webp_without_a_chunk_tag_has_no_size_and_is_not_decoded():
    from trainer.data.decode import decode, header_size, image_problem

    tagged = _encoded_as("WEBP", 5, 5, lossless=True)
    body = b"WEBP" + tagged[20:]  # the bare VP8L stream, which libwebp decodes whatever its size
    bare = b"RIFF" + struct.pack("<I", len(body)) + body
    assert [int(value) for value in header_size(tf.constant(bare))] == [0, 0]
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode(tf.constant(bare))
    assert "its header gives no size (0x0)" in image_problem(bare)


def test_an_unknown_format_has_no_size_and_is_named_as_no_image():
    from trainer.data.decode import header_size, image_problem

    raw = b"II*\0" + bytes(60)  # a TIFF header: not a format TensorFlow decodes
    assert [int(value) for value in header_size(tf.constant(raw))] == [0, 0]
    assert "are no JPEG, PNG, GIF, BMP or WebP header" in image_problem(raw)
