"""Hostile data: files, names, records and side files that break the input, each one Error
line naming it (or left out, under data.on_bad_image=skip), never a traceback (issue #24:
items 9-12, the shards.json part of 13, and the smaller data items).

Every dataset here is a few 16x16 images made with Pillow, or shards written from them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.test_safety import SMOKE, assert_one_error, run_cli
from trainer.config import DataConfig
from trainer.data.convert import convert, convert_folder
from trainer.data.pipeline import train_dataset_fn
from trainer.data.plan import InputSpec
from trainer.data.prepare import prepare_dataset
from trainer.data.sources import load_dataset
from trainer.data.sources.folder import read_image_folder
from trainer.errors import DataError

CLASSES = ("ant", "bee")
LATIN1_NAME = b"caf\xe9.jpg"  # a Latin-1 file name: not UTF-8


def quiet(_line: str) -> None:
    pass


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_folder(root: Path, per_class: int = 4, classes=CLASSES) -> Path:
    """root/{train,test}/<class>/<i>.jpg: 16x16 JPEGs."""
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(jpeg(100 * label + 10 * i + (split == "test")))
    return root


def example(data: bytes, label: int, name: str) -> bytes:
    """A record as other tools write them (the Model Garden / TFDS keys)."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(root: Path, train: list, test: list, class_names=CLASSES) -> Path:
    """Third-party shards: one train and one test shard, labels.txt, no shards.json.
    Records are (encoded bytes, label, file name)."""
    root.mkdir(parents=True)
    for split, records in (("train", train), ("test", test)):
        with tf.io.TFRecordWriter(str(root / f"{split}-00000-of-00001.tfrecord")) as writer:
            for data, label, name in records:
                writer.write(example(data, label, name))
    (root / "labels.txt").write_text("\n".join(class_names) + "\n")
    return root


def good_records(count: int = 8) -> list:
    return [(jpeg(i), i % 2, f"good-{i}.jpg") for i in range(count)]


def bad_records() -> list:
    """A JPEG cut at 200 bytes and a text file named .jpg."""
    return [(jpeg(99)[:200], 0, "cut.jpg"), (b"hello, I am not an image", 1, "notes.jpg")]


def data_args(source: str, path: Path, *overrides: str) -> list[str]:
    sets = [f"data.source={source}", f"data.path={path}", "data.image_size=16", "data.batch_size=4", *overrides]
    return [word for value in sets for word in ("--set", value)]


def show(tmp_path: Path, source: str, path: Path, *overrides: str):
    """`launch data show`: lists, prepares and decodes the first images, builds no model."""
    out = tmp_path / "grid.png"
    return run_cli("data", "show", "--config", SMOKE, "--out", str(out), *data_args(source, path, *overrides))


def train_cli(tmp_path: Path, source: str, path: Path, *overrides: str, name: str = "run"):
    small = ("model.width=4", "train.max_steps=1", "train.steps_per_loop=1", "tensorboard.images=false")
    args = ["train", "--config", SMOKE, "--workdir", str(tmp_path / name)]
    return run_cli(*args, *data_args(source, path, *small, *overrides))


# --- 9. a listed entry that cannot be read ---------------------------------------------------


def _plant(folder: Path, kind: str) -> Path:
    entry = folder / "zz.jpg"
    if kind == "broken link":
        entry.symlink_to(folder / "gone.jpg")
    elif kind == "link loop":
        entry.symlink_to("zz.jpg")
    else:
        entry.mkdir()
    return entry


@pytest.mark.parametrize(("kind", "said"), [("broken link", "broken symbolic link"), ("link loop", "link loop")])
def test_an_unreadable_entry_is_one_line_naming_it_or_skipped_with_a_warning(tmp_path, kind, said):
    root = image_folder(tmp_path / "photos")
    entry = _plant(root / "train" / "ant", kind)
    assert_one_error(show(tmp_path, "folder", root), str(entry), said, "data.on_bad_image=skip")
    skipped = show(tmp_path, "folder", root, "data.on_bad_image=skip")
    assert skipped.exit_code == 0, skipped.output
    warning = next(line for line in skipped.output.splitlines() if line.startswith("Warning: skipping"))
    assert str(entry) in warning and said in warning


def test_a_folder_named_like_an_image_is_not_listed(tmp_path):
    root = image_folder(tmp_path / "photos")
    _plant(root / "train" / "ant", "folder")
    dataset = load_dataset(DataConfig(source="folder", path=str(root)), seed=0)
    assert "zz.jpg" not in dataset.train.names and len(dataset.train) == 8
    result = show(tmp_path, "folder", root)
    assert result.exit_code == 0, result.output


def test_convert_of_a_broken_link_is_one_line_and_a_retry_works(tmp_path):
    root = image_folder(tmp_path / "photos")
    entry = _plant(root / "train" / "bee", "broken link")
    out = tmp_path / "shards"
    line = assert_one_error(run_cli("data", "convert", "--from", str(root), "--to", str(out)), str(entry))
    assert "data.on_bad_image" not in line  # convert has no such setting: it names only the fix
    assert not out.exists()
    entry.unlink()
    again = run_cli("data", "convert", "--from", str(root), "--to", str(out))
    assert again.exit_code == 0, again.output


def test_a_convert_that_fails_midway_removes_what_it_wrote(tmp_path):
    root = image_folder(tmp_path / "photos")
    dataset = read_image_folder(str(root), DataConfig(source="folder", path=str(root)), 0)
    vanished = root / "test" / "bee" / "3.jpg"  # gone between listing and reading: the train shards are written
    saved = vanished.read_bytes()
    vanished.unlink()
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=f"cannot read {vanished}"):
        convert_folder(dataset, str(out), progress=quiet)
    assert not out.exists()  # no .train-00000.tfrecord.tmp, no train shards: nothing to refuse a retry
    vanished.write_bytes(saved)
    again = run_cli("data", "convert", "--from", str(root), "--to", str(out))
    assert again.exit_code == 0, again.output


# --- 10. a file name that is not UTF-8 -------------------------------------------------------


def test_a_latin1_file_name_trains_converts_shows_and_predicts(tmp_path):
    root = image_folder(tmp_path / "photos")
    latin1 = os.fsencode(root / "train" / "ant") + b"/" + LATIN1_NAME
    with open(latin1, "wb") as handle:
        handle.write(jpeg(7))
    dataset = load_dataset(DataConfig(source="folder", path=str(root)), seed=0)
    assert len(dataset.train) == 9  # listed, not dropped
    trained = train_cli(tmp_path, "folder", root, "data.cache=none", "data.on_bad_image=skip")
    assert trained.exit_code == 0, trained.output
    assert "skipping" not in trained.output  # it decodes: nothing to skip
    assert show(tmp_path, "folder", root).exit_code == 0
    out = tmp_path / "shards"
    converted = run_cli("data", "convert", "--from", str(root), "--to", str(out))
    assert converted.exit_code == 0, converted.output
    assert "Wrote 9 train records" in converted.output
    names = [
        tf.train.Example.FromString(raw).features.feature["image/filename"].bytes_list.value[0]
        for raw in tf.data.TFRecordDataset(str(out / "train-00000-of-00001.tfrecord")).as_numpy_iterator()
    ]
    assert latin1 in names  # the file's own bytes
    predicted = run_cli("predict", "--workdir", str(tmp_path / "run"), "--json", os.fsdecode(latin1))
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output.splitlines()[-1])["label"] in CLASSES


def test_a_class_folder_whose_name_is_not_utf8_is_one_line(tmp_path):
    root = image_folder(tmp_path / "photos")
    for split in ("train", "test"):
        os.rename(root / split / "bee", os.fsencode(root / split) + b"/b\xe9e")
    line = assert_one_error(show(tmp_path, "folder", root), "not UTF-8", "rename it")
    assert "b\\xe9e" in line


# --- 11. shards with records that do not decode ---------------------------------------------


def test_an_undecodable_record_is_one_line_naming_its_shard_and_place(tmp_path):
    shards = write_shards(tmp_path / "shards", good_records(4) + bad_records() + good_records(4), good_records())
    line = assert_one_error(
        show(tmp_path, "tfrecord", shards),
        f"record 4 of {shards}/train-00000-of-00001.tfrecord (cut.jpg)",
        "is not a decodable image: not a whole JPEG (200 bytes)",
        "data.on_bad_image=skip",
    )
    assert "{{" not in line and "[Op:" not in line
    skipped = show(tmp_path, "tfrecord", shards, "data.on_bad_image=skip")
    assert skipped.exit_code == 0, skipped.output
    assert "skipping 2 unreadable train record(s)" in skipped.output


def test_a_records_file_name_cannot_forge_a_second_line(tmp_path):
    forged = "cut.jpg\nTraining finished: all images checked, nothing wrong"
    shards = write_shards(tmp_path / "shards", good_records(2) + [(jpeg(99)[:200], 0, forged)], good_records())
    line = assert_one_error(
        show(tmp_path, "tfrecord", shards), "record 2 of", "(cut.jpg\\nTraining finished: all images checked"
    )
    assert "not a whole JPEG" in line


def test_a_bad_record_met_by_the_training_stream_is_named(tmp_path):
    """The path a failure inside the training loop takes: the failed call's records are
    read again (not decoded) and checked."""
    from trainer.data.diagnose import input_error

    shards = write_shards(tmp_path / "shards", good_records(6) + bad_records()[1:] + good_records(1), good_records())
    data = DataConfig(source="tfrecord", path=str(shards), image_size=16, cache="none")
    dataset = prepare_dataset(load_dataset(data, 0), data, quiet)
    spec = InputSpec(global_batch=4, seed=0, image_size=16)
    context = tf.distribute.InputContext(1, 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError):
        for _ in train_dataset_fn(dataset.train, spec, 0, 2)(context):
            pass
    message = str(input_error(dataset, spec, range(0, 2)))
    assert f"record 6 of {shards}/train-00000-of-00001.tfrecord (notes.jpg)" in message
    assert "not an image" in message and "\n" not in message


def test_when_every_record_is_bad_skip_says_there_is_nothing_to_train_on(tmp_path):
    shards = write_shards(tmp_path / "shards", bad_records() * 4, good_records())
    assert_one_error(
        show(tmp_path, "tfrecord", shards, "data.on_bad_image=skip"),
        "none of the 8 train records holds a decodable image",
        "not a whole JPEG (200 bytes)",
    )


# --- 12. labels past labels.txt ---------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_a_label_past_labels_txt_is_one_line_before_any_step(tmp_path, cache):
    shards = write_shards(tmp_path / "shards", good_records(), good_records(), class_names=("ant",))
    result = train_cli(tmp_path, "tfrecord", shards, f"data.cache={cache}")
    assert_one_error(result, f"{shards}/train-00000-of-00001.tfrecord has label 1", f"{shards}/labels.txt lists 1")
    assert "Epoch" not in result.output and not (tmp_path / "run" / "checkpoints").exists()


def test_a_class_name_labels_txt_cannot_hold_is_refused_at_convert(tmp_path):
    root = image_folder(tmp_path / "photos", classes=("ant", "  ", "bee"))  # two spaces: stripped to nothing
    out = tmp_path / "shards"
    assert_one_error(run_cli("data", "convert", "--from", str(root), "--to", str(out)), "class folder '  '")
    assert not out.exists()


def test_a_labels_txt_that_lost_a_class_after_convert_is_one_line(tmp_path):
    out = tmp_path / "shards"
    convert(str(image_folder(tmp_path / "photos")), str(out), progress=quiet)
    (out / "labels.txt").write_text("ant\n")
    assert_one_error(show(tmp_path, "tfrecord", out), "labels.txt lists 1 class(es)", "written with 2")
    # An index of an older convert (no class count): the label is caught in the first batch.
    index = json.loads((out / "shards.json").read_text())
    del index["classes"]
    (out / "shards.json").write_text(json.dumps(index))
    assert_one_error(show(tmp_path, "tfrecord", out), "has label 1", f"{out}/labels.txt lists 1")


# --- 13. a damaged shards.json ----------------------------------------------------------------


@pytest.fixture
def converted(tmp_path) -> Path:
    out = tmp_path / "shards"
    convert(str(image_folder(tmp_path / "photos")), str(out), progress=quiet)
    return out


@pytest.mark.parametrize("damage", ["[]", '{"image_size": "abc"}', "cut short", '{"image_size": 16, "train": 5}'])
def test_a_damaged_shards_json_is_warned_about_and_rebuilt(tmp_path, converted, damage):
    index = converted / "shards.json"
    index.write_text(index.read_text()[:25] if damage == "cut short" else damage)
    result = run_cli(
        "data",
        "show",
        "--config",
        SMOKE,
        "--out",
        str(tmp_path / "grid.png"),
        *data_args("tfrecord", converted, "data.image_size=0"),
    )  # the size too comes back: read from the first images' headers
    assert result.exit_code == 0, result.output
    assert f"Warning: {index}" in result.output


def test_a_shards_json_whose_shards_changed_is_recounted(tmp_path, converted):
    shard = converted / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(shard)) as writer:  # rewritten with 3 records, not 8
        for data, label, name in good_records(3):
            writer.write(example(data, label, name))
    lines: list[str] = []
    dataset = load_dataset(DataConfig(source="tfrecord", path=str(converted)), 0, progress=lines.append)
    assert len(dataset.train) == 3
    assert any("counting the train records instead" in line for line in lines)


def test_counts_larger_than_the_records_are_one_line_streamed_and_a_warning_cached(tmp_path, converted):
    index = json.loads((converted / "shards.json").read_text())
    index["train"]["counts"] = [80]  # edited: sizes still match
    (converted / "shards.json").write_text(json.dumps(index))
    result = train_cli(tmp_path, "tfrecord", converted, "data.cache=none", "train.max_steps=4")
    assert_one_error(result, "hold fewer records than its shards.json says", "delete it")
    lines: list[str] = []
    data = DataConfig(source="tfrecord", path=str(converted), cache="memory")
    dataset = prepare_dataset(load_dataset(data, 0), data, lines.append)
    assert len(dataset.train) == 8
    assert any("hold 8 usable records, not the 80" in line for line in lines)


# --- the smaller items --------------------------------------------------------------------------


def test_convert_refuses_to_inside_from_and_names_its_own_flags(tmp_path):
    root = image_folder(tmp_path / "photos")
    before = sorted(str(path) for path in root.rglob("*"))
    for inside in (root, root / "shards", root / "train" / "shards"):
        result = run_cli("data", "convert", "--from", str(root), "--to", str(inside))
        assert_one_error(result, "is inside --from", "nothing was written")
    assert sorted(str(path) for path in root.rglob("*")) == before
    missing = run_cli("data", "convert", "--from", str(tmp_path / "typo"), "--to", str(tmp_path / "out"))
    assert "data.path" not in assert_one_error(missing, f"--from {tmp_path / 'typo'} is not a folder")
    split = run_cli("data", "convert", "--from", str(root), "--to", str(tmp_path / "o"), "--validation-split", "0.5")
    assert "data." not in assert_one_error(split, "--validation-split 0.5 is for one <class>/ tree")


def test_a_truncated_jpeg_is_said_in_words_and_libjpeg_stays_almost_quiet(tmp_path, capfd):
    root = image_folder(tmp_path / "photos")
    cut = root / "train" / "ant" / "zz.jpg"
    cut.write_bytes(jpeg(5)[:200])
    capfd.readouterr()
    line = assert_one_error(show(tmp_path, "folder", root), f"cannot read image {cut}: not a whole JPEG (200 bytes)")
    assert "{{" not in line and "[Op:" not in line and "name:" not in line
    # The failing op itself prints once (TensorFlow's libjpeg writes to the process's stderr);
    # the checks that name the file print nothing.
    assert capfd.readouterr().err.count("Improper call to JPEG library") <= 1
