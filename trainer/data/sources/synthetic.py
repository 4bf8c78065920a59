"""The synthetic set (data.source=synthetic): small, learnable and made from the seed, for
tests, smoke runs and machines without CIFAR-10."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from trainer.config import DataConfig
from trainer.data.splits import Dataset, Split
from trainer.say import Say


def synthetic_dataset(train_size: int, test_size: int, num_classes: int, seed: int) -> Dataset:
    """Small, deterministic and learnable: each class is a fixed colour pattern plus noise.

    A few dozen steps of any CNN separate the classes, so tests can assert that accuracy
    rises; the same seed always gives the same pixels. Made once per process for the same
    arguments (0.3-0.5 s each time for the smoke sizes, paid by every run in a notebook or
    the tests): the pixels are read-only, and each call gets its own Dataset and Splits.
    """
    made = _made(train_size, test_size, num_classes, seed)
    train, test = dataclasses.replace(made.train), dataclasses.replace(made.test)
    return dataclasses.replace(made, train=train, test=test, class_names=list(made.class_names))


@functools.lru_cache(maxsize=4)
def _made(train_size: int, test_size: int, num_classes: int, seed: int) -> Dataset:
    templates_rng = np.random.default_rng([seed, 0])
    # 4x4 coarse colour blocks upsampled to 32x32: distinct, low-frequency class patterns.
    coarse = templates_rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    templates = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)

    def split(size: int, stream: int) -> Split:
        rng = np.random.default_rng([seed, stream])
        labels = rng.integers(0, num_classes, size=size).astype(np.int32)
        noise = rng.normal(0, 56, size=(size, 32, 32, 3))
        images = np.clip(0.5 * templates[labels] + 64 + noise, 0, 255).astype(np.uint8)
        images.flags.writeable = labels.flags.writeable = False  # shared by every call: never changed in place
        return Split(images, labels)

    names = [f"class_{i}" for i in range(num_classes)]
    return Dataset(split(train_size, 1), split(test_size, 2), names, f"synthetic (seed {seed})")


def load(config: DataConfig, seed: int, say: Say | None = None) -> Dataset:
    """data.source=synthetic (SOURCES): data.synthetic_* sizes, pixels from the seed."""
    return synthetic_dataset(config.synthetic_train_size, config.synthetic_test_size, config.synthetic_classes, seed)
