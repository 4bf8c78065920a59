"""Input-pipeline overhead: our training loop fed by the real pipelines vs one cached batch.

The same model and optimizer run N steps on (a) the host tf.data pipeline (gather from
the decoded uint8 arrays, augmentation, per-replica slicing, prefetch), (b) the device
feed (data.placement=device: the training set on the device, batches gathered and
augmented inside the compiled step) and (c) one in-memory batch repeated, in turns
(a b c a b c ...). Overhead = 1 - a/c and 1 - b/c.

    CIFAR10_DIR=../shared/data/cifar10 python bench/pipeline_overhead.py --json pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from _common import data_overrides  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.data.device import DeviceFeed  # noqa: E402
from trainer.data.info import normalization_stats  # noqa: E402
from trainer.data.pipeline import train_dataset_fn  # noqa: E402
from trainer.data.plan import input_spec, steps_per_epoch  # noqa: E402
from trainer.data.prepare import prepare_dataset  # noqa: E402
from trainer.loop.step import StepOptions, Votes, make_train_loop  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.runtime import setup_runtime  # noqa: E402
from trainer.sums import NUM_SUMS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart_paper_cnn.yaml")
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=50, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    source, data_settings = data_overrides(args.examples, 1000)
    config = load_config(args.config, [*data_settings, *args.overrides])
    runtime = setup_runtime(config.runtime)
    data = prepare_dataset(load_dataset(config.data, config.seed), config.data, say=lambda _: None).train
    mean, std = normalization_stats(data.images)
    batch = config.data.batch_size
    with runtime.strategy.scope():
        model = build_model(
            config.model.name,
            input_shape=data.images.shape[1:],
            num_classes=10,
            mean=mean,
            std=std,
            width=config.model.width,
        )
        optimizer = build_optimizer(config.optimizer, len(data) // batch, 10 * len(data) // batch)
        optimizer.build(model.trainable_variables)
    spec = input_spec(config, data.images.shape[1])
    if args.steps > steps_per_epoch(len(data), batch):
        raise SystemExit(f"--steps {args.steps} must fit in one epoch ({steps_per_epoch(len(data), batch)} steps)")
    feed = DeviceFeed(runtime.strategy, data.images, data.labels, spec)

    def loop_for(device_feed=None):
        options = StepOptions(
            global_batch=batch,
            num_classes=10,
            label_smoothing=config.optimizer.label_smoothing,
            jit_compile=runtime.jit_compile,
            device_feed=device_feed,
        )
        compiled = make_train_loop(runtime.strategy, model, optimizer, Votes.create(), options)
        first, never = tf.constant(0, tf.int64), tf.constant(-1, tf.int64)
        return lambda batches, steps, sums: compiled(batches, first, steps, sums, never)

    loop, device_loop = loop_for(), loop_for(feed)
    real = iter(runtime.strategy.distribute_datasets_from_function(train_dataset_fn(data, spec, 0, 10**9)))
    one_batch = (data.images[:batch], data.labels[:batch])
    cached = iter(
        runtime.strategy.distribute_datasets_from_function(
            lambda context: tf.data.Dataset.from_tensors(one_batch).repeat()
        )
    )
    steps, zeros = tf.constant(args.steps), tf.zeros([NUM_SUMS])
    per_epoch = steps_per_epoch(len(data), batch)
    feeds = {
        "host pipeline": lambda turn: loop(real, steps, zeros),
        # Each turn starts a new epoch, so its calls never cross an epoch's end.
        "device feed": lambda turn: device_loop(feed.plan(turn * per_epoch), steps, zeros),
        "one cached batch": lambda turn: loop(cached, steps, zeros),
    }
    for run in feeds.values():  # trace and warm up each
        run(0)
    speeds: dict[str, list[float]] = {name: [] for name in feeds}
    for turn in range(1, args.repeats + 1):
        for name, run in feeds.items():
            tick = time.perf_counter()
            run(turn)[0].numpy()
            speeds[name].append(args.steps * batch / (time.perf_counter() - tick))
    best = {name: max(values) for name, values in speeds.items()}
    overhead = {name: 1 - best[name] / best["one cached batch"] for name in ("host pipeline", "device feed")}
    print(f"{'feed':<18} {'img/s (best of ' + str(args.repeats) + ')':>22} {'overhead':>9}")
    for name, value in best.items():
        print(f"{name:<18} {value:>22.0f} {overhead.get(name, 0.0):>9.1%}")
    print(f"({source}, {config.model.name}, batch {batch}, augment={config.data.augment}, {runtime.reason})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"source": source, "speeds": speeds, "best": best, "overhead": overhead}, handle, indent=2)


if __name__ == "__main__":
    main()
