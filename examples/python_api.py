"""The Python API end to end: your own model and action, trained, evaluated, used, exported.

    python examples/python_api.py                                # runs/python_api, 2 tiny epochs
    python examples/python_api.py --workdir /tmp/api --steps 8   # stop after 8 steps

The model (my_model.py) and the action (my_actions.py) are modules beside this script,
named in the config by import path: config.yaml records the paths, so a resume, or
`launch evaluate/predict/export` run from this folder, builds the same model again. In
a notebook, put such modules beside it and name them the same way.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description="Train, evaluate, predict and export through the Python API.")
    parser.add_argument("--workdir", default="runs/python_api", help="where the run is kept (resumed if there)")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the 2 epochs)")
    args = parser.parse_args()

    # readme:start (README.md shows these lines; tests/test_readme.py keeps them equal)
    config = trainer.load_config(
        CONFIG,  # a small synthetic run, adjusted by `section.key=value` overrides as --set does
        [
            "model.name=my_model:small_convnet",  # your network: my_model.py, beside this script
            "model.width=16",
            "train.actions=my_actions:metrics_log",  # your action: my_actions.py
            "optimizer.name=adam",
            "optimizer.learning_rate=0.01",
            "data.synthetic_train_size=2048",
            "data.synthetic_test_size=256",
            "train.epochs=2",
            f"train.max_steps={args.steps}",
        ],
    )
    result = trainer.train(config, args.workdir)  # resumes from the workdir's latest checkpoint
    print(f"Trained to step {result.step} of {result.total_steps}")

    metrics = trainer.evaluate(args.workdir)  # the latest checkpoint on the test split
    print(f"Test accuracy {metrics.accuracy:.2%}, loss {metrics.loss:.4f} ({metrics.examples} images)")

    with tempfile.TemporaryDirectory() as folder:
        for prediction in trainer.predict(args.workdir, some_images(Path(folder))):
            print(f"{Path(prediction.path).name}: {prediction.label} ({prediction.probability:.0%})")

    exported = trainer.export(args.workdir)  # model.keras and a SavedModel: pixels in, probabilities out
    print(f"Exported step {exported['step']} to {exported['keras']} and {exported['saved_model']}")
    # readme:end


def some_images(folder: Path) -> list[Path]:
    """Two 32x32 PNG files to predict on (the synthetic data's size)."""
    paths = []
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        paths.append(folder / f"image{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


if __name__ == "__main__":
    main()
