"""data.service: training batches made by a tf.data service instead of the trainer process.

What stays exact (trainer/data/service.py): with one service worker the weights are bit
for bit those of the local pipeline, and a stop and resume through the service equals the
straight run; with two workers every step's batch is still made, once, exactly as the
local pipeline makes it, only their order may differ.
"""

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, smoke_config
from trainer.data import service
from trainer.data.device import resolve_placement
from trainer.data.pipeline import train_dataset_fn
from trainer.data.prepare import prepare_for_inference
from trainer.errors import ConfigError, DataError, InputStalledError
from trainer.loop.controller import Controller
from trainer.training import train

LAUNCH = str(Path(sys.executable).with_name("launch"))
# 8 steps of 32, a checkpoint every 4: the resume below stops at 4.
RUN = (
    "train.max_steps=8",
    "data.batch_size=32",
    "train.steps_per_loop=4",
    "checkpoint.every_steps=4",
    "runtime.deterministic=true",
)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def one_worker():
    """A dispatcher and one worker in this process: their address."""
    dispatcher = service.start_dispatcher()
    address = service.server_address(dispatcher)
    worker = service.start_worker(address)
    yield address
    worker.stop()
    dispatcher.stop()


def _tensors(workdir: Path, step: int) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / f"ckpt-{step}"))
    names = reader.get_variable_to_shape_map()
    return {name: reader.get_tensor(name) for name in names if not name.startswith(("_CHECKPOINTABLE", "save_counter"))}


def _assert_same_weights(expected: Path, actual: Path, step: int = 8) -> None:
    want, got = _tensors(expected, step), _tensors(actual, step)
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_one_service_worker_trains_bit_identical_weights_and_resumes_exactly(one_worker, tmp_path, monkeypatch):
    train(smoke_config(*RUN), tmp_path / "local", echo=quiet)
    on_service = smoke_config(*RUN, f"data.service={one_worker}")
    train(on_service, tmp_path / "service", echo=quiet)
    _assert_same_weights(tmp_path / "local", tmp_path / "service")

    monkeypatch.setenv("TRAINER_STOP_AT_STEP", "4")
    assert train(on_service, tmp_path / "resumed", echo=quiet).step == 4
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    assert train(on_service, tmp_path / "resumed", echo=quiet).step == 8  # a new job, from step 4
    _assert_same_weights(tmp_path / "local", tmp_path / "resumed")


def _batches(config, start_step: int = 0, total: int = 16) -> list[bytes]:
    """Each training batch (images and labels) of a config as bytes, in the order served."""
    dataset, spec = prepare_for_inference(config, say=quiet)
    fn = train_dataset_fn(dataset.train, spec, start_step, total)
    return [images.numpy().tobytes() + labels.numpy().tobytes() for images, labels in fn(tf.distribute.InputContext())]


def test_two_service_workers_serve_every_step_once_exactly_as_the_local_pipeline(tmp_path):
    dispatcher = service.start_dispatcher()
    address = service.server_address(dispatcher)
    workers = [
        subprocess.Popen([LAUNCH, "data", "serve", "--worker", address], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert "worker at localhost:" in worker.stdout.readline()
        local = _batches(smoke_config(*RUN), start_step=3)
        served = _batches(smoke_config(*RUN, f"data.service={address}"), start_step=3)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        assert [worker.wait(timeout=30) for worker in workers] == [0, 0]
    # The same 13 batches, each once (DYNAMIC sharding: whole steps per worker); the order
    # is whichever worker answers first, so it is not promised.
    assert len(served) == len(local) == 13
    assert sorted(served) == sorted(local)


def test_serve_prints_its_address_and_exits_0_on_sigterm():
    process = subprocess.Popen([LAUNCH, "data", "serve", "--dispatcher"], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("tf.data service dispatcher at localhost:"), line
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_an_unreachable_dispatcher_is_one_error_line_within_the_deadline(tmp_path):
    with socket_closed_port() as port:
        config = smoke_config(*RUN, f"data.service=localhost:{port}")
        started = time.monotonic()
        with pytest.raises(DataError, match=f"localhost:{port}.*launch data serve --dispatcher"):
            train(config, tmp_path / "run", echo=quiet)
    assert time.monotonic() - started < service.PROBE_SECONDS
    result = subprocess.run(
        [
            LAUNCH,
            "train",
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--set",
            "data.service=nohost",
            "--workdir",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().startswith("Error: data.service='nohost'")


class socket_closed_port:
    """A local port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            return probe.getsockname()[1]

    def __exit__(self, *_) -> None:
        pass


def test_a_call_that_waits_past_the_deadline_for_batches_stops_the_run_naming_it():
    """The controller's wait on a compiled call is bounded when data.service is set: the
    call's thread may stay blocked inside TensorFlow, the run does not."""
    blocked = Future()  # a call that never returns, as one waiting on a lost service worker
    waiter = SimpleNamespace(stall_after_s=0.2)
    state = SimpleNamespace(step=16, saved_step=8)
    started = time.monotonic()
    stalled = r"for 0.2 s \(data.service_timeout_s\) in the call after step 16"
    with pytest.raises(InputStalledError, match=stalled) as info:
        Controller._results(waiter, blocked, state)
    assert time.monotonic() - started < 5
    assert "the last checkpoint is step 8" in str(info.value) and info.value.exit_code == 75
    done = Future()
    done.set_result(("sums", 4))
    assert Controller._results(SimpleNamespace(stall_after_s=None), done, state) == ("sums", 4)


@pytest.mark.slow
def test_a_lost_service_worker_ends_the_run_with_one_line_and_exit_75(tmp_path):
    """Two service workers, one killed mid-run: its steps never come (tf.data service is
    at-most-once). The trainer stops after data.service_timeout_s with one Error line and
    exit 75 (its checkpoints kept) instead of waiting forever."""
    dispatcher = service.start_dispatcher()
    address = service.server_address(dispatcher)
    workers = [_served_worker(address) for _ in range(2)]
    workdir = tmp_path / "run"
    args = [LAUNCH, "train", "--config", str(REPO / "configs" / "smoke.yaml"), "--workdir", str(workdir)]
    args += ["--set", f"data.service={address}", "--set", "data.service_timeout_s=8", "--set", "train.epochs=40"]
    try:
        trainer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (workdir / "checkpoints" / "ckpt-16.index").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        workers[1].kill()
        out, err = trainer.communicate(timeout=240)
        assert trainer.returncode == 75, out + err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "no training batch came from the tf.data service for 8 s" in errors[0], err
        last = int(errors[0].split("the last checkpoint is step ")[1].split(".")[0])
        assert last >= 16 and (workdir / "checkpoints" / f"ckpt-{last}.index").exists()  # what a resume starts from
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=30)
        dispatcher.stop()


def _served_worker(address: str) -> subprocess.Popen:
    worker = subprocess.Popen([LAUNCH, "data", "serve", "--worker", address], stdout=subprocess.PIPE, text=True)
    assert "worker at localhost:" in worker.stdout.readline()
    return worker


def test_a_service_with_device_placement_is_refused_and_auto_placement_uses_it(tmp_path):
    """The device feed makes batches on the device, where a service cannot reach: refused;
    `auto` (device on GPUs) takes the host pipeline when data.service is set."""
    with pytest.raises(ConfigError, match="data.placement=device makes them on the device"):
        smoke_config("data.service=localhost:5050", "data.placement=device")
    spec = SimpleNamespace(service="localhost:5050", crop="pad")
    assert resolve_placement("auto", "gpu", SimpleNamespace(images=np.zeros((4, 8, 8, 3))), spec) == "host"


def test_a_server_on_a_taken_port_is_one_config_error():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot start a tf.data service server on port {port}"):
            service.start_dispatcher(port)
