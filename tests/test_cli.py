import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import REPO, made_once

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One smoke run shared by the evaluate/predict tests (made once per test run)."""

    def make(folder):
        result = _run("train", "--config", SMOKE, "--workdir", folder / "run", "--set", "train.epochs=3")
        assert result.exit_code == 0, result.output
        assert "Eval at step 48" in result.output

    return made_once(tmp_path_factory, "cli-smoke-run", make) / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A few test images from the synthetic set written as PNG files, with their labels."""
    from trainer.data.sources.synthetic import synthetic_dataset

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


_LOAD_EXPORT = """
import json, sys
import numpy as np, keras, tensorflow as tf
batch = np.load(sys.argv[1])
keras_probabilities = keras.saving.load_model(sys.argv[2]).predict(batch, verbose=0)
server = tf.saved_model.load(sys.argv[3])  # kept referenced: its variables live as long as it does
served = server.serve(tf.constant(batch)).numpy()
ours = sorted(name for name in sys.modules if name.split(".")[0] in ("trainer", "launch"))
print(json.dumps({"keras": keras_probabilities.tolist(), "served": served.tolist(), "ours": ours}))
"""


@pytest.mark.parametrize(
    ("model", "precision", "size"),
    [
        ("paper_cnn", "float32", 32),
        ("resnet_small", "float32", 32),
        ("airbench", "float32", 32),
        ("paper_cnn", "mixed_bfloat16", 32),
        # a Keras Applications backbone at its own size (30-50 s: make test-slow)
        pytest.param("mobilenet_v3_small", "mixed_bfloat16", 64, marks=pytest.mark.slow),
    ],
)
def test_exports_load_in_plain_keras_and_agree_with_launch_predict(tmp_path, images, model, precision, size):
    """Where users use exports: a fresh process with only keras and tensorflow imported."""
    workdir = tmp_path / "run"
    settings = ["--set", f"model.name={model}", "--set", f"runtime.precision={precision}", "--set", "train.max_steps=2"]
    settings += ["--set", f"data.image_size={size}"]
    assert _run("train", "--config", SMOKE, "--workdir", workdir, *settings).exit_code == 0
    assert _run("export", "--workdir", workdir).exit_code == 0
    paths = list(images[0][:2])
    odd = tmp_path / "odd.png"  # 64x48: predict resizes it to the model's size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(odd)
    paths.append(odd)
    predicted = _run("predict", "--workdir", workdir, "--json", *paths)
    assert predicted.exit_code == 0, predicted.output
    cli = np.array([list(json.loads(line)["probabilities"].values()) for line in predicted.output.splitlines()])
    from trainer.inference import load_images  # predict's own resizing (tf.image, antialiased)

    batch = load_images(paths, (size, size, 3))
    np.save(tmp_path / "batch.npy", batch.astype(np.float32))
    export = workdir / "export"
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_EXPORT, tmp_path / "batch.npy", export / "model.keras", export / "saved_model"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=tmp_path,  # not the repository: nothing of ours is importable by accident
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["ours"] == []
    np.testing.assert_allclose(loaded["keras"], cli, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loaded["served"], cli, rtol=1e-4, atol=1e-6)
    assert (export / "labels.txt").read_text().split() == list(
        json.loads(predicted.output.splitlines()[0])["probabilities"]
    )


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
    assert ("runtime.precision=mixed_bfloat16 trains larger nets faster" in result.output) is native


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


# --- the exit-code contract, end to end through `launch` ------------------------------------


def _read_until(process, fragment: str, timeout: float = 120) -> list[str]:
    """Lines of `process` up to the first holding `fragment` (an event, not a moment)."""
    import threading

    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if fragment in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        process.kill()
        raise AssertionError(f"never printed {fragment!r}:\n{''.join(lines)}")
    return lines


def test_busy_workdir_exits_2_through_launch(tmp_path):
    import fcntl

    from tests.conftest import launch_train

    with open(tmp_path / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a running trainer holds it
        process = launch_train(tmp_path)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert output.count("Error:") == 1 and "is in use by another trainer" in output


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_sigterm_exits_at_once_with_143(tmp_path, workers):
    import signal

    from tests.conftest import launch_train

    process = launch_train(tmp_path, "train.epochs=1000", workers=workers)
    _read_until(process, "Epoch 1/1000")  # training has started
    process.send_signal(signal.SIGTERM)
    _read_until(process, "SIGTERM received")  # the first one was handled...
    process.send_signal(signal.SIGTERM)  # ...so this one is the second
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM == 143, output


def test_an_internal_bug_exits_1_with_its_traceback(tmp_path):
    script = (
        "import sys, trainer.training as t\n"
        "def bug(*a, **k): raise ZeroDivisionError('a bug, not a user mistake')\n"
        "t.train = bug\n"
        "from launch.cli import main\n"
        "sys.argv = ['launch', 'train', '--config', sys.argv[1], '--workdir', sys.argv[2]]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "configs" / "smoke.yaml"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError: a bug, not a user mistake" in done.stderr
    assert "Error:" not in done.stderr.replace("ZeroDivisionError:", "")
