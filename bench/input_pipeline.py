"""The streaming input pipeline (issue #14): five measurements, each printed as JSON.

    export CIFAR10_DIR=../shared/data/cifar10
    python bench/input_pipeline.py decode          # 1. ours streaming vs image_dataset_from_directory
    python bench/input_pipeline.py cache           # 2. quickstart, data.cache=none vs memory
    python bench/input_pipeline.py scale           # 3. 50,000 vs 500,000 files (hard links)
    python bench/input_pipeline.py photos          # 4. 2,000 640x480 JPEGs at image_size=128
    python bench/input_pipeline.py resume          # 5. TFRecord resume at 90% of an epoch
    python bench/input_pipeline.py per_step        # the in-memory pipeline alone at 50,000 and 500,000 examples

Side by side means alternating, in one process or one after the other, on the same cores.
Scratch data (links, photos, shards) goes to --scratch and is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.config import DataConfig, load_config  # noqa: E402
from trainer.data.pipeline import train_dataset_fn  # noqa: E402
from trainer.data.plan import InputSpec  # noqa: E402
from trainer.data.prepare import prepare_dataset  # noqa: E402
from trainer.data.sources import load_dataset  # noqa: E402


def quiet(_line: str) -> None:
    pass


def cifar_dir() -> Path:
    value = os.environ.get("CIFAR10_DIR")
    if not value or not (Path(value) / "train").is_dir():
        sys.exit("set CIFAR10_DIR to the CIFAR-10 image folder (train/<class>/*.jpg)")
    return Path(value)


def _rate(batches, count: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next `count` batches)."""
    tick = time.perf_counter()
    iterator = iter(batches)
    first = next(iterator)
    first_seconds = time.perf_counter() - tick
    images, tick = 0, time.perf_counter()
    for _ in range(count):
        images += int(next(iterator)[0].shape[0])
    del first
    return first_seconds, images / (time.perf_counter() - tick)


def ours(folder: str, batch: int, size: int = 32, crop: str = "pad", cache: str = "none", augment: bool = True):
    data = DataConfig(source="folder", path=folder, image_size=size, cache=cache)
    split = prepare_dataset(load_dataset(data, 0), data, quiet).train
    spec = InputSpec(global_batch=batch, seed=0, augment=augment, crop=crop, image_size=size)
    return train_dataset_fn(split, spec, 0, 10**9)(tf.distribute.InputContext())


def keras_folder(folder: str, batch: int, size: int = 32):
    import keras

    return keras.utils.image_dataset_from_directory(
        folder, image_size=(size, size), batch_size=batch, shuffle=True, seed=0, verbose=False
    )


def decode(args) -> dict:
    """1. Streaming decode of the CIFAR-10 JPEG train folder: ours (with and without the
    training crops and flips; Keras' has none) vs Keras, alternating."""
    train = str(cifar_dir() / "train")
    result: dict = {"ours": [], "ours_no_augmentation": [], "keras": []}
    variants = {
        "ours": lambda: ours(str(cifar_dir()), args.batch),
        "ours_no_augmentation": lambda: ours(str(cifar_dir()), args.batch, augment=False),
        "keras": lambda: keras_folder(train, args.batch),
    }
    for _ in range(args.repeats):
        for name, make in variants.items():
            tick = time.perf_counter()
            batches = make()
            listed = time.perf_counter() - tick
            first, rate = _rate(batches, args.batches)
            result[name].append(
                {"list_s": round(listed, 2), "first_batch_s": round(first, 2), "img_per_s": round(rate)}
            )
    for name in ("ours", "ours_no_augmentation"):
        ratios = [o["img_per_s"] / k["img_per_s"] for o, k in zip(result[name], result["keras"])]
        result[f"ratio_{name}_over_keras"] = [round(r, 3) for r in ratios]
    return result


def _train_speed(overrides: list[str], workdir: str) -> dict:
    from trainer.training import train

    config = load_config(REPO / "configs" / "quickstart_paper_cnn.yaml", overrides)
    tick = time.perf_counter()
    outcome = train(config, workdir, fresh=True, echo=quiet)
    return {"img_per_s": round(outcome.images_per_second, 1), "wall_s": round(time.perf_counter() - tick, 1)}


def cache(args) -> dict:
    """2. configs/quickstart_paper_cnn.yaml, data.cache=none vs memory, alternating runs of N steps."""
    result: dict = {"none": [], "memory": []}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            for mode in ("memory", "none"):
                overrides = [f"data.cache={mode}", f"train.max_steps={args.steps}", "tensorboard.images=false"]
                result[mode].append(_train_speed(overrides, f"{scratch}/{mode}"))
    result["ratio_none_over_memory"] = [
        round(n["img_per_s"] / m["img_per_s"], 3) for n, m in zip(result["none"], result["memory"])
    ]
    return result


def _link_folder(source: Path, target: Path, copies: int) -> int:
    """target/train/<class>/ with `copies` hard links per CIFAR-10 training image (no disk),
    and the real test split linked once."""
    count = 0
    for split, times in (("train", copies), ("test", 1)):
        for class_dir in sorted((source / split).iterdir()):
            out = target / split / class_dir.name
            out.mkdir(parents=True)
            for path in class_dir.iterdir():
                for copy in range(times):
                    os.link(path, out / f"{copy}-{path.name}")
                    count += 1
    return count


_SCALE_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
tick = time.perf_counter()
from trainer.config import load_config
from trainer.training import train
marks = []
config = load_config({config!r}, {overrides!r})
result = train(config, {workdir!r}, fresh=True, echo=lambda line: marks.append((time.perf_counter() - tick, line)))
first = next(t for t, line in marks if line.startswith("Epoch 1/"))
print(json.dumps({{"files_listed_s": round(next(t for t, line in marks if line.startswith("Data:")), 1),
    "time_to_first_step_s": round(first, 1), "img_per_s": round(result.images_per_second, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def scale(args) -> dict:
    """3. 50,000 vs 500,000 files (hard links to the CIFAR-10 JPEGs), streamed: peak RSS,
    time to first step and speed, each in a fresh process."""
    result: dict = {}
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        for copies in (1, 10):
            folder = scratch / f"x{copies}"
            files = _link_folder(cifar_dir(), folder, copies)
            overrides = [
                "data.source=folder",
                f"data.path={folder}",
                "data.cache=none",
                f"train.max_steps={args.steps}",
                "tensorboard.images=false",
                "data.test_examples=1000",
            ]
            child = _SCALE_CHILD.format(
                repo=str(REPO),
                config=str(REPO / "configs/quickstart_paper_cnn.yaml"),
                overrides=overrides,
                workdir=str(scratch / f"w{copies}"),
            )
            done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=3600)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            result[f"{files - 10000}_train_files"] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    small, large = result["50000_train_files"], result["500000_train_files"]
    result["rss_bytes_per_extra_file"] = round((large["peak_rss_mib"] - small["peak_rss_mib"]) * 2**20 / 450_000)
    return result


def _photo_folder(target: Path, count: int) -> None:
    """`count` 640x480 JPEGs (CIFAR-10 images upscaled), train/ and test/ like the source."""
    from PIL import Image

    per_class = count // 10
    for split, share in (("train", 0.9), ("test", 0.1)):
        for class_dir in sorted((cifar_dir() / split).iterdir()):
            out = target / split / class_dir.name
            out.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[: int(per_class * share)]:
                Image.open(path).convert("RGB").resize((640, 480), Image.BICUBIC).save(out / path.name, quality=90)


def photos(args) -> dict:
    """4. 2,000 640x480 JPEGs at data.image_size=128 with random_resized crops: the input
    pipeline alone, and training (paper_cnn, quickstart recipe)."""
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        _photo_folder(scratch / "photos", args.photos)
        first, rate = _rate(ours(str(scratch / "photos"), 64, size=128, crop="random_resized"), 20)
        # Decoding dominates here: ours (random-resized crops) vs Keras (resize), alternating.
        side_by_side: dict = {"ours_random_resized": [], "keras_resize": []}
        for _ in range(args.repeats):
            side_by_side["ours_random_resized"].append(
                round(_rate(ours(str(scratch / "photos"), 64, size=128, crop="random_resized"), 20)[1])
            )
            side_by_side["keras_resize"].append(
                round(_rate(keras_folder(str(scratch / "photos" / "train"), 64, 128), 20)[1])
            )
        overrides = [
            "data.source=folder",
            f"data.path={scratch / 'photos'}",
            "data.image_size=128",
            "data.batch_size=64",
            f"train.max_steps={args.steps}",
            "tensorboard.images=false",
        ]
        trained = _train_speed(overrides, str(scratch / "w"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "pipeline_first_batch_s": round(first, 2),
        "pipeline_img_per_s": round(rate),
        "decode_side_by_side_img_per_s": side_by_side,
        "training": trained,
    }


def resume(args) -> dict:
    """5. TFRecord shards of CIFAR-10: seconds to the first batch from step 0 and from 90%
    of an epoch (the raw records before it are read and skipped, not decoded)."""
    from trainer.data.convert import convert

    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        convert(str(cifar_dir()), str(scratch / "shards"), shard_size_mb=20, progress=quiet)
        data = DataConfig(source="tfrecord", path=str(scratch / "shards"), cache="none")
        split = prepare_dataset(load_dataset(data, 0), data, quiet).train
        spec = InputSpec(global_batch=128, seed=0, augment=True, image_size=32)
        per_epoch = len(split) // 128
        result: dict = {"steps_per_epoch": per_epoch, "from_step_0_s": [], "from_90_percent_s": []}
        for _ in range(args.repeats):
            for key, start in (("from_step_0_s", 0), ("from_90_percent_s", int(0.9 * per_epoch))):
                tick = time.perf_counter()
                next(iter(train_dataset_fn(split, spec, start, 10 * per_epoch)(tf.distribute.InputContext())))
                result[key].append(round(time.perf_counter() - tick, 2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def per_step(args) -> dict:
    """The in-memory pipeline alone (no model): random uint8 images, batch 128, pad-crop and
    flip, for 50,000 and 500,000 examples: the per-step cost must not grow with N."""
    from trainer.data.splits import Split

    result: dict = {}
    for count in (50_000, 500_000):
        rng = np.random.default_rng(0)
        split = Split(
            rng.integers(0, 255, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count).astype("int32")
        )
        spec = InputSpec(global_batch=128, seed=0, augment=True, crop_padding=4)
        batches = train_dataset_fn(split, spec, 0, 10**9)(tf.distribute.InputContext())
        result[f"{count}_img_per_s"] = [round(_rate(batches, 300)[1]) for _ in range(args.repeats)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=["decode", "cache", "scale", "photos", "resume", "per_step"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=150, help="batches timed per decode measurement")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--scratch", default=None, help="where scratch data goes (default: the temp dir)")
    args = parser.parse_args()
    result = globals()[args.measure](args)
    result["host_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps({args.measure: result}, indent=1))


if __name__ == "__main__":
    main()
