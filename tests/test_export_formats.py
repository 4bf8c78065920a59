"""`launch export --format` (#28 item 3): model.tflite and model.onnx, each loaded by its
own runtime (LiteRT's interpreter, onnxruntime), agree with `launch predict`; the choice of
formats, a missing converter and an interrupted export each end in one line.

The runtimes come from the `export` extra, which `make setup` installs (Makefile EXTRAS):
these tests run in CI, never skipped. They reuse test_cli's trained smoke workdir (copied).
"""

from __future__ import annotations

import errno
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from tests import test_cli
from tests.conftest import smoke_config
from tests.test_safety import assert_one_error, quiet, run_cli, snapshot
from trainer import export_formats
from trainer.errors import ConfigError
from trainer.inference import load_images, predict
from trainer.training import train

# test_cli's smoke run (48 steps, test accuracy > 0.8: confident probabilities) and six of
# its synthetic test images as PNG files.
trained, images = test_cli.trained, test_cli.images

# Measured on this run's model: tflite and onnx differ from `launch predict` by at most
# ~1e-7 in any probability (float32 throughout, other kernels); 1e-5 leaves room for other CPUs.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, str, float]:
    """A copy of the trained workdir exported in all four formats: (workdir, output, seconds)."""
    workdir = Path(shutil.copytree(trained, tmp_path_factory.mktemp("exported") / "run"))
    started = time.perf_counter()
    result = run_cli("export", "--workdir", str(workdir), "--format", "keras,saved_model,tflite,onnx")
    assert result.exit_code == 0, result.output
    return workdir, result.output, time.perf_counter() - started


def _predicted(workdir: Path, paths: list[Path]) -> np.ndarray:
    """`launch predict`'s probabilities, one row per image, in labels.txt's order."""
    labels = (workdir / "export" / "labels.txt").read_text().split()
    return np.array([[p.probabilities[name] for name in labels] for p in predict(workdir, paths, warn=quiet)])


def _run_tflite(path: Path, batch: np.ndarray) -> np.ndarray:
    """model.tflite in LiteRT's interpreter (ai-edge-litert), through its one signature."""
    interpreter = Interpreter(model_path=str(path))
    (key,) = interpreter.get_signature_list()
    (given,) = interpreter.get_input_details()
    (output,) = interpreter.get_output_details()
    assert given["dtype"] == np.float32 and output["dtype"] == np.float32
    assert list(given["shape_signature"]) == [-1, *batch.shape[1:]]  # any batch size
    (probabilities,) = interpreter.get_signature_runner(key)(pixels=batch).values()
    return probabilities


def _run_onnx(path: Path, batch: np.ndarray) -> np.ndarray:
    """model.onnx in onnxruntime: one input (the pixels), one output (the probabilities)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    (output,) = session.get_outputs()
    assert (given.name, given.type, given.shape[1:]) == ("pixels", "tensor(float)", list(batch.shape[1:]))
    assert (output.name, output.type) == ("probabilities", "tensor(float)")
    return session.run(None, {"pixels": batch})[0]


RUNTIMES = {"tflite": _run_tflite, "onnx": _run_onnx}


def test_all_four_formats_are_written_and_listed(exported):
    workdir, output, seconds = exported
    export = workdir / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "_SUCCESS",
        "labels.txt",
        "model.keras",
        "model.onnx",
        "model.tflite",
        "saved_model",
    ]
    written = ", ".join(str(export / name) for name in ("model.keras", "saved_model", "model.tflite"))
    assert f"Exported step 48: {written} and {export / 'model.onnx'} (labels in {export / 'labels.txt'})" in output
    assert not list(workdir.glob(".export.tmp-*"))
    print(f"export of all four formats: {seconds:.1f} s")  # shown with -s: the cost of --format


@pytest.mark.parametrize("name", ["tflite", "onnx"])
def test_each_format_in_its_own_runtime_agrees_with_launch_predict(exported, images, tmp_path, name):
    """Probabilities within TOLERANCE of predict's, for the six test images and an odd-sized one."""
    workdir, _, _ = exported
    paths = list(images[0])
    odd = tmp_path / "odd.png"  # 64x48: predict resizes it, and so does load_images below
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(odd)
    paths.append(odd)
    expected = _predicted(workdir, paths)
    batch = load_images(paths, (32, 32, 3)).astype(np.float32)  # predict's own decoding and resizing
    got = RUNTIMES[name](workdir / "export" / f"model.{name}", batch)
    assert got.dtype == np.float32 and got.shape == expected.shape == (7, 10)
    difference = float(np.abs(got - expected).max())
    print(f"{name}: largest difference from launch predict {difference:.1e}")
    assert difference <= TOLERANCE
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.mean(expected.argmax(axis=1)[:6] == images[1]) >= 0.5  # a trained model, not a uniform one


@pytest.mark.parametrize(
    ("model", "precision", "size", "formats"),
    [
        # a mixed-precision run's checkpoint is rebuilt in float32 for export, as for predict
        ("paper_cnn", "mixed_bfloat16", 32, "tflite,onnx"),
        ("resnet_small", "float32", 32, "tflite,onnx"),  # BatchNorm, residual adds
        ("airbench", "float32", 32, "tflite,onnx"),  # exact GELU: Erfc, written as 1 - Erf for onnx
        # a Keras Applications backbone at its own size (~40 s: make test-slow)
        pytest.param("mobilenet_v3_small", "mixed_bfloat16", 64, "tflite,onnx", marks=pytest.mark.slow),
    ],
)
def test_other_models_export_float32_files_that_agree_with_predict(images, tmp_path, model, precision, size, formats):
    """Two training steps each: the graph, not the accuracy, is under test. The runners
    assert float32 in and out."""
    workdir = tmp_path / "run"
    overrides = (f"model.name={model}", f"runtime.precision={precision}", f"data.image_size={size}")
    train(smoke_config(*overrides, "train.max_steps=2"), workdir, echo=quiet)
    result = run_cli("export", "--workdir", str(workdir), "--format", formats)
    assert result.exit_code == 0, result.output
    names = formats.split(",")
    assert sorted(p.name for p in (workdir / "export").iterdir()) == sorted(
        ["_SUCCESS", "labels.txt", *(f"model.{n}" for n in names)]
    )
    paths = list(images[0][:3])
    expected = _predicted(workdir, paths)
    batch = load_images(paths, (size, size, 3)).astype(np.float32)
    for name in names:
        got = RUNTIMES[name](workdir / "export" / f"model.{name}", batch)
        assert float(np.abs(got - expected).max()) <= TOLERANCE, name


def test_an_op_onnx_cannot_express_is_refused_by_name(tmp_path):
    """tf2onnx keeps an op it cannot convert (Lgamma) unconverted, and onnxruntime would
    refuse that file: the export refuses it first, in one line, and writes nothing."""
    inputs = keras.Input((4, 4, 3), name="pixels")
    hidden = keras.layers.Lambda(tf.math.lgamma)(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(hidden), name="lgamma_net_inference")
    with pytest.raises(ConfigError, match=r"cannot export model lgamma_net: tf2onnx \S+ has no ONNX conversion") as err:
        export_formats.write_formats(model, tmp_path, ["onnx"])
    assert "op(s) Lgamma; export it as tflite or saved_model instead" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_exact_gelu_exports_to_onnx_as_one_minus_erf(tmp_path):
    """Exact GELU (airbench, the quickstart's net) is Erfc in TensorFlow, which tf2onnx
    cannot convert: written as 1 - Erf, the file loads in onnxruntime and agrees with Keras."""
    inputs = keras.Input((4, 4, 3), name="pixels")
    hidden = keras.layers.Activation("gelu")(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(hidden), name="gelu_net_inference")
    export_formats.write_formats(model, tmp_path, ["onnx"])
    pixels = np.random.default_rng(0).normal(0, 3, (5, 4, 4, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels})
    assert float(np.abs(got - model.predict(pixels, verbose=0)).max()) <= TOLERANCE


def test_an_unknown_format_is_one_line_naming_the_valid_ones(tmp_path):
    result = run_cli("export", "--workdir", str(tmp_path / "run"), "--format", "keras,tfjs")
    assert_one_error(result, "unknown export format 'tfjs'", "keras, saved_model, tflite, onnx", "--format keras,onnx")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["tf2onnx", "onnx"])
def test_a_missing_converter_names_the_export_extra_and_keeps_the_export(exported, monkeypatch, module):
    workdir, _, _ = exported
    before = snapshot(workdir)
    monkeypatch.setitem(sys.modules, module, None)  # `import tf2onnx` raises ImportError, as when not installed
    result = run_cli("export", "--workdir", str(workdir), "--format", "onnx")
    assert_one_error(result, f"--format onnx needs the {module} package", "pip install -e '.[export]'")
    assert snapshot(workdir) == before


def test_a_failed_write_of_a_new_format_keeps_the_previous_export(exported, tmp_path, monkeypatch):
    """All formats go into one temporary folder: onnx failing after tflite was written leaves
    the previous export/ as it was, and no temporary folder."""
    workdir = Path(shutil.copytree(exported[0], tmp_path / "run"))
    before = snapshot(workdir / "export")

    def disk_full(_serving: keras.Model, path: Path) -> None:
        assert (path.parent / "model.tflite").stat().st_size > 0  # the failure comes after a format was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_formats, "_write_onnx", disk_full)
    result = run_cli("export", "--workdir", str(workdir), "--format", "tflite,onnx")
    assert_one_error(result, f"cannot write {workdir / 'export'}: No space left on device", "previous export is kept")
    assert snapshot(workdir / "export") == before
    assert not list(workdir.glob(".export.tmp-*"))


def test_formats_are_parsed_in_order_once_each():
    assert export_formats.parse_formats(" onnx, keras,ONNX ") == ("onnx", "keras")
    with pytest.raises(ConfigError, match="no export format; choose one or more of keras, saved_model, tflite, onnx"):
        export_formats.parse_formats(" , ")


def test_a_model_built_in_mixed_precision_is_refused_for_tflite_and_onnx(tmp_path):
    """load_trained_model rebuilds every model in float32, so this guards a library caller
    who passes their own: half-precision math in a float32 file would disagree with predict."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # conftest restores the policy
    inputs = keras.Input((4, 4, 3), name="pixels")
    hidden = keras.layers.Dense(2, name="half")(inputs)
    model = keras.Model(inputs, keras.layers.Softmax(dtype="float32")(hidden), name="tiny")
    with pytest.raises(ConfigError, match=r"model tiny is not float32 \(layers half compute in a mixed precision"):
        export_formats.write_formats(model, tmp_path, ["keras", "tflite"])
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_an_export_folder_that_is_a_symbolic_link_is_refused_and_left_as_it_is(exported, tmp_path):
    """export/ is replaced by a rename: a link there was swapped for a folder and set aside as
    .export.tmp-old, which then failed every later export (`Not a directory`)."""
    workdir = Path(shutil.copytree(exported[0], tmp_path / "run"))
    elsewhere = tmp_path / "elsewhere"
    shutil.move(workdir / "export", elsewhere)
    (workdir / "export").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    result = run_cli("export", "--workdir", str(workdir), "--format", "keras")
    assert_one_error(result, f"cannot write {workdir / 'export'}: it is a symbolic link (to {elsewhere})")
    assert (workdir / "export").is_symlink() and snapshot(elsewhere) == before
    assert not list(workdir.glob(".export.tmp-*"))
