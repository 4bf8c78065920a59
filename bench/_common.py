"""What the bench scripts share: which data to use and how to slice it, and the seed paper's model."""

from __future__ import annotations

import os

import keras


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


def seed_model() -> keras.Model:
    """The paper's network exactly as its Keras workflow builds it (softmax included)."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def matmul_peak_flops(dtype: str = "float32", size: int = 2048, chain: int = 8, repeats: int = 5) -> float:
    """The best FLOP/s a chain of dense matmuls reaches here: a practical ceiling for conv nets.

    Convolutions run as matmul-like kernels (oneDNN on CPUs), so a training loop's FLOP/s
    over this number says how much any loop could still gain on the same model.
    """
    import time

    import tensorflow as tf

    matrix = tf.cast(tf.random.normal([size, size], stddev=size**-0.5, seed=0), dtype)  # keeps norms ~constant

    @tf.function
    def run(x):
        for _ in range(chain):
            x = tf.matmul(x, matrix)
        return x

    run(matrix).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        run(matrix).numpy()
        best = min(best, time.perf_counter() - tick)
    return 2 * size**3 * chain / best
