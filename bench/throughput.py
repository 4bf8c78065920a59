"""Training throughput: our `launch train` path vs the seed paper's workflow, side by side.

Same model (the paper's CNN), same global batch, same data (a slice of CIFAR-10 or the
synthetic set). Ours: `trainer.train` (tf.data pipeline, own distributed loop). Seed:
Keras Sequential with a softmax head, numpy arrays scaled to [0, 1], `model.fit`.
Both without augmentation. Runs alternate (ours, seed, ours, seed, ...) in one process;
the first epoch of each run (tracing) is left out of its speed. A third row is the ceiling
of any training loop on this model here: the forward and backward pass alone, on one
batch already in memory, with no optimizer update. Prints a table; --json writes the numbers.

    CIFAR10_DIR=../shared/data/cifar10 python bench/throughput.py --json throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import data_overrides, matmul_peak_flops, seed_model  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.data.prepare import prepare_dataset  # noqa: E402
from trainer.flops import training_flops_per_example  # noqa: E402
from trainer.training import train  # noqa: E402


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)

    def on_train_begin(self, logs=None):
        self.times = []


def run_seed(images: np.ndarray, labels: np.ndarray, batch: int, epochs: int) -> float:
    keras.mixed_precision.set_global_policy("float32")  # the seed workflow's; our runs set their own
    model = seed_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _EpochTimer()
    model.fit(images.astype("float32") / 255.0, labels, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
    steps = len(images) // batch + (len(images) % batch > 0)
    return (epochs - 1) * len(images) / sum(timer.times[1:]) if steps else 0.0


def run_forward_backward(batch: int, steps: int = 40) -> float:
    """img/s of the seed model's forward and backward pass alone: no input pipeline, no update."""
    keras.mixed_precision.set_global_policy("float32")
    model = seed_model()
    images = tf.random.uniform([batch, 32, 32, 3], seed=0)
    labels = tf.random.uniform([batch], 0, 10, tf.int32, seed=0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def run(count):
        norm = tf.constant(0.0)
        for _ in tf.range(count):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(images, training=True))
            norm += tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables))
        return norm

    run(tf.constant(2)).numpy()  # trace and warm up
    tick = time.perf_counter()
    run(tf.constant(steps)).numpy()
    return steps * batch / (time.perf_counter() - tick)


def run_ours(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        config = load_config("configs/paper_cnn.yaml", overrides)
        return train(config, workdir, echo=lambda _: None).images_per_second


def _loaded(data):
    """The dataset decoded into memory, as the trainer prepares it (CIFAR-10's JPEGs are listed first)."""
    return prepare_dataset(load_dataset(data, seed=0), data, say=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--set",
        dest="ours_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for our path only, e.g. runtime.precision=mixed_bfloat16",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    source, overrides = data_overrides(args.examples, 1000)
    overrides += [
        f"data.batch_size={args.batch}",
        f"train.epochs={args.epochs}",
        "train.eval_every_epochs=1000",
        "checkpoint.keep_best=false",
        "tensorboard.images=false",
    ]
    data = _loaded(load_config("configs/paper_cnn.yaml", overrides).data).train
    ceiling = "fwd+bwd only"
    results: dict[str, list[float]] = {"ours": [], "seed model.fit": [], ceiling: []}
    for _ in range(args.repeats):
        results["ours"].append(run_ours([*overrides, *args.ours_overrides]))
        results["seed model.fit"].append(run_seed(data.images, data.labels, args.batch, args.epochs))
        results[ceiling].append(run_forward_backward(args.batch))
    best = {name: max(values) for name, values in results.items()}
    ratio = best["ours"] / best["seed model.fit"]
    ceiling_ratio = best[ceiling] / best["seed model.fit"]
    # The seed path's speed swings from run to run here; the ratio of each side-by-side pair shows how far.
    pair_ratios = [ours / seed for ours, seed in zip(results["ours"], results["seed model.fit"])]
    # How close each path is to what this machine can do at all (both train the same FLOPs).
    flops_per_image = training_flops_per_example(seed_model())
    peak = matmul_peak_flops("float32")
    print(f"{'path':<16} {'img/s (best of ' + str(args.repeats) + ')':>22} {'GFLOP/s':>8} {'of fp32 peak':>13}")
    for name, value in best.items():
        achieved = value * flops_per_image
        print(f"{name:<16} {value:>22.0f} {achieved / 1e9:>8.0f} {achieved / peak:>13.0%}")
    extra = f"; ours with {', '.join(args.ours_overrides)}" if args.ours_overrides else ""
    print(f"ratio ours / seed: {ratio:.2f}x  ({source}, {args.examples} examples, batch {args.batch}{extra})")
    print(f"ratio of each pair (ours, seed run one after the other): {', '.join(f'{r:.2f}x' for r in pair_ratios)}")
    print(f"ceiling / seed: {ceiling_ratio:.2f}x (the most any float32 loop could gain here on this model and batch)")
    print(
        f"fp32 peak = best chain of 2048x2048 float32 matmuls here: {peak / 1e9:.0f} GFLOP/s; "
        f"{flops_per_image / 1e6:.0f} MFLOP per trained image (3x forward)"
    )
    if args.json:
        report = {"source": source, "runs": results, "best": best, "ratio": ratio, "args": vars(args)}
        report.update(ceiling_ratio=ceiling_ratio, pair_ratios=pair_ratios)
        report.update(flops_per_image=flops_per_image, float32_matmul_peak=peak)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
