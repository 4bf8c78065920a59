"""Time to accuracy: `configs/cifar10_fast.yaml` vs the seed paper's CNN at the same wall time.

Ours: `trainer.train` on the config, evaluated after every epoch; the wall time of each
evaluation (read back from the run's TensorBoard events) gives the curve and the time to
each target. The final evaluation is reported with and without test-time augmentation.
Seed: the paper's workflow (Keras Sequential, numpy arrays / 255, Adam, `model.fit`,
batch 32) trained for the same wall time, test accuracy after every epoch. Both run in
this one process, one after the other. Prints a table; --json writes the numbers.

    CIFAR10_DIR=../shared/data/cifar10 python bench/time_to_accuracy.py --json tta.json
    # the 30-minute variant: --set train.epochs=N --set model.width=W (see RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import seed_model  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.data.prepare import prepare_dataset  # noqa: E402
from trainer.training import train  # noqa: E402


def eval_curve(tensorboard: Path) -> list[tuple[float, int, float]]:
    """(wall time, step, accuracy) of every evaluation the run logged, in order."""
    events = EventAccumulator(str(tensorboard / "eval"), size_guidance={"tensors": 0})
    events.Reload()
    return sorted((e.wall_time, e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors("accuracy"))


def run_ours(config_path: str, overrides: list[str], workdir: Path) -> dict:
    config = load_config(config_path, overrides)
    started = time.time()
    result = train(config, workdir, fresh=True, echo=print)
    seconds = time.time() - started
    curve = [(wall - started, step, accuracy) for wall, step, accuracy in eval_curve(workdir / "tensorboard")]
    final = json.loads((workdir / "metrics.json").read_text())["accuracy"]
    single_view = curve[-1][2]
    return {
        "seconds": seconds,
        "curve": curve,
        "final_accuracy": final,
        "final_single_view": single_view,
        "tta": config.eval.tta,
        "images_per_second": result.images_per_second,
    }


class _WallClockEval(keras.callbacks.Callback):
    """Test accuracy after each epoch; stops training once `budget` seconds have passed."""

    def __init__(self, test_x, test_y, budget: float):
        super().__init__()
        self.test_x, self.test_y, self.budget = test_x, test_y, budget
        self.curve: list[tuple[float, int, float]] = []

    def on_train_begin(self, logs=None):
        self.started, self.eval_seconds, self.done = time.time(), 0.0, False

    def on_epoch_end(self, epoch, logs=None):
        tick = time.time()
        seconds = tick - self.started - self.eval_seconds  # the seed's clock leaves its evaluations out
        accuracy = self.model.evaluate(self.test_x, self.test_y, batch_size=500, verbose=0)[1]
        self.eval_seconds += time.time() - tick
        self.curve.append((seconds, epoch + 1, float(accuracy)))
        print(f"seed: epoch {epoch + 1} at {seconds:.0f}s: test accuracy {accuracy:.2%}")
        self.done = seconds >= self.budget
        self.model.stop_training = self.done

    def on_train_batch_end(self, batch, logs=None):
        # Set again here: the evaluate() call above can leave fit's stop flag reset.
        if self.done:
            self.model.stop_training = True


def run_seed(config_path: str, overrides: list[str], budget: float) -> dict:
    keras.mixed_precision.set_global_policy("float32")
    data = _loaded(load_config(config_path, overrides).data)
    model = seed_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callback = _WallClockEval(data.test.images.astype("float32") / 255.0, data.test.labels, budget)
    x = data.train.images.astype("float32") / 255.0
    model.fit(x, data.train.labels, batch_size=32, epochs=1000, verbose=0, callbacks=[callback])
    within = [point for point in callback.curve if point[0] <= budget] or callback.curve[:1]
    return {"curve": callback.curve, "accuracy_at_budget": within[-1][2], "budget_seconds": budget}


def time_to(curve: list[tuple[float, int, float]], target: float) -> float | None:
    return next((seconds for seconds, _, accuracy in curve if accuracy >= target), None)


def target_fraction(text: str) -> float:
    """A target accuracy given as a fraction (0.9) or in percent (90)."""
    value = float(text)
    return value / 100 if value > 1 else value


def _loaded(data):
    """The dataset decoded into memory, as the trainer prepares it (CIFAR-10's JPEGs are listed first)."""
    return prepare_dataset(load_dataset(data, seed=0), data, say=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10_fast.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--targets", type=target_fraction, nargs="+", default=[0.85, 0.90], help="accuracies: 0.9 or 90 (percent)"
    )
    parser.add_argument("--no-seed", action="store_true", help="skip the seed CNN at the same wall time")
    parser.add_argument("--workdir", help="keep our run here (default: a temporary folder)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ours = run_ours(args.config, args.overrides, Path(args.workdir or scratch))
    seed = None if args.no_seed else run_seed(args.config, args.overrides, ours["seconds"])

    print(f"\n{'ours: seconds':>14} {'step':>6} {'test acc':>9}")
    for seconds, step, accuracy in ours["curve"]:
        print(f"{seconds:>14.0f} {step:>6} {accuracy:>9.2%}")
    print(f"\n{'target':>8} {'ours: wall s':>13}")
    for target in args.targets:
        reached = time_to(ours["curve"], target)
        print(f"{target:>8.0%} {'not reached' if reached is None else f'{reached:.0f}':>13}")
    print(
        f"final: {ours['final_accuracy']:.2%} with eval.tta={ours['tta']}, {ours['final_single_view']:.2%} single "
        f"view; {ours['seconds']:.0f}s wall in all (data loading and evaluations included), "
        f"{ours['images_per_second']:.0f} img/s"
    )
    if seed is not None:
        print(f"seed CNN (model.fit) after the same {seed['budget_seconds']:.0f}s: {seed['accuracy_at_budget']:.2%}")
    if args.json:
        report = {"args": vars(args), "ours": ours, "seed": seed}
        report["time_to"] = {str(t): time_to(ours["curve"], t) for t in args.targets}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
