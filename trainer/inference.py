"""Using a trained workdir: evaluate, predict on image files, export.

All three rebuild the model from `config.yaml` + `dataset.json` and restore the latest
checkpoint's weights, so they need neither the training data nor the optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from trainer.checkpoints import CheckpointStore
from trainer.config import apply_override, validate
from trainer.data import load_dataset
from trainer.data.sources import read_image
from trainer.evaluation import EvalMetrics, Evaluator
from trainer.models import build_for_dataset
from trainer.runtime import setup_runtime
from trainer.workdir import DatasetInfo, Workdir


def _restore_model(wd: Workdir, info: DatasetInfo, config, checkpoint: str) -> tuple[keras.Model, int]:
    model = build_for_dataset(config.model, info)
    step = CheckpointStore(wd.checkpoints, model=model).require(checkpoint)
    return model, step


def load_trained_model(workdir: str | Path, checkpoint: str = "latest") -> tuple[keras.Model, DatasetInfo, int]:
    """A checkpoint's model in float32 (logits out), its dataset info and step.

    Args:
        checkpoint: `latest`, `best` (highest eval accuracy) or a global step.
    """
    wd = Workdir(Path(workdir))
    config, info = wd.require_trained()
    # Serving and prediction run in float32 whatever the training precision: the
    # variables are float32 either way, so the checkpoint restores unchanged.
    keras.mixed_precision.set_global_policy("float32")
    model, step = _restore_model(wd, info, config, checkpoint)
    return model, info, step


def evaluate(workdir: str | Path, overrides: Sequence[str] = (), checkpoint: str = "latest") -> EvalMetrics:
    """Test accuracy of a checkpoint, under the run's own strategy and precision.

    Writes WORKDIR/metrics.json. `overrides` (e.g. `data.path=...`) adjust the saved
    config, for data that moved since training.
    """
    wd = Workdir(Path(workdir))
    config, info = wd.require_trained()
    for override in overrides:
        apply_override(config, override)
    validate(config)
    runtime = setup_runtime(config.runtime)
    dataset = load_dataset(config.data, config.seed)
    with runtime.strategy.scope():
        model, step = _restore_model(wd, info, config, checkpoint)
    evaluator = Evaluator(runtime.strategy, model, dataset.test, config.data.batch_size, info.class_names)
    metrics = evaluator(step, tta=config.eval.tta)
    metrics.write(wd.metrics_path)
    return metrics


@dataclass
class Prediction:
    path: str
    label: str
    probability: float
    probabilities: dict[str, float]


def load_images(paths: Sequence[str | Path], image_shape: Sequence[int]) -> np.ndarray:
    """Decode image files to uint8 [N, H, W, 3], resizing any other size to the model's."""
    height, width = image_shape[0], image_shape[1]
    batch = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        pixels = read_image(Path(path))
        if pixels.shape[:2] != (height, width):
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
        batch[i] = pixels
    return batch


def predict(workdir: str | Path, paths: Sequence[str | Path], checkpoint: str = "latest") -> list[Prediction]:
    """Class and softmax probability for each image file."""
    model, info, _ = load_trained_model(workdir, checkpoint)
    images = load_images(paths, info.image_shape)
    logits = model.predict_on_batch(images.astype(np.float32))
    probabilities = tf.nn.softmax(logits).numpy()
    predictions = []
    for path, probs in zip(paths, probabilities):
        best = int(np.argmax(probs))
        predictions.append(
            Prediction(
                str(path),
                info.class_names[best],
                float(probs[best]),
                {name: float(p) for name, p in zip(info.class_names, probs)},
            )
        )
    return predictions


def inference_model(model: keras.Model) -> keras.Model:
    """The trained network with a softmax on top: 0-255 pixels in, probabilities out."""
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(model.output)
    return keras.Model(model.input, probabilities, name=f"{model.name}_inference")


def export(workdir: str | Path, checkpoint: str = "latest") -> dict[str, Path]:
    """Write WORKDIR/export/model.keras and a SavedModel (`serve` endpoint) beside it."""
    model, info, step = load_trained_model(workdir, checkpoint)
    wd = Workdir(Path(workdir))
    wd.export.mkdir(parents=True, exist_ok=True)
    serving = inference_model(model)
    keras_path = wd.export / "model.keras"
    saved_model_path = wd.export / "saved_model"
    serving.save(keras_path)
    serving.export(str(saved_model_path), format="tf_saved_model", verbose=False)
    (wd.export / "labels.txt").write_text("\n".join(info.class_names) + "\n")
    return {"keras": keras_path, "saved_model": saved_model_path, "labels": wd.export / "labels.txt", "step": step}
