"""Monitoring: what TensorBoard receives, read back with TensorBoard's own reader."""

import io
import pickle
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util.tensor_util import make_ndarray

from tests.conftest import SMALL_FLOAT16_RUN, made_once, smoke_config
from trainer.data.sources.cifar10 import CIFAR10_CLASSES
from trainer.flops import forward_flops_per_example, peak_flops
from trainer.launcher import start_tensorboard
from trainer.models import build_model
from trainer.training import train
from trainer.visualize import confusion_matrix_image, sample_grid


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events


def _png(event) -> Image.Image:
    """An image summary holds [width, height, PNG bytes...]."""
    return Image.open(io.BytesIO(event.tensor_proto.string_val[2]))


@pytest.fixture(scope="session")
def monitored_run(tmp_path_factory):
    """A run with histograms and a profile, made once per test run and only read: its
    TensorBoard folder, its TrainResult and its console lines."""

    def make(folder):
        lines: list[str] = []
        config = smoke_config("tensorboard.histogram_every_steps=16", "tensorboard.profile_steps=10:14")
        result = train(config, folder / "run", echo=lines.append)
        (folder / "result.pickle").write_bytes(pickle.dumps((result, lines)))

    folder = made_once(tmp_path_factory, "monitored-run", make)
    result, lines = pickle.loads((folder / "result.pickle").read_bytes())
    return folder / "run" / "tensorboard", result, lines


def test_training_scalars_are_keyed_by_global_step(monitored_run):
    logdir, _, _ = monitored_run
    events = _events(logdir / "train")
    for tag in (
        "loss",
        "accuracy",
        "gradient_norm",
        "learning_rate",
        "images_per_second",
        "step_time_seconds",
        "examples_seen",
        "epoch",
    ):
        assert [e.step for e in events.Tensors(tag)] == [8, 16, 24, 32, 40, 48], tag
    seen = [float(make_ndarray(e.tensor_proto)) for e in events.Tensors("examples_seen")]
    assert seen == [8 * 64 * i for i in range(1, 7)]
    norms = [float(make_ndarray(e.tensor_proto)) for e in events.Tensors("gradient_norm")]
    assert all(np.isfinite(norms)) and min(norms) > 0
    assert "model_flops_utilization" not in events.Tags()["tensors"]  # no known peak for a CPU


def test_eval_scalars_per_class_and_images(monitored_run):
    logdir, result, _ = monitored_run
    events = _events(logdir / "eval")
    tags = events.Tags()["tensors"]
    assert [e.step for e in events.Tensors("accuracy")] == [16, 32, 48]
    assert sum(tag.startswith("per_class_accuracy/") for tag in tags) == 10
    final_class0 = float(make_ndarray(events.Tensors("per_class_accuracy/class_0")[-1].tensor_proto))
    assert final_class0 == pytest.approx(result.final_eval.per_class_accuracy["class_0"])
    confusion = [_png(e) for e in events.Tensors("confusion_matrix")]
    assert len(confusion) == 3 and all(image.size == (84 + 360, 84 + 360) for image in confusion)
    misclassified = _png(events.Tensors("misclassified")[0])
    assert misclassified.size[0] == 8 * 96 and np.asarray(misclassified).std() > 10


def test_input_grid_config_and_environment_at_the_start(monitored_run):
    logdir, _, _ = monitored_run
    events = _events(logdir / "train")
    grid = _png(events.Tensors("inputs/augmented_batch")[0])
    assert grid.size == (8 * 96, 4 * (96 + 14))  # 32 images, 3x upscaled, captioned
    config_text = make_ndarray(events.Tensors("config")[0].tensor_proto).item().decode()
    assert "batch_size: 64" in config_text and "tensorboard:" in config_text
    environment = make_ndarray(events.Tensors("environment")[0].tensor_proto).item().decode()
    assert "OneDeviceStrategy" in environment and "float32" in environment


def test_hparams_session_lists_the_config(monitored_run):
    logdir, _, _ = monitored_run
    events = _events(logdir)
    metadata = events.SummaryMetadata("_hparams_/session_start_info")
    data = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content)
    hparams = data.session_start_info.hparams
    assert hparams["optimizer.learning_rate"].number_value == pytest.approx(0.02)
    assert hparams["model.name"].string_value == "paper_cnn"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {
        "hparams/eval_accuracy",
        "hparams/eval_loss",
        "hparams/train_loss",
    }
    assert {m.name.group for m in experiment.metric_infos} == {""}  # in the session's own run


def test_histograms_of_weights_and_activations(monitored_run):
    logdir, _, _ = monitored_run
    tags = _events(logdir / "train").Tags()["tensors"]
    assert "weights/block1_conv1/kernel" in tags and "activations/dense" in tags
    steps = [e.step for e in _events(logdir / "train").Tensors("weights/logits/kernel")]
    assert steps == [16, 32, 48]


def test_profiler_trace_is_where_the_profile_plugin_looks(monitored_run):
    logdir, _, _ = monitored_run
    traces = list((logdir / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_the_profiler_traces_exactly_steps_start_to_end(monkeypatch, tmp_path):
    """tensorboard.profile_steps=10:14: started before step 10's call, stopped after step 14."""
    import tensorflow as tf

    events: list[tuple[str, int]] = []
    calls = {"step": 0}
    real_start, real_stop = tf.profiler.experimental.start, tf.profiler.experimental.stop
    monkeypatch.setattr(
        tf.profiler.experimental,
        "start",
        lambda *a, **k: (events.append(("start", calls["step"])), real_start(*a, **k)),
    )
    monkeypatch.setattr(
        tf.profiler.experimental, "stop", lambda *a, **k: (events.append(("stop", calls["step"])), real_stop(*a, **k))
    )
    from trainer.loop import actions

    original = actions.Profiler.__call__

    def tracking(self, step, state):
        calls["step"] = step
        original(self, step, state)

    monkeypatch.setattr(actions.Profiler, "__call__", tracking)
    train(smoke_config("tensorboard.profile_steps=10:14", "train.max_steps=24"), tmp_path, echo=lambda _: None)
    assert events == [("start", 10), ("stop", 14)]


def test_console_summary_table(monitored_run):
    _, result, lines = monitored_run
    summary = lines[-1]
    assert summary.startswith("Done.")
    assert f"final test accuracy  {result.final_eval.accuracy:.2%}" in summary
    assert "tensorboard --logdir" in summary and "img/s over 1 replica(s)" in summary


def test_scalars_every_n_steps(tmp_path):
    train(smoke_config("tensorboard.every_steps=16", "tensorboard.images=false"), tmp_path, echo=lambda _: None)
    events = _events(tmp_path / "tensorboard" / "train")
    assert [e.step for e in events.Tensors("loss")] == [16, 32, 48]
    assert "inputs/augmented_batch" not in events.Tags()["tensors"]


def test_loss_scale_is_logged_under_mixed_float16(tmp_path):
    train(
        # float16 has no fast CPU kernels: batches of 16 keep this run short
        smoke_config("runtime.precision=mixed_float16", "train.max_steps=16", "model.width=8", *SMALL_FLOAT16_RUN),
        tmp_path,
        echo=lambda _: None,
    )
    scales = _events(tmp_path / "tensorboard" / "train").Tensors("loss_scale")
    assert [e.step for e in scales] == [8, 16]
    assert 1 <= float(make_ndarray(scales[-1].tensor_proto)) <= 2**15


def test_rendered_grid_and_confusion_matrix_are_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    grid = sample_grid(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), list(CIFAR10_CLASSES), columns=5)
    matrix = rng.integers(0, 20, (10, 10))
    np.fill_diagonal(matrix, 500)
    confusion = confusion_matrix_image(matrix, CIFAR10_CLASSES)
    for name, image, size in (("grid", grid, (5 * 96, 2 * 110)), ("confusion", confusion, (444, 444))):
        path = tmp_path / f"{name}.png"
        image.save(path)
        pixels = np.asarray(Image.open(path))
        assert Image.open(path).size == size
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_model_flops_and_known_peaks():
    model = build_model("paper_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=32)
    convs = 2 * (32 * 32 * 32 * 27 + 30 * 30 * 32 * 288 + 15 * 15 * 64 * 288 + 13 * 13 * 64 * 576)
    dense = 2 * (2304 * 512 + 512 * 10)
    assert forward_flops_per_example(model) == convs + dense == 41_482_240
    assert peak_flops(["NVIDIA H100 80GB HBM3"] * 2, "mixed_bfloat16") == 2 * 989e12
    assert peak_flops(["NVIDIA H100 80GB HBM3"], "float32") is None
    assert peak_flops([], "mixed_float16") is None


def test_tensorboard_server_starts_and_serves(tmp_path):
    lines: list[str] = []
    process = start_tensorboard(str(tmp_path), echo=lines.append)
    try:
        url = lines[0].split()[1]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard did not answer"
                time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _hparams_sessions(logdir, timeout: float = 60) -> list[dict]:
    """The HParams tab's session groups, through TensorBoard's own HTTP API."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from trainer.launcher import free_ports

    port = free_ports(1)[0]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
        + ["--host", "localhost", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statuses = ["STATUS_FAILURE", "STATUS_RUNNING", "STATUS_SUCCESS", "STATUS_UNKNOWN"]
    request = json.dumps({"allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 10}).encode()
    url = f"http://localhost:{port}/data/plugin/hparams/session_groups"
    deadline, groups = time.monotonic() + timeout, []
    try:
        while time.monotonic() < deadline and not groups:
            time.sleep(0.5)  # polling for TensorBoard to have loaded the logs, bounded by the deadline
            try:
                post = urllib.request.Request(url, data=request, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(post, timeout=10) as answer:
                    groups = json.loads(answer.read()).get("sessionGroups", [])
            except OSError:
                continue
    finally:
        server.terminate()
        server.communicate(timeout=30)
    return [session for group in groups for session in group["sessions"]]


@pytest.mark.parametrize("opened_at", ["workdir/tensorboard", "workdir"])
def test_hparams_tab_shows_the_metric_values(monitored_run, opened_at):
    logdir, result, _ = monitored_run
    sessions = _hparams_sessions(logdir if opened_at == "workdir/tensorboard" else logdir.parent)
    assert len(sessions) == 1
    values = {value["name"]["tag"]: value["value"] for value in sessions[0]["metricValues"]}
    assert values["hparams/eval_accuracy"] == pytest.approx(result.final_eval.accuracy, abs=1e-6)
    assert values["hparams/eval_loss"] == pytest.approx(result.final_eval.loss, rel=1e-5)
    assert values["hparams/train_loss"] > 0
