"""Keras Applications backbones: our loop vs Keras `model.fit`, and transfer between our runs.

throughput: each backbone at each size and precision, batch 32. Ours: `trainer.train` on
the synthetic set (in memory, no augmentation), speed of every compiled call after the
first (tracing). Keras: the same model (trainer.models.build_model), the same SGD, `fit`
on in-memory float32 arrays, the median speed of epochs 2-4. Side by side in one process,
ours first then Keras for each row; one JSON line per row as it finishes.

    python bench/backbones.py throughput --json backbones.jsonl
    python bench/backbones.py throughput --models mobilenet_v3_small --sizes 64

transfer: on the shared CIFAR-10 copy ($CIFAR10_DIR), a backbone trained on classes 0-4
and exported; then classes 5-9 from those weights vs from scratch, the same budget.

    CIFAR10_DIR=../shared/data/cifar10 python bench/backbones.py transfer --json transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import BACKBONE_NAMES, load_config  # noqa: E402
from trainer.inference import export  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.training import train  # noqa: E402

BATCH = 32
# fit's epochs after the first (which traces); their median is its speed. One epoch alone
# swung 1.5x between runs here (mobilenet_v3_small: 200 or 320 img/s).
FIT_EPOCHS = 3


def ours(name: str, size: int, precision: str, steps: int) -> float:
    """img/s of trainer.train over `steps` measured steps (calls of 2 steps after the first)."""
    overrides = [
        "data.source=synthetic",
        f"data.synthetic_train_size={BATCH * (steps + 2)}",
        f"data.synthetic_test_size={BATCH}",
        f"data.image_size={size}",
        f"data.batch_size={BATCH}",
        "data.augment=false",
        f"model.name={name}",
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.01",
        "train.epochs=1",
        "train.steps_per_loop=2",
        "checkpoint.every_steps=0",
        "tensorboard.images=false",
        f"runtime.precision={precision}",
    ]
    with tempfile.TemporaryDirectory() as workdir:
        return train(load_config(None, overrides), workdir, echo=lambda _: None).images_per_second


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def keras_fit(name: str, size: int, precision: str, steps: int) -> float:
    """img/s of the same model under `model.fit` on in-memory arrays (second epoch)."""
    keras.mixed_precision.set_global_policy(precision)
    model = build_model(name, input_shape=(size, size, 3), num_classes=10, mean=[0.0] * 3, std=[1.0] * 3)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,  # as our loop on a CPU (XLA is slower here)
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH * steps, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH * steps)
    timer = _EpochTimer()
    model.fit(images, labels, batch_size=BATCH, epochs=1 + FIT_EPOCHS, verbose=0, callbacks=[timer])
    keras.mixed_precision.set_global_policy("float32")
    return BATCH * steps / float(np.median(timer.times[1:]))


def throughput(args) -> None:
    rows = []
    print(f"{'model':<20} {'size':>4} {'precision':<15} {'ours img/s':>10} {'fit img/s':>10} {'ratio':>6}")
    for name in args.models:
        for size in args.sizes:
            for precision in args.precisions:
                mine = ours(name, size, precision, args.steps)
                theirs = keras_fit(name, size, precision, args.steps)
                row = {"model": name, "size": size, "precision": precision, "ours": mine, "fit": theirs}
                rows.append(row)
                ratio = mine / theirs
                print(f"{name:<20} {size:>4} {precision:<15} {mine:>10.1f} {theirs:>10.1f} {ratio:>6.2f}", flush=True)
                if args.json:
                    Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(workdir: Path, overrides: list[str], classes: str) -> dict:
    """One CIFAR-10 run on a class subset (data.path is a folder of hard links)."""
    config = load_config(None, ["data.source=folder", f"data.path={classes}", *overrides])
    started = time.perf_counter()
    result = train(config, workdir, echo=print)
    return {"accuracy": result.final_eval.accuracy, "seconds": time.perf_counter() - started}


def _class_subset(cifar: Path, target: Path, classes: list[str], per_class_train: int, per_class_test: int) -> str:
    """train/<class>/ and test/<class>/ of hard links to the first files of each class."""
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for name in classes:
            folder = target / split / name
            folder.mkdir(parents=True)
            for path in sorted((cifar / split / name).iterdir())[:count]:
                os.link(path, folder / path.name)
    return str(target)


def transfer(args) -> None:
    cifar = Path(os.environ["CIFAR10_DIR"])
    names = sorted(p.name for p in (cifar / "train").iterdir())
    root = Path(tempfile.mkdtemp(prefix="transfer-"))
    first = _class_subset(cifar, root / "first", names[:5], args.train_per_class, 200)
    second = _class_subset(cifar, root / "second", names[5:], args.train_per_class, 200)
    common = [
        f"model.name={args.model}",
        f"data.image_size={args.size}",
        "data.batch_size=64",
        "data.crop=pad",
        "optimizer.name=sgd",
        f"optimizer.learning_rate={args.lr}",
        "optimizer.weight_decay=0.00005",
        "train.steps_per_loop=20",
        f"runtime.precision={args.precision}",
        "tensorboard.images=false",
    ]
    results = {"model": args.model, "size": args.size, "train_per_class": args.train_per_class, "lr": args.lr}
    source = root / "source"
    results["source"] = _run(source, [*common, f"train.epochs={args.source_epochs}"], first)
    export(source, warn=print)
    budget = [f"train.epochs={args.epochs}"]
    results["from_scratch"] = _run(root / "scratch", [*common, *budget], second)
    weights = f"model.weights={source / 'export' / 'model.keras'}"
    results["from_our_weights"] = _run(root / "transfer", [*common, *budget, weights], second)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput")
    speed.add_argument("--models", nargs="+", default=list(BACKBONE_NAMES), help="any of `launch models`")
    speed.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    speed.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    speed.add_argument("--steps", type=int, default=4, help="measured steps per run")
    speed.add_argument("--json", help="write one JSON line per row (rewritten after each row)")
    moved = commands.add_parser("transfer")
    moved.add_argument("--model", default="mobilenet_v3_small")
    moved.add_argument("--size", type=int, default=64)
    moved.add_argument("--train-per-class", type=int, default=1000)
    moved.add_argument("--source-epochs", type=int, default=6)
    moved.add_argument("--epochs", type=int, default=4)
    moved.add_argument("--lr", type=float, default=0.05)
    moved.add_argument("--precision", default="float32", help="float32: bf16 is emulated (slower) on AVX2 CPUs")
    moved.add_argument("--json")
    args = parser.parse_args()
    throughput(args) if args.command == "throughput" else transfer(args)


if __name__ == "__main__":
    main()
