"""What the bench scripts share: which data to use and how to slice it."""

from __future__ import annotations

import os


def data_overrides(train_examples: int, test_examples: int) -> tuple[str, list[str]]:
    """The shared CIFAR-10 copy when $CIFAR10_DIR is set, else synthetic data of the same size."""
    source = "cifar10" if os.environ.get("CIFAR10_DIR") else "synthetic"
    return source, [
        f"data.source={source}",
        f"data.train_examples={train_examples}",
        f"data.test_examples={test_examples}",
        f"data.synthetic_train_size={train_examples}",
        f"data.synthetic_test_size={test_examples}",
    ]
