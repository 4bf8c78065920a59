"""The GPU run of the fast recipe: time to 91% (and 94%) test accuracy, img/s and MFU.

For a machine with a GPU (DEVELOPERS.md, `device`): `configs/cifar10_airbench94.yaml`
(airbench94's width, 64/256/256), GPU defaults for precision (mixed_float16) and XLA,
evaluated after every epoch. The time to each target is given twice: the wall time of the
first evaluation at or above it, counted from the start of `train` (data loading,
compilation and evaluations included: an upper bound), and the training time alone, steps
x batch / img/s, with img/s measured over every compiled call but the first (which traces
and compiles), as airbench times its runs after a warm-up.

    CIFAR10_DIR=../shared/data/cifar10 python bench/gpu.py --json gpu.json
    python bench/gpu.py --allow-cpu --config configs/smoke.yaml --targets 0.3 0.5   # checks the script, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from time_to_accuracy import run_ours, target_fraction, time_to  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.flops import peak_flops, training_flops_per_example  # noqa: E402
from trainer.models import build_model  # noqa: E402

GPU_OVERRIDES = [
    "runtime.precision=auto",  # mixed_float16 on compute capability >= 7.0
    "runtime.jit_compile=auto",  # XLA on a single GPU
    "train.eval_every_epochs=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10_airbench94.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--targets", type=target_fraction, nargs="+", default=[0.91, 0.94], help="0.91 or 91 (percent)")
    parser.add_argument("--json")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU: to check this script itself")
    args = parser.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        raise SystemExit("bench/gpu.py needs a GPU; none is visible (use bench/time_to_accuracy.py on a CPU)")
    names = [tf.config.experimental.get_device_details(gpu).get("device_name", "GPU") for gpu in gpus] or ["CPU"]
    overrides = [*GPU_OVERRIDES, *args.overrides]
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        ours = run_ours(args.config, overrides, Path(workdir))
    model = build_model(
        config.model.name, input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=config.model.width
    )
    flops = training_flops_per_example(model)
    precision = keras.mixed_precision.global_policy().name  # what the run resolved `auto` to
    peak = peak_flops(names, precision)
    mfu = flops * ours["images_per_second"] / peak if peak else None

    print(f"\n{', '.join(names)}; {config.model.name} width {config.model.width}, {flops / 1e6:.0f} MFLOP/img trained")
    batch, speed = config.data.batch_size, ours["images_per_second"]
    training = [(step * batch / speed, step, accuracy) for _, step, accuracy in ours["curve"]]
    print(f"{'wall s':>8} {'train s':>8} {'step':>6} {'test acc':>9}")
    for (seconds, step, accuracy), (train_seconds, _, _) in zip(ours["curve"], training):
        print(f"{seconds:>8.1f} {train_seconds:>8.1f} {step:>6} {accuracy:>9.2%}")
    for target in args.targets:
        reached, trained = time_to(ours["curve"], target), time_to(training, target)
        text = "not reached" if reached is None else f"{reached:.1f}s wall, {trained:.1f}s of training"
        print(f"time to {target:.0%}: {text}")
    mfu_text = f"{mfu:.1%}" if mfu is not None else "unknown (no peak for this GPU)"
    print(
        f"final {ours['final_accuracy']:.2%} (eval.tta={ours['tta']}), {ours['final_single_view']:.2%} single view; "
        f"{ours['images_per_second']:.0f} img/s, MFU {mfu_text}, {ours['seconds']:.1f}s wall"
    )
    if args.json:
        report = {"devices": names, "overrides": overrides, "ours": ours, "flops_per_image": flops, "mfu": mfu}
        report["time_to"] = {str(t): time_to(ours["curve"], t) for t in args.targets}
        report["training_time_to"] = {str(t): time_to(training, t) for t in args.targets}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
