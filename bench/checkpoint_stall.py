"""Checkpoint saves per store: how long training stalls for each save, local disk vs ram://.

Saves are synchronous (the loop waits), so the time of each `CheckpointStore.save` call
is the stall. The airbench94 config (its model and SGD state) trains on synthetic data,
saving after every step; the same run goes to a local folder and to TensorFlow's
in-memory `ram://` filesystem, which goes through tf.io.gfile exactly as gs:// does.

    python bench/checkpoint_stall.py [--steps 12] [--precision float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from trainer import checkpoints, storage  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed_saves(workdir: str, steps: int, precision: str) -> tuple[list[float], int, float]:
    """Seconds of every save, the bytes of one checkpoint, and the run's img/s."""
    durations: list[float] = []
    original = checkpoints.CheckpointStore.save

    def save(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    config = load_config(
        REPO / "configs" / "cifar10_airbench94.yaml",
        [
            "data.source=synthetic",
            f"data.synthetic_train_size={512 * steps}",
            "data.synthetic_test_size=512",
            f"train.max_steps={steps}",
            "train.steps_per_loop=1",
            "checkpoint.every_steps=1",
            "checkpoint.keep_best=false",
            "eval.tta=none",
            f"runtime.precision={precision}",
        ],
    )
    checkpoints.CheckpointStore.save = save
    try:
        result = train(config, workdir, echo=lambda _: None)
    finally:
        checkpoints.CheckpointStore.save = original
    folder = storage.join(workdir, "checkpoints")
    last = checkpoints.checkpoint_steps(folder)[0]
    size = sum(
        tf.io.gfile.stat(storage.join(folder, name)).length
        for name in storage.listdir(folder)
        if name.startswith(f"ckpt-{last}.")
    )
    return durations, size, result.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as local:
        rows = []
        for name, workdir in (
            ("local", f"{local}/a"),
            ("ram://", "ram://bench/a"),
            ("local", f"{local}/b"),
            ("ram://", "ram://bench/b"),
        ):
            durations, size, speed = timed_saves(workdir, args.steps, args.precision)
            steady = durations[1:]  # the first save also creates the files' folder
            rows.append((name, statistics.median(steady), max(steady), size, speed))
            print(
                f"{name:7s} saves {len(durations)}: median {statistics.median(steady) * 1000:.0f} ms, "
                f"max {max(steady) * 1000:.0f} ms, first {durations[0] * 1000:.0f} ms; checkpoint "
                f"{size / 1e6:.1f} MB; training {speed:.0f} img/s (step {512 / speed * 1000:.0f} ms)",
                flush=True,
            )


if __name__ == "__main__":
    main()
