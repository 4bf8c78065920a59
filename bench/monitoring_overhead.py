"""What TensorBoard logging costs: the same training with full and with minimal monitoring.

Runs alternate (A B A B ...) in one process so that machine noise hits both alike.
Full = the defaults (scalars every steps_per_loop steps, input grid, confusion matrix and
misclassified images at every eval); minimal = scalars once per epoch and no images.
Prints a table and, with --json, writes the numbers.

    CIFAR10_DIR=../shared/data/cifar10 python bench/monitoring_overhead.py --json overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import data_overrides  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.training import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart_paper_cnn.yaml")
    parser.add_argument("--examples", type=int, default=10000, help="training examples used")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    source, common = data_overrides(args.examples, 2000)
    common += [f"train.epochs={args.epochs}", "checkpoint.keep_best=false"]
    rare = 1000 * load_config(args.config).train.steps_per_loop  # in effect: only at epoch ends
    variants = {"full": [], "minimal": [f"tensorboard.every_steps={rare}", "tensorboard.images=false"]}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            with tempfile.TemporaryDirectory() as workdir:
                tick = time.perf_counter()
                result = train(load_config(args.config, [*common, *extra]), workdir, echo=lambda _: None)
                results[name].append({"img_per_s": result.images_per_second, "wall_s": time.perf_counter() - tick})
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "img_per_s": max(r["img_per_s"] for r in runs),
            "wall_s": min(r["wall_s"] for r in runs),
        }
    overhead_speed = 1 - summary["full"]["img_per_s"] / summary["minimal"]["img_per_s"]
    overhead_wall = summary["full"]["wall_s"] / summary["minimal"]["wall_s"] - 1
    print(f"{'variant':<10} {'train img/s (best)':>20} {'wall s (best)':>15}")
    for name, row in summary.items():
        print(f"{name:<10} {row['img_per_s']:>20.0f} {row['wall_s']:>15.1f}")
    print(f"overhead: {overhead_speed:+.1%} training speed, {overhead_wall:+.1%} wall time (incl. evals)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "source": source,
                    "runs": results,
                    "summary": summary,
                    "overhead_speed": overhead_speed,
                    "overhead_wall": overhead_wall,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
