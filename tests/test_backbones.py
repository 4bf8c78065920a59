"""Keras Applications backbones: building, training, starting weights, freeze/unfreeze, resume."""

import json
import shutil
import socket
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import REPO, made_once, smoke_config
from trainer.backbones import BACKBONES, FreezePlan
from trainer.config import BACKBONE_NAMES, ModelConfig, load_config
from trainer.errors import ConfigError
from trainer.flops import forward_flops_per_example
from trainer.inference import load_trained_model
from trainer.models import build_model, model_names
from trainer.runtime import set_op_determinism
from trainer.training import train

SMOKE = str(REPO / "configs" / "smoke.yaml")
# Small runs: 8 images a step, 64 in the training set (8 steps an epoch), 16 to evaluate.
TINY = (
    "data.batch_size=8",
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=16",
    "train.steps_per_loop=4",
    "checkpoint.every_steps=0",
    "tensorboard.images=false",
)


def quiet(_line: str) -> None:
    pass


def _train(workdir, *overrides: str, echo=quiet):
    return train(smoke_config(*TINY, *overrides), workdir, echo=echo)


def test_offered_names_agree_and_a_typo_suggests_the_nearest():
    assert list(BACKBONES) == list(BACKBONE_NAMES)
    assert set(model_names()) == set(ModelConfig.__dataclass_fields__["name"].metadata["choices"])
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        load_config(None, ["model.name=resnet_50"])
    with pytest.raises(ConfigError, match="model.freeze_backbone is for Keras Applications backbones"):
        load_config(None, ["model.freeze_backbone=true"])
    with pytest.raises(ConfigError, match="optimizer.name=sgd only, got adam"):
        load_config(None, ["model.name=resnet50", "model.backbone_lr_multiplier=0.1", "optimizer.name=adam"])
    with pytest.raises(ConfigError, match="the backbone would never train"):
        frozen = ["model.freeze_backbone=true", "model.unfreeze_at_epoch=3", "train.epochs=3"]
        load_config(None, ["model.name=resnet50", *frozen])


@pytest.mark.parametrize("size", [32, pytest.param(96, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_backbone_builds_at_32_and_96_pixels_from_raw_pixels_to_float32_logits(name, size):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_model(
        name, input_shape=(size, size, 3), num_classes=7, mean=[0.0] * 3, std=[1.0] * 3, batchnorm_momentum=0.9
    )
    logits = model(np.full((2, size, size, 3), 127.0, np.float32), training=False)
    assert logits.shape == (2, 7) and logits.dtype == "float32"
    assert model.get_layer(name).count_params() > 500_000  # the Keras network, nested under its name
    layers = model.get_layer(name)._flatten_layers()
    batchnorm = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.synchronized for layer in batchnorm)  # N replicas train like one
    assert all(layer.momentum == 0.9 for layer in batchnorm)
    assert batchnorm or name.startswith("convnext")  # ConvNeXt normalises with LayerNorm


def test_flops_count_the_nested_backbone():
    """Published multiply-adds at 224x224: ResNet-50 ~3.9 G, MobileNetV3-Small ~0.06 G, EfficientNetV2-B0 0.72 G."""
    for name, gmacs in (("resnet50", 3.86), ("mobilenet_v3_small", 0.057), ("efficientnetv2_b0", 0.72)):
        model = build_model(name, input_shape=(224, 224, 3), num_classes=1000, mean=[0.0] * 3, std=[1.0] * 3)
        assert forward_flops_per_example(model) / 2e9 == pytest.approx(gmacs, rel=0.03), name


def test_resnet50_sees_the_caffe_preprocessing_keras_documents():
    """Our layers on raw RGB == keras.applications.resnet50.preprocess_input, then the same network."""
    model = build_model("resnet50", input_shape=(32, 32, 3), num_classes=3, mean=[0.0] * 3, std=[1.0] * 3)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    ours = keras.Model(model.input, model.get_layer("caffe").output)(pixels)
    expected = keras.applications.resnet50.preprocess_input(pixels.copy())
    np.testing.assert_allclose(ours, expected, atol=1e-4)


# MobileNetV3 trains in the default suite (below: the fine-tuning, starting-weights and
# photos tests); every backbone at both sizes trains with `make test-slow` (each costs
# 25-45 s on a 2-core CPU).
_TRAIN_RUNS = [(name, size) for name in BACKBONE_NAMES for size in (32, 96)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), _TRAIN_RUNS)
def test_backbone_trains_two_steps_and_evaluates(tmp_path, name, size):
    precision = "runtime.precision=mixed_bfloat16"
    result = _train(tmp_path, f"model.name={name}", f"data.image_size={size}", "train.max_steps=2", precision)
    assert result.step == 2 and result.final_eval is not None
    assert np.isfinite(result.final_eval.loss)


def _starting_file(path) -> str:
    """A MobileNetV3-Small weights file (`.weights.h5`, as Keras' ImageNet files are) with
    BatchNorm statistics of real activations.

    A random backbone's features vanish in inference mode (moving variance 1): one forward
    pass in training mode with momentum 0 sets every layer's statistics from a batch, as a
    pretrained file would have them. A weights file, not a `.keras` model: each run loads it
    into the backbone it built instead of building a second model from the file (the
    starting-weights test below starts from a `.keras` export). Seeded: unseeded, its
    weights were whatever the process's RNG state made them, and 2 of 10 such files
    (seeds 1 and 9) took the fine-tuning run's loss to NaN by step 12.
    """
    keras.utils.set_random_seed(0)  # as every train() does before it builds its model
    model = build_model("mobilenet_v3_small", input_shape=(32, 32, 3), num_classes=3, mean=[0.0] * 3, std=[1.0] * 3)
    backbone = model.get_layer("mobilenet_v3_small")
    for layer in backbone._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32), training=True)
    backbone.save_weights(path)
    return str(path)


@pytest.mark.slow  # the default suite proves synchronized BatchNorm on resnet_small (test_distribution.py)
def test_two_replicas_train_a_backbone_like_one(tmp_path):
    """Synchronized BatchNorm over the global batch: 1 and 2 replicas give the same weights
    after 3 steps up to rounding, amplified through 50 normalisations. Largest differences
    measured: kernels 4.8e-3, statistics 7.8e-5, head 8.3e-6; with synchronization switched
    off they were 0.91, 0.43 and 0.033 (per-replica statistics of 4 images, not 8)."""
    same = ("model.name=mobilenet_v3_small", "model.head_dropout=0", "train.max_steps=3", "runtime.deterministic=true")
    for replicas in (1, 2):
        _train(tmp_path / str(replicas), *same, f"runtime.cpu_replicas={replicas}")
    one, two = _parts(tmp_path / "1", 3), _parts(tmp_path / "2", 3)
    for part, bound in (("kernels", 2e-2), ("statistics", 1e-3), ("head", 1e-4)):
        assert max(np.abs(a - b).max() for a, b in zip(one[part], two[part])) < bound, part


FINE_TUNE = (
    "model.name=mobilenet_v3_small",
    "model.freeze_backbone=true",
    "model.unfreeze_at_epoch=1",
    "model.backbone_lr_multiplier=0.1",
    "optimizer.learning_rate=0.002",
    "train.epochs=2",
    "runtime.deterministic=true",
    "checkpoint.every_steps=4",
    "checkpoint.keep=10",
    "train.eval_every_epochs=2",  # at the end only: it changes no weight, and costs a trace per run
)


def _parts(workdir, step: int) -> dict[str, list[np.ndarray]]:
    """A checkpoint's backbone kernels, BatchNorm statistics and head, as `launch evaluate` loads them."""
    model, _, _ = load_trained_model(workdir, str(step), warn=quiet)
    backbone = model.get_layer(model.name)
    return {
        "kernels": [v.numpy() for v in backbone.weights if v.path.endswith("kernel")],
        "statistics": [v.numpy() for v in backbone.weights if "moving_" in v.path],
        "head": [v.numpy() for v in model.get_layer("logits").weights],
    }


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))


class FineTuned(NamedTuple):
    workdir: Path  # read only: copy it first to write (an export goes into the workdir)
    weights: str  # the run's model.weights override
    lines: list[str]  # what the run said


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> FineTuned:
    """The straight FINE_TUNE run from `_starting_file` (~10 CPU-s), made once per test run
    (conftest.made_once) for the freeze test, which resumes runs to compare with it, and the
    starting-weights test, which exports a copy of it."""

    def make(folder: Path) -> None:
        lines: list[str] = []
        weights = f"model.weights={_starting_file(folder / 'start.weights.h5')}"
        policy = keras.mixed_precision.global_policy().name
        try:
            _train(folder / "straight", *FINE_TUNE, weights, echo=lines.append)
        finally:  # the requesting test starts from TensorFlow's defaults, as conftest promises
            keras.mixed_precision.set_global_policy(policy)
            set_op_determinism(False)
        (folder / "run.json").write_text(json.dumps({"weights": weights, "lines": lines}))

    folder = made_once(tmp_path_factory, "backbone-fine-tuned", make)
    run = json.loads((folder / "run.json").read_text())
    return FineTuned(folder / "straight", run["weights"], run["lines"])


def test_freeze_then_unfreeze_trains_what_it_says_and_resumes_bit_for_bit_on_both_sides(
    tmp_path, monkeypatch, fine_tuned
):
    """Epoch 1: head only, backbone and its BatchNorm statistics untouched; epoch 2: the
    backbone trains, BatchNorm statistics stay. Stops one step before and one after the
    unfreeze step (8) resume to the same weights and optimizer state as a straight run
    (the `fine_tuned` fixture's)."""
    straight, weights, lines = fine_tuned
    assert any(line.startswith("Fine-tuning: the head trains alone for 1 epoch(s)") for line in lines)
    assert "Step 8: the backbone is unfrozen and trains from here on" in lines
    start, frozen_end, end = (_parts(straight, step) for step in (4, 8, 16))
    assert not any(np.array_equal(a, b) for a, b in zip(start["head"], frozen_end["head"]))  # the head trains
    assert _same(start["kernels"], frozen_end["kernels"]) and _same(start["statistics"], frozen_end["statistics"])
    assert not _same(frozen_end["kernels"], end["kernels"])  # unfrozen: the backbone trains...
    assert _same(frozen_end["statistics"], end["statistics"])  # ...with BatchNorm in inference mode
    resumed = tmp_path / "resumed"
    for stop in (7, 9):
        monkeypatch.setenv("TRAINER_STOP_AT_STEP", str(stop))
        assert _train(resumed, *FINE_TUNE, weights).stopped_by
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    assert _train(resumed, *FINE_TUNE, weights).step == 16
    expected = tf.train.load_checkpoint(str(straight / "checkpoints" / "ckpt-16"))
    actual = tf.train.load_checkpoint(str(resumed / "checkpoints" / "ckpt-16"))
    names = [n for n in expected.get_variable_to_shape_map() if not n.startswith(("_CHECKPOINTABLE", "save_counter"))]
    assert any("optimizer" in n for n in names)
    for name in names:
        np.testing.assert_array_equal(actual.get_tensor(name), expected.get_tensor(name), err_msg=name)


def test_freeze_plan_steps():
    plan = FreezePlan.of(ModelConfig(name="resnet50", freeze_backbone=True, unfreeze_at_epoch=2), 10)
    assert [plan.frozen_at(s) for s in (0, 19, 20, 30)] == [True, True, False, False]
    assert FreezePlan.of(ModelConfig(name="resnet50", freeze_backbone=True), 10).frozen_at(10**9)
    assert not FreezePlan.of(ModelConfig(name="resnet50"), 10).frozen_at(0)


def test_starting_weights_from_our_own_export_and_one_line_errors(tmp_path, fine_tuned):
    """Run A (10 classes: the `fine_tuned` run, whose backbone trained in its second epoch,
    ending at step 16) is exported; run B (5 classes) starts from it with a frozen
    backbone: B's backbone is A's, its head is new. A weights file of another backbone and
    imagenet without a network are one error line each, before the workdir exists."""
    source = tmp_path / "a"
    shutil.copytree(fine_tuned.workdir, source)  # `launch export` writes into the workdir
    # model.keras only: the SavedModel that `launch export` also writes by default is not read here.
    assert CliRunner().invoke(cli, ["export", "--workdir", str(source), "--format", "keras"]).exit_code == 0
    exported = source / "export" / "model.keras"
    lines: list[str] = []
    target = tmp_path / "b"
    _train(
        target,
        "model.name=mobilenet_v3_small",
        f"model.weights={exported}",
        "model.freeze_backbone=true",
        "data.synthetic_classes=5",
        "train.max_steps=4",
        echo=lines.append,
    )
    assert f"Starting weights: mobilenet_v3_small weights from {exported}" in lines
    b = _parts(target, 4)
    assert _same(_parts(source, 16)["kernels"], b["kernels"])
    assert b["head"][0].shape[-1] == 5

    other = tmp_path / "large.weights.h5"
    keras.applications.MobileNetV3Large(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(other)
    for weights, message in (
        (other, f"Error: model.weights={other} does not fit model.name=mobilenet_v3_small"),
        (tmp_path / "missing.keras", "no such file"),
    ):
        result = CliRunner().invoke(
            cli,
            ["train", "--config", SMOKE, "--workdir", str(tmp_path / "c"), "--set", "model.name=mobilenet_v3_small"]
            + ["--set", f"model.weights={weights}"],
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()[-1:]) == 1 and "Traceback" not in result.output
        assert not (tmp_path / "c").exists()


def _online() -> bool:
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_imagenet_offline_is_one_line_naming_the_file_and_where_it_goes(tmp_path, monkeypatch):
    if _online():
        pytest.skip("this machine can download the ImageNet weights")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    result = CliRunner().invoke(
        cli,
        ["train", "--config", SMOKE, "--workdir", str(tmp_path / "run")]
        + ["--set", "model.name=mobilenet_v3_small", "--set", "model.weights=imagenet"],
    )
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    wanted = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    assert "Keras could not download https://" in error[0] and wanted in error[0]
    assert str(tmp_path / "keras" / "models" / wanted) in error[0]
    assert not (tmp_path / "run").exists()


def test_the_photos_config_trains_a_backbone_on_a_folder_at_its_resolution_and_predicts(tmp_path):
    from tests.test_streaming import write_mixed_folder
    from trainer.inference import predict

    photos = write_mixed_folder(str(tmp_path / "photos"), per_class=4)
    # 12 training photos in batches of 4: both steps fall in the first epoch, so it evaluates once.
    overrides = [f"data.path={photos}", "data.batch_size=4", "train.max_steps=2", "tensorboard.images=false"]
    config = load_config(REPO / "configs" / "photos_mobilenet.yaml", overrides)
    assert (config.model.name, config.data.image_size) == ("mobilenet_v3_large", 128)
    result = train(config, tmp_path / "run", echo=quiet)
    assert result.step == 2 and np.isfinite(result.final_eval.loss)
    image = next((tmp_path / "photos" / "test").rglob("*.*"))
    [prediction] = predict(tmp_path / "run", [image], warn=quiet)
    assert prediction.label in prediction.probabilities and len(prediction.probabilities) == 3


def test_launch_models_lists_every_name_with_its_size():
    result = CliRunner().invoke(cli, ["models", "--size", "32"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:-1]}
    assert list(rows) == model_names()
    assert rows["resnet50"][1:3] == ["keras.applications.ResNet50", "23.61M"]
    assert rows["paper_cnn"][1] == "ours"
