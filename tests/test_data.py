import pickle

import numpy as np
import pytest
from PIL import Image

from trainer.config import DataConfig
from trainer.data import load_dataset
from trainer.data.prepare import prepare_dataset
from trainer.data.sources.synthetic import synthetic_dataset
from trainer.errors import DataError


def _write_folder(root, classes=("cat", "ant", "bee"), per_class=3, size=(8, 8)):
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                pixels = np.full((size[1], size[0], 3), 40 * i + j, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{j}.png")
    return root


def test_synthetic_is_deterministic_and_seed_dependent():
    a = synthetic_dataset(64, 16, 10, seed=3)
    b = synthetic_dataset(64, 16, 10, seed=3)
    c = synthetic_dataset(64, 16, 10, seed=4)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)
    assert a.train.images.dtype == np.uint8 and a.train.images.shape == (64, 32, 32, 3)


def _prepared(root, **data):
    config = DataConfig(source="folder", path=str(root), **data)
    return prepare_dataset(load_dataset(config, seed=0), config, say=lambda _: None)


def test_folder_classes_are_sorted_folder_names(tmp_path):
    dataset = _prepared(_write_folder(tmp_path))
    assert dataset.class_names == ["ant", "bee", "cat"]
    assert len(dataset.train) == 9 and len(dataset.test) == 9
    # "ant" (label 0) was written with value 40*1 + j; small data is cached in memory
    assert dataset.train.images[dataset.train.labels == 0].min() == 40


def test_folder_limit_takes_a_balanced_slice(tmp_path):
    config = DataConfig(source="folder", path=str(_write_folder(tmp_path)), train_examples=6)
    dataset = load_dataset(config, seed=0)
    assert sorted(np.bincount(dataset.train.labels).tolist()) == [2, 2, 2]


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _write_folder(tmp_path)
    bad = root / "train" / "bee" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"cannot read image {bad}: .*data.on_bad_image=skip"):
        _prepared(root)


def test_mixed_sizes_need_image_size_in_one_line(tmp_path):
    root = _write_folder(tmp_path)
    odd = root / "test" / "cat" / "9.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(odd)
    other = root / "train" / "cat" / "9.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(other)
    with pytest.raises(DataError, match=r"different sizes .* is 7x5\); set data.image_size") as err:
        _prepared(root)
    assert "\n" not in str(err.value)
    dataset = _prepared(root, image_size=8)  # with a size, they are resized
    assert dataset.train.images.shape[1:] == (8, 8, 3)


def test_cifar10_pickle_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    dataset = load_dataset(DataConfig(source="cifar10", path=str(tmp_path)), seed=0)
    assert dataset.train.images.shape == (20, 32, 32, 3)
    assert dataset.test.labels.tolist() == [0, 1, 2, 3]
    assert dataset.class_names[0] == "airplane"
    # channels-first rows of the pickle become HWC pixels
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    assert dataset.test.images[0, 0, 0].tolist() == [raw[0], raw[1024], raw[2048]]


def test_keras_cache_is_searched(tmp_path, monkeypatch):
    cache = tmp_path / "datasets" / "cifar-10-batches-py"
    cache.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [5, 6]}
        (cache / name).write_bytes(pickle.dumps(batch))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    dataset = load_dataset(DataConfig(source="cifar10"), seed=0)
    assert "pickles" in dataset.origin and len(dataset.train) == 10


def test_cifar10_from_shared_image_folder(cifar10_dir, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(cifar10_dir))
    config = DataConfig(source="cifar10", train_examples=200, test_examples=50)
    dataset = prepare_dataset(load_dataset(config, seed=0), config, say=lambda _: None)
    assert dataset.class_names == [
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
    ]
    assert dataset.train.images.shape == (200, 32, 32, 3)
    assert np.bincount(dataset.train.labels).tolist() == [20] * 10
    assert len(dataset.test) == 50
    assert 40 < dataset.train.images.mean() < 200  # real pixels, not zeros


def test_bad_cifar10_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="CIFAR10_DIR=.*is not a folder"):
        load_dataset(DataConfig(source="cifar10"), seed=0)


def test_offline_without_data_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache: forces the download path
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source="cifar10"), seed=0)
    message = str(err.value)
    assert "download failed" in message
    for alternative in ("CIFAR10_DIR", "data.path", "data.source=synthetic"):
        assert alternative in message
    assert "\n" not in message
