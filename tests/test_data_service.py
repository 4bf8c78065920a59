"""data.service: training batches made by a tf.data service instead of the trainer process.

What stays exact (trainer/data/service.py): with one service worker the weights are bit
for bit those of the local pipeline, and a stop and resume through the service equals the
straight run; with two workers every step's batch is still made, once, exactly as the
local pipeline makes it, only their order may differ.
"""

import contextlib
import http.server
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, smoke_config
from trainer.data import service
from trainer.data.device import resolve_placement
from trainer.data.pipeline import train_dataset_fn
from trainer.data.prepare import prepare_for_inference
from trainer.dry_run import plan_run
from trainer.errors import ConfigError, DataError, InputStalledError, StoppedWaitingError
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


# --- what answers at a data.service or --worker address that is not a dispatcher -----------


@contextlib.contextmanager
def silent_listener() -> Iterator[tuple[int, threading.Event]]:
    """A TCP port that accepts connections and never says a byte (its port, and an event
    set at the first connection: whoever connects is past its start-up)."""
    accepted, connections = threading.Event(), []
    with socket.socket() as listener:
        listener.bind(("localhost", 0))
        listener.listen()

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connections.append(listener.accept()[0])
                    accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        try:
            yield listener.getsockname()[1], accepted
        finally:
            for connection in connections:
                connection.close()
            listener.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def http_listener() -> Iterator[int]:
    server = http.server.HTTPServer(("localhost", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *_: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


class _AnswersOnlyItsVersion(grpc.GenericRpcHandler):
    """A dispatcher that answers GetVersion (so the probe passes) and holds every other call:
    one that never takes a worker or a pipeline. `held` is set once a call is held."""

    def __init__(self) -> None:
        self.held, self.release = threading.Event(), threading.Event()

    def service(self, details):
        if details.method.endswith("/GetVersion"):
            return grpc.unary_unary_rpc_method_handler(lambda _request, _context: b"\x08\x09")  # version 9
        return grpc.unary_unary_rpc_method_handler(self._held)

    def _held(self, _request, context):
        self.held.set()
        self.release.wait()
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")


@contextlib.contextmanager
def stuck_dispatcher() -> Iterator[tuple[int, threading.Event]]:
    """Its port, and the event set once it holds a call."""
    handler = _AnswersOnlyItsVersion()
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        yield port, handler.held
    finally:
        handler.release.set()
        server.stop(0)


def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([LAUNCH, "data", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.timeout(60, method="thread")  # a hang in TensorFlow: the signal method could not end it
def test_a_worker_pointed_at_a_listener_that_never_answers_stops_at_its_deadline():
    """Not a dispatcher at --worker: TensorFlow's worker start would retry it for ever, deaf
    to Ctrl-C. The probe ends it within the deadline with a DataError naming the address."""
    with silent_listener() as (port, _accepted), http_listener() as web:
        started = time.monotonic()
        with pytest.raises(DataError, match=f"--worker='localhost:{port}': no tf.data service dispatcher answers"):
            service.start_worker(f"localhost:{port}", timeout_s=0.5)
        assert time.monotonic() - started < 3
        with pytest.raises(DataError, match=f"localhost:{web}.*HTTP/2.*launch data serve --dispatcher. there first"):
            service.start_worker(f"localhost:{web}")


@pytest.mark.timeout(60, method="thread")  # a hang in TensorFlow: the signal method could not end it
def test_a_signal_ends_a_worker_still_waiting_for_its_dispatcher_at_once():
    """SIGTERM while the worker's probe waits on a listener that never answers: one line and
    exit 143 within seconds (the handlers are in place before the probe)."""
    with silent_listener() as (port, accepted):
        worker = _serve("--worker", f"localhost:{port}", "--timeout", "60")
        try:
            assert accepted.wait(30), "the worker never connected"
            signalled = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=10)
        finally:
            worker.kill()
    assert time.monotonic() - signalled < 5
    assert worker.returncode == 128 + signal.SIGTERM, out + err
    assert _one_error_line(err) == "Error: SIGTERM received while waiting for the tf.data service dispatcher"


@pytest.mark.timeout(60, method="thread")  # a hang in TensorFlow: the signal method could not end it
def test_ctrl_c_ends_a_worker_whose_registration_its_dispatcher_holds():
    """The dispatcher answers the probe, then holds the worker's registration: TensorFlow
    waits in a call that holds Python's lock, where no Python handler runs. SIGINT still
    ends the process at once, by its default action."""
    with stuck_dispatcher() as (port, held):
        worker = _serve("--worker", f"localhost:{port}")
        try:
            assert held.wait(30), "the worker never registered"
            signalled = time.monotonic()
            worker.send_signal(signal.SIGINT)
            worker.communicate(timeout=10)
        finally:
            worker.kill()
    assert time.monotonic() - signalled < 5 and worker.returncode == -signal.SIGINT


def test_serve_exits_0_on_sighup_as_on_sigterm():
    """A dropped ssh session (SIGHUP) stops a server as cleanly as SIGTERM does."""
    process = _serve("--dispatcher")
    assert process.stdout.readline().startswith("tf.data service dispatcher at localhost:")
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(60, method="thread")  # a hang in TensorFlow: the signal method could not end it
def test_a_service_address_where_no_dispatcher_answers_stops_the_run_within_the_probe(tmp_path, monkeypatch):
    """data.service at a listener that never answers: the run would hang before its first
    step. The gRPC probe stops it with one DataError naming the address; an HTTP server and
    a gRPC server of another kind (a tf.data worker's address) are named as such."""
    monkeypatch.setattr(service, "PROBE_SECONDS", 0.5)
    with silent_listener() as (port, _accepted):
        started = time.monotonic()
        with pytest.raises(DataError, match=f"data.service='localhost:{port}': no tf.data service dispatcher answers"):
            train(smoke_config(*RUN, f"data.service=localhost:{port}"), tmp_path / "run", echo=quiet)
        assert time.monotonic() - started < 20  # the run's own start-up, then 0.5 s
    with http_listener() as web, pytest.raises(DataError, match="HTTP/2.*data.service=''"):
        service.check_reachable(f"localhost:{web}")
    worker = service.start_worker(service.server_address(dispatcher := service.start_dispatcher()))
    try:
        with pytest.raises(DataError, match="answers, but not as a dispatcher: a tf.data service worker's address"):
            service.check_reachable(service.server_address(worker))
    finally:
        worker.stop()
        dispatcher.stop()


def test_the_training_stream_of_a_service_starts_within_the_deadline_or_the_run_stops(monkeypatch):
    """Making the first iterator waits on the dispatcher (TensorFlow retries without end);
    it is bounded by data.service_timeout_s (InputStalledError, exit 75), a signal ends the
    wait at once (StoppedWaitingError, exit 75), and without a service nothing changes."""
    blocked = threading.Event()
    config = smoke_config("data.service=localhost:5050", "data.service_timeout_s=0.3").data
    started = time.monotonic()
    with pytest.raises(InputStalledError, match=r"data.service='localhost:5050'.* within 0.3 s") as stalled:
        service.first_iterator(blocked.wait, config)
    assert time.monotonic() - started < 3 and stalled.value.exit_code == 75 and stalled.value.leaves_thread_blocked

    received = []
    ours = lambda signum, _frame: received.append(signum)  # the test's own handler: a stray signal kills nothing
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        waiting = smoke_config("data.service=localhost:5050", "data.service_timeout_s=60").data
        threading.Timer(0.3, signal.raise_signal, (signal.SIGTERM,)).start()
        started = time.monotonic()
        with pytest.raises(StoppedWaitingError, match="SIGTERM received while waiting for the tf.data service") as info:
            service.first_iterator(blocked.wait, waiting)
        assert time.monotonic() - started < 5 and info.value.exit_code == 75 and not received
        assert signal.getsignal(signal.SIGTERM) is ours  # put back after the wait
    finally:
        signal.signal(signal.SIGTERM, previous)
        blocked.set()
    assert service.first_iterator(threading.current_thread, smoke_config().data) is threading.current_thread()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("localhost:99999", "its port 99999 is not in 1-65535"),
        ("localhost:0", "its port 0 is not in 1-65535"),
        ("localhost:１２３", "its port '１２３' is not a number from 1 to 65535"),
        ("http://localhost:5050", "http:// is not how a tf.data service is reached"),
        ("::1:5050", "an IPv6 address needs brackets"),
        ("[::1:5050", "it is not host:port"),
        ("localhost", "it is not host:port"),
    ],
)
def test_a_malformed_service_address_is_a_data_error_naming_it_and_a_valid_one(address, reason):
    with pytest.raises(DataError) as info:
        service.check_reachable(address)
    assert str(info.value).startswith(f"data.service={address!r}: {reason}")
    assert "e.g. localhost:5050, grpc://data-dispatcher:5050 or [::1]:5050" in str(info.value)


def test_a_huge_address_is_one_short_line_not_a_traceback():
    """A port of 5,000 digits made int() raise ValueError (Python's 4,300-digit limit): a
    traceback; a 100,000-character host came back as a 100,000-character error line."""
    with pytest.raises(DataError, match="is not a number from 1 to 65535") as port:
        service.check_reachable("h:" + "9" * 5000)
    with pytest.raises(DataError) as host:
        service.check_reachable("h" * 100_000)
    assert len(str(port.value)) < 400 and len(str(host.value)) < 400


@pytest.mark.timeout(60, method="thread")  # a hang in gRPC: the signal method could not end it
def test_ctrl_c_during_the_trainers_probe_stops_it_at_once(monkeypatch):
    """The probe waits in gRPC, where Python runs no signal handler: Ctrl-C was lost for its
    10 s. Now the main thread takes it while the probe waits: StoppedWaitingError, exit 75."""
    monkeypatch.setattr(service, "PROBE_SECONDS", 30.0)
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        with silent_listener() as (port, _accepted):
            threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,)).start()
            started = time.monotonic()
            with pytest.raises(
                StoppedWaitingError, match=f"SIGINT received while asking data.service='localhost:{port}'"
            ) as info:
                service.check_reachable(f"localhost:{port}")
            assert time.monotonic() - started < 5 and info.value.exit_code == 75 and not received
    finally:
        signal.signal(signal.SIGINT, previous)


def test_valid_service_addresses_parse():
    assert service._host_port("grpc://data-dispatcher:5050") == ("data-dispatcher", 5050)
    assert service._host_port("[::1]:65535") == ("::1", 65535)
    assert service._host_port("10.0.0.7:1") == ("10.0.0.7", 1)


def test_the_hint_for_an_unreachable_dispatcher_fits_who_asked():
    with socket_closed_port() as port:
        with pytest.raises(DataError) as worker:
            service.check_reachable(f"localhost:{port}", what="--worker")
        with pytest.raises(DataError) as trainer:
            service.check_reachable(f"localhost:{port}")
    assert "data.service=''" not in str(worker.value)
    assert str(worker.value).endswith(
        "start `launch data serve --dispatcher` there first (--worker takes the address it prints)"
    )
    assert str(trainer.value).endswith("or set data.service='' to feed from this process")


def test_a_dry_run_names_the_service_and_probes_it(tmp_path):
    dispatcher = service.start_dispatcher()
    address = service.server_address(dispatcher)
    try:
        lines = plan_run(smoke_config(f"data.service={address}"), tmp_path / "run", echo=quiet).lines()
    finally:
        dispatcher.stop()
    assert f"Input:    the tf.data service at {address} (its dispatcher answers)" in lines
    assert not (tmp_path / "run").exists()
    with socket_closed_port() as port, pytest.raises(DataError, match=f"data.service='localhost:{port}'"):
        plan_run(smoke_config(f"data.service=localhost:{port}"), tmp_path / "run", echo=quiet)
