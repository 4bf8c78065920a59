"""Shared test setup.

TensorFlow can split the CPU into logical devices only before it starts, so the whole
session gets two up front: tests ask for 1 or 2 replicas through runtime.cpu_replicas
and the runtime reuses these devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from trainer.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cifar10_dir() -> Path:
    """The shared CIFAR-10 image folder ($CIFAR10_DIR); tests using it skip if it is absent."""
    value = os.environ.get("CIFAR10_DIR")
    if not value or not (Path(value) / "train").is_dir():
        pytest.skip("CIFAR10_DIR is not set to the shared CIFAR-10 image folder")
    return Path(value)


def smoke_config(*overrides: str):
    """configs/smoke.yaml with overrides: the small synthetic run most tests start from."""
    return load_config(REPO / "configs" / "smoke.yaml", overrides)
