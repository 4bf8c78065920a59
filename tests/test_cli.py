import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One smoke run shared by the evaluate/predict/export tests."""
    workdir = tmp_path_factory.mktemp("run")
    result = _run("train", "--config", SMOKE, "--workdir", workdir, "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "Eval at step 48" in result.output
    return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A few test images from the synthetic set written as PNG files, with their labels."""
    from trainer.data.sources import synthetic_dataset

    folder = tmp_path_factory.mktemp("images")
    data = synthetic_dataset(1024, 256, 10, seed=0).test
    paths = []
    for i in range(6):
        path = folder / f"img{i}.png"
        Image.fromarray(data.images[i]).save(path)
        paths.append(path)
    return paths, data.labels[:6]


def test_evaluate_writes_metrics(trained):
    result = _run("evaluate", "--workdir", trained)
    assert result.exit_code == 0, result.output
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"accuracy", "loss", "per_class_accuracy", "step"} <= set(metrics)
    assert metrics["step"] == 48 and metrics["accuracy"] > 0.8
    assert len(metrics["per_class_accuracy"]) == 10
    assert f"Test accuracy {metrics['accuracy']:.2%}" in result.output


def test_predict_prints_one_line_per_image(trained, images):
    paths, labels = images
    result = _run("predict", "--workdir", trained, *paths)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(paths)
    predicted = []
    for line, path in zip(lines, paths):
        shown_path, label, probability = line.split("\t")
        assert shown_path == str(path) and 0 < float(probability) <= 1
        predicted.append(int(label.removeprefix("class_")))
    assert np.mean(np.array(predicted) == labels) >= 0.5


def test_predict_json(trained, images):
    result = _run("predict", "--workdir", trained, "--json", images[0][0])
    record = json.loads(result.output)
    assert record["label"] in record["probabilities"]
    assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_exported_model_predicts_like_launch_predict(trained, images):
    paths, _ = images
    result = _run("export", "--workdir", trained)
    assert result.exit_code == 0, result.output
    keras_path = trained / "export" / "model.keras"
    predicted = _run("predict", "--workdir", trained, "--json", *paths).output.strip().splitlines()
    cli_labels = [json.loads(line)["label"] for line in predicted]
    cli_probs = [json.loads(line)["probability"] for line in predicted]

    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype("float32")
    classes = (trained / "export" / "labels.txt").read_text().split()
    model = keras.saving.load_model(keras_path)  # plain Keras, no custom objects
    probabilities = model.predict(batch, verbose=0)
    assert [classes[i] for i in probabilities.argmax(axis=1)] == cli_labels
    np.testing.assert_allclose(probabilities.max(axis=1), cli_probs, rtol=1e-4)

    served = tf.saved_model.load(str(trained / "export" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(batch)).numpy(), probabilities, rtol=1e-4, atol=1e-6)


def test_data_show_writes_a_labelled_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = _run("data", "show", "--config", SMOKE, "--out", out, "--count", "16", "--augmented")
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (96 + 14), 8 * 96, 3)
    assert grid.std() > 10  # not blank


def test_devices_reports_strategy(tmp_path):
    result = _run("devices")
    assert result.exit_code == 0, result.output
    assert "OneDeviceStrategy with 1 replica(s) on 1 worker(s); precision float32; XLA off" in result.output
    assert "CPU" in result.output


@pytest.mark.parametrize("native", [True, False])
def test_devices_suggests_bfloat16_only_on_cpus_that_have_it(monkeypatch, native):
    monkeypatch.setattr("trainer.runtime.cpu_has_bfloat16", lambda: native)
    result = _run("devices")
    assert "precision float32 (auto: CPU" in result.output
    assert ("runtime.precision=mixed_bfloat16 trains faster" in result.output) is native


def test_devices_warns_that_float16_is_slow_on_a_cpu():
    result = _run("devices", "--set", "runtime.precision=mixed_float16")
    assert result.exit_code == 0, result.output
    assert "CPUs have no fast float16 kernels" in result.output
    assert "float16 kernels" not in _run("devices", "--set", "runtime.precision=mixed_bfloat16").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--config", SMOKE, "--set", "data.batchsize=3"), "did you mean 'batch_size'"),
        (("train", "--config", "configs/nope.yaml"), "config file not found"),
        (("evaluate", "--workdir", "/nonexistent/run"), "is not a training workdir"),
        (("train", "--config", SMOKE, "--set", "model.name=resnet"), "model.name must be one of"),
    ],
)
def test_user_mistakes_are_one_line(args, message):
    result = _run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_missing_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {"class_names": ["a", "b"], "image_shape": [32, 32, 3], "mean": [0, 0, 0], "std": [1, 1, 1], "origin": "x"}
        )
    )
    result = _run("predict", "--workdir", tmp_path, str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "no checkpoint in" in result.output and result.output.count("\n") == 1


def test_cli_process_hides_tensorflow_noise_and_tracebacks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "launch", "evaluate", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("Error: ") and done.stderr.count("\n") == 1
    shown = subprocess.run([sys.executable, "-m", "launch", "devices"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "oneDNN" not in shown.stderr + shown.stdout
    assert "Strategy:" in shown.stdout


def test_missing_tensorflow_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a)
    )
    result = _run("devices")
    assert result.exit_code == 2
    assert "TensorFlow is not installed" in result.output and "'.[cpu]'" in result.output
    assert result.output.count("\n") == 1
