"""Using a trained workdir: evaluate, predict on image files, export.

All three rebuild the model from `config.yaml` + `dataset.json` and restore the latest
checkpoint's weights, so they need neither the training data nor the optimizer state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer import files, storage
from trainer.checkpoints import CheckpointStore
from trainer.config import Config, apply_override, validate
from trainer.data.decode import eval_view
from trainer.data.diagnose import input_culprit, input_error
from trainer.data.image_file import read_image
from trainer.data.info import DatasetInfo
from trainer.data.plan import resolve_crop
from trainer.data.prepare import prepare_for_inference, training_info
from trainer.data.skips import FILE_NAME as UNREADABLE_FILE
from trainer.data.skips import SkipMemo
from trainer.errors import DataError, WorkdirWriteError
from trainer.evaluation import EvalMetrics, Evaluator
from trainer.export_formats import DEFAULT_FORMATS, FORMATS, parse_formats, require_packages, write_formats
from trainer.models import build_for_dataset
from trainer.preemption import signals_interrupt
from trainer.runtime import setup_runtime
from trainer.say import Say
from trainer.workdir import Workdir


def _restore_model(wd: Workdir, info: DatasetInfo, config, checkpoint: str) -> tuple[keras.Model, int]:
    model = build_for_dataset(config.model, info)
    step = CheckpointStore(wd.checkpoints, model=model).require(checkpoint)
    return model, step


def trained_workdir(wd: Workdir, warn: Say = print) -> tuple[Config, DatasetInfo]:
    """Config and dataset info of a trained workdir; a damaged dataset.json is rebuilt."""
    config = wd.require_config()
    info = wd.read_dataset_info(warn)
    if info is None:
        info = rebuild_dataset_info(wd, config, warn)
    return config, info


def rebuild_dataset_info(wd: Workdir, config: Config, warn: Say) -> DatasetInfo:
    """dataset.json from the data config.yaml names (what training wrote, recomputed)."""
    info, _ = training_info(*prepare_for_inference(config, warn))
    if wd.is_busy():
        return info  # the trainer holding the workdir writes its own
    try:
        wd.write_dataset_info(info)
    except OSError as err:
        warn(f"Warning: could not rewrite {wd.dataset_info_path} ({err.strerror}); using the rebuilt values")
    return info


def load_trained_model(
    workdir: str | Path, checkpoint: str = "latest", warn: Say = print
) -> tuple[keras.Model, DatasetInfo, int]:
    """A checkpoint's model in float32 (logits out), its dataset info and step.

    Args:
        checkpoint: `latest`, `best` (highest eval accuracy) or a global step.
    """
    wd = Workdir(workdir)
    config, info = trained_workdir(wd, warn)
    # Serving and prediction run in float32 whatever the training precision: the
    # variables are float32 either way, so the checkpoint restores unchanged.
    keras.mixed_precision.set_global_policy("float32")
    model, step = _restore_model(wd, info, config, checkpoint)
    return model, info, step


def evaluate(
    workdir: str | Path, overrides: Sequence[str] = (), checkpoint: str = "latest", warn: Say = print
) -> EvalMetrics:
    """Test accuracy of a checkpoint, under the run's own strategy and precision.

    Writes nothing: `save_metrics` does, once the caller has shown the numbers.
    `overrides` (e.g. `data.path=...`) adjust the saved config, for data that moved.
    """
    wd = Workdir(workdir)
    config, info = trained_workdir(wd, warn)
    for override in overrides:
        apply_override(config, override)
    validate(config)
    # One process evaluates, whatever cluster the run trained on or the pod it runs in
    # ($TF_CONFIG, a Slurm step): joining that cluster would wait for peers forever.
    runtime = setup_runtime(config.runtime, announce=warn, cluster=False)
    dataset, spec = prepare_for_inference(config, warn, SkipMemo(wd.path(UNREADABLE_FILE), warn))
    with runtime.strategy.scope():
        model, step = _restore_model(wd, info, config, checkpoint)
    evaluator = Evaluator(runtime.strategy, model, dataset.test, config.data.batch_size, info.class_names, spec=spec)
    try:
        return evaluator(step, tta=config.eval.tta)
    except tf.errors.InvalidArgumentError as err:
        found = input_error(dataset, spec)  # the test split, checked whole
        raise found or DataError(f"cannot decode a test image: {files.short(err.message)}") from None
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as err:
        # A test file deleted, moved or locked since it was listed, named; else the error as it was.
        raise input_culprit(dataset, spec) or err from None


def save_metrics(workdir: str | Path, metrics: EvalMetrics) -> tuple[str, bool]:
    """Write `launch evaluate`'s metrics; returns (path, whether a trainer was running).

    metrics.json belongs to the trainer while it runs (it writes its final evaluation
    there), so an evaluation of a busy workdir goes to metrics-evaluate.json instead.
    """
    wd = Workdir(workdir)
    busy = wd.is_busy()
    path = wd.path("metrics-evaluate.json") if busy else wd.metrics_path
    try:
        metrics.write(path)
    except OSError as err:
        raise WorkdirWriteError(
            f"cannot write {path}: {err.strerror or err}; the metrics above were not saved "
            "(use a writable --workdir, or copy the workdir)"
        ) from err
    return path, busy


@dataclass
class Prediction:
    path: str
    label: str
    probability: float
    probabilities: dict[str, float]


def load_images(paths: Sequence[str | Path], image_shape: Sequence[int], crop: str = "pad") -> np.ndarray:
    """Decode image files to uint8 [N, H, W, 3] as evaluation sees them: resized to the
    model's size (pad recipe) or center-cropped (random_resized recipe).

    Large JPEGs are decoded at a reduced scale close to the model's input size (PIL's
    draft mode), so a photo costs memory for a thumbnail, not for its full size.
    """
    size = image_shape[0]
    batch = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        pixels = read_image(Path(path), draft_size=(size, size))
        batch[i] = eval_view(tf.constant(pixels), size, crop).numpy()
    return batch


def predict(
    workdir: str | Path, paths: Sequence[str | Path], checkpoint: str = "latest", warn: Say = print
) -> list[Prediction]:
    """Class and softmax probability for each image file."""
    model, info, _ = load_trained_model(workdir, checkpoint, warn)
    crop = resolve_crop(Workdir(workdir).require_config().data.crop, info.image_shape[0])
    images = load_images(paths, info.image_shape, crop)
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


def export(
    workdir: str | Path,
    checkpoint: str = "latest",
    warn: Say = print,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> dict[str, str | int]:
    """Write the model into WORKDIR/export/ in each of `formats`, with labels.txt beside.

    keras -> model.keras, saved_model -> saved_model/ (`serve` endpoint), tflite ->
    model.tflite, onnx -> model.onnx (trainer.export_formats). Everything is written into
    a temporary folder beside export/, which replaces it only once complete: an
    interrupted export leaves the previous one as it was. Returns each format's path,
    `labels` and `step`.
    """
    formats = parse_formats(",".join(formats))
    require_packages(formats)  # before the seconds spent loading the model
    wd = Workdir(workdir)
    wd.check_folder(wd.export)  # a user's file named export/ is not ours to replace
    _check_not_a_link(wd.export)
    model, info, step = load_trained_model(workdir, checkpoint, warn)
    if not all(name.isprintable() for name in info.class_names):
        raise DataError("a class name holds a line break or control character; labels.txt needs one name per line")
    serving = inference_model(model)
    try:
        # SIGTERM/SIGHUP raise like Ctrl-C, so replacing_folder removes its temporary folder.
        with (
            signals_interrupt("stopped exporting; the previous export is kept"),
            files.replacing_folder(wd.export) as folder,
        ):
            write_formats(serving, folder, formats)
            files.write_text(folder / "labels.txt", "\n".join(info.class_names) + "\n")
    except OSError as err:
        reason = err.strerror or err
        raise WorkdirWriteError(f"cannot write {wd.export}: {reason}; the previous export is kept") from err
    paths: dict[str, str | int] = {name: storage.join(wd.export, FORMATS[name]) for name in formats}
    return {**paths, "labels": storage.join(wd.export, "labels.txt"), "step": step}


def _check_not_a_link(path: str) -> None:
    """export/ is replaced whole, by a rename beside it: a symbolic link there would be
    replaced by a folder (its target left as it was, the link kept aside, blocking every
    later export), so it is refused: the trainer deletes only what it created."""
    if not storage.is_url(path) and os.path.islink(path):
        raise WorkdirWriteError(
            f"cannot write {path}: it is a symbolic link (to {os.readlink(path)}), where the trainer replaces a "
            "folder of its own as a whole; remove the link (its target is not touched), and copy the export "
            "where you need it after `launch export`"
        )
