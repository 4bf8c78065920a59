"""Waits on something outside (a cluster's other tasks, a TPU address) have a deadline, say
what they wait for and end on SIGTERM/SIGINT/SIGHUP (#24 items 4-7).

TensorFlow's own wait for peers holds the GIL and swallows SIGTERM, so these tests fail
(hang until killed) if a process reaches it before the other tasks are there.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from launch.cli import cli
from tests import test_safety
from tests.conftest import REPO
from tests.test_safety import assert_one_error
from trainer import rendezvous, signals
from trainer.errors import RuntimeSetupError, StoppedWaitingError
from trainer.launcher import free_ports
from trainer.preemption import EXIT_PREEMPTED

trained_once = test_safety.trained_once


def _tf_config(addresses: dict[str, list[str]], job: str, index: int) -> str:
    return json.dumps({"cluster": addresses, "task": {"type": job, "index": index}})


def _two_workers(index: int) -> tuple[str, list[int]]:
    ports = free_ports(2)
    return _tf_config({"worker": [f"localhost:{port}" for port in ports]}, "worker", index), ports


def _start(args: list[str], tf_config: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "TF_CONFIG": tf_config}
    return subprocess.Popen(
        [sys.executable, "-m", "launch", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _read_until(process: subprocess.Popen, fragment: str, timeout: float = 60.0) -> list[str]:
    """Lines of `process` up to the first holding `fragment` (a reader thread: no hang)."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if fragment in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(timeout), f"no {fragment!r} within {timeout} s: {''.join(lines)}"
    return lines


@pytest.mark.parametrize(("index", "signum"), [(0, signal.SIGTERM), (1, signal.SIGINT), (1, signal.SIGHUP)])
def test_a_task_waiting_for_its_cluster_says_so_and_stops_on_a_signal(tmp_path, index, signum):
    """Item 4: the leader (worker 0) waits for worker 1, worker 1 for the leader; neither is
    ever started. The wait is announced, and a signal ends it at once: exit 75, nothing written."""
    tf_config, ports = _two_workers(index)
    process = _start(
        ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--workdir", str(tmp_path / "w")], tf_config
    )
    lines = _read_until(process, "Waiting for")
    expected = f"worker 1 (localhost:{ports[1]})" if index == 0 else f"worker 0 at localhost:{ports[0]}"
    assert expected in lines[-1]
    sent = time.monotonic()
    process.send_signal(signum)
    output, _ = process.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert process.returncode == EXIT_PREEMPTED, output
    assert f"Error: {signal.Signals(signum).name} received while waiting for the cluster" in output
    assert "Traceback" not in output
    assert not (tmp_path / "w").exists()


def test_a_missing_peer_is_one_line_at_the_deadline(monkeypatch):
    tf_config, ports = _two_workers(1)
    monkeypatch.setenv("TF_CONFIG", tf_config)
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["devices", "--set", "runtime.connect_timeout_s=1"])
    assert time.monotonic() - started < 15
    line = assert_one_error(result, "gave up after 1 s waiting for the cluster's leader")
    assert f"worker 0 at localhost:{ports[0]}" in line and "Connection refused" in line
    assert "runtime.connect_timeout_s" in line


def test_a_tpu_address_where_nothing_answers_is_one_line():
    """Item 6: TensorFlow's connect would wait with no output, forever and deaf to signals."""
    port = free_ports(1)[0]
    result = CliRunner().invoke(
        cli, ["devices", "--set", f"runtime.tpu=grpc://127.0.0.1:{port}", "--set", "runtime.connect_timeout_s=1"]
    )
    assert_one_error(result, f"waiting for grpc://127.0.0.1:{port} to answer", "nothing accepts connections")


@pytest.mark.parametrize(
    ("cluster", "task", "fragment"),
    [
        # Item 7: an empty chief list beside two workers made TensorFlow segfault.
        ({"chief": [], "worker": ["localhost:2", "localhost:3"]}, {"type": "worker", "index": 0}, '"chief" must be'),
        ({"worker": ["localhost:2", "localhost:3"]}, {}, "names no task of its cluster"),
        ({"worker": ["a:b", "c:d"]}, {"type": "worker", "index": 0}, "'a:b', which is not \"host:port\""),
        ({"worker": ["localhost:99999", "localhost:3"]}, {"type": "worker", "index": 0}, "port from 1 to 65535"),
        ({"worker": ["localhost:2", "localhost:2"]}, {"type": "worker", "index": 1}, "names one address twice"),
        ({"worker": ["localhost:2", "localhost:3"]}, {"type": "worker", "index": True}, "names no task"),
    ],
)
def test_malformed_tf_config_clusters_are_one_line(monkeypatch, cluster, task, fragment):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert_one_error(CliRunner().invoke(cli, ["devices"]), "TF_CONFIG", fragment)


def test_slurm_ports_past_65535_are_one_line(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    environment = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_RESV_PORTS": "99999",
    }
    assert_one_error(CliRunner().invoke(cli, ["devices"], env=environment), "ports 99999 to 100000", "65535")


def test_a_port_taken_by_another_program_is_one_line(monkeypatch):
    """TensorFlow says "Could not start gRPC server" with a traceback; the leader's and a
    worker's own port are both checked before TensorFlow starts."""
    tf_config, ports = _two_workers(1)
    with socket.create_server(("", ports[1])):
        monkeypatch.setenv("TF_CONFIG", tf_config)
        assert_one_error(CliRunner().invoke(cli, ["devices"]), f"port {ports[1]} of this task (worker 1")


def test_evaluate_in_a_cluster_pod_runs_as_one_process(trained_once):
    """Item 5: a TFJob pod's TF_CONFIG (chief + worker) must not make `launch evaluate` wait
    for a cluster: it evaluates alone, as predict does."""
    chief, worker = free_ports(2)
    tf_config = _tf_config({"chief": [f"localhost:{chief}"], "worker": [f"localhost:{worker}"]}, "chief", 0)
    process = _start(["evaluate", "--workdir", str(trained_once)], tf_config)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "accuracy" in output.lower() and "Waiting for" not in output


def _meet_in_thread(cluster: rendezvous.Cluster, outcome: dict) -> threading.Thread:
    def run() -> None:
        try:
            rendezvous.meet(cluster, 20, outcome.setdefault("lines", []).append)
            outcome["met"] = True
        except Exception as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_tasks_meet_and_leave_the_leaders_port_free_for_tensorflow():
    """A chief and two workers meet (a stray client that says something else is not counted),
    and the leader's port, TensorFlow's next, is free again right after."""
    ports = free_ports(3)
    addresses = {"chief": [f"localhost:{ports[0]}"], "worker": [f"localhost:{p}" for p in ports[1:]]}
    workers = [
        rendezvous.Cluster.from_tf_config(json.loads(_tf_config(addresses, "worker", index))) for index in (0, 1)
    ]
    outcomes = [{}, {}]
    threads = [_meet_in_thread(cluster, outcome) for cluster, outcome in zip(workers, outcomes)]
    with _stray_client(ports[0]):
        leader = rendezvous.Cluster.from_tf_config(json.loads(_tf_config(addresses, "chief", 0)))
        rendezvous.meet(leader, 20, print)
    for thread, outcome in zip(threads, outcomes):
        thread.join(10)
        assert outcome.get("met"), outcome
    with socket.socket() as tensorflow_next:  # as gRPC binds it
        tensorflow_next.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tensorflow_next.bind(("", ports[0]))
        tensorflow_next.listen()


class _stray_client:  # noqa: N801 - used like a function
    """A client that connects to the leader's port and says something else: not counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def __enter__(self) -> None:
        def connect() -> None:
            for _ in range(100):
                try:
                    self.sock = socket.create_connection(("localhost", self.port), timeout=1)
                    self.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    return
                except OSError:
                    time.sleep(0.05)

        threading.Thread(target=connect, daemon=True).start()

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            self.sock.close()


def test_a_signal_during_a_wait_raises_a_typed_error_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(StoppedWaitingError, match="SIGTERM received while waiting") as raised:
        rendezvous.wait_until(lambda: False, 30, print, lambda: "nothing", lambda: "")
    assert raised.value.exit_code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) is previous
    with pytest.raises(RuntimeSetupError, match="gave up after 0.2 s waiting for the moon; look up"):
        rendezvous.wait_until(lambda: time.sleep(0.05), 0.2, print, lambda: "the moon", lambda: "look up")


def test_a_wait_on_a_call_gives_its_result_or_error_and_marks_the_thread_it_leaves_blocked():
    """The other form of the same wait (trainer.data.service's): the call runs in a daemon
    thread; its result and its own error come back, the deadline's error says it left the
    call's thread blocked, and a signal is only recorded, then ends the wait as `stopped`."""
    wait = signals.Wait(0.2, lambda: RuntimeSetupError("late"), lambda signum: StoppedWaitingError(str(signum)))
    assert wait.result(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        wait.result(lambda: 1 / 0)
    blocked, ours = threading.Event(), lambda _signum, _frame: None  # a stray signal kills nothing
    previous = signal.signal(signal.SIGHUP, ours)
    try:
        with pytest.raises(RuntimeSetupError, match="late") as late:
            wait.result(blocked.wait)
        assert late.value.leaves_thread_blocked
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGHUP)).start()
        with pytest.raises(StoppedWaitingError, match=str(int(signal.SIGHUP))) as stopped:
            replace(wait, seconds=30).result(blocked.wait)
        assert stopped.value.leaves_thread_blocked and signal.getsignal(signal.SIGHUP) is ours
    finally:
        signal.signal(signal.SIGHUP, previous)
        blocked.set()


def _send(signum: int):
    """A call that signals this process as it runs, then returns at once."""
    return lambda: os.kill(os.getpid(), signum) or "done"


def test_signals_at_the_edges_of_a_wait_still_stop_it_and_an_ignored_one_stays_ignored():
    """Found by session 14's review: a signal as the call starts (before, the old handler
    took it: Ctrl-C was a KeyboardInterrupt), one as the call finishes (lost: a preemption
    SIGTERM swallowed), SIGUSR1 (Slurm's warning killed the process without a line), a NaN
    deadline (never ended), a second signal during cleanup (replaced the first), and
    `nohup` (SIGHUP stopped the wait all the same)."""
    wait = signals.Wait(30, lambda: RuntimeSetupError("late"), lambda signum: StoppedWaitingError(str(signum)))
    ours = lambda _signum, _frame: None  # noqa: E731 - a stray signal kills nothing
    previous = {sig: signal.signal(sig, ours) for sig in (signal.SIGUSR1, signal.SIGHUP)}
    try:
        for form in (wait.result, lambda call: wait.until(lambda: bool(call()))):
            with pytest.raises(StoppedWaitingError, match=str(int(signal.SIGUSR1))) as stopped:
                form(_send(signal.SIGUSR1))
            assert not stopped.value.leaves_thread_blocked  # the call had ended: no thread left behind
        with pytest.raises(RuntimeSetupError, match="late"):
            replace(wait, seconds=float("nan")).result(threading.Event().wait)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert wait.result(_send(signal.SIGHUP)) == "done"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) is ours
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with pytest.raises(signals.SignalRaised) as first, signals.raising((signal.SIGTERM, signal.SIGINT)):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # during the cleanup: not a second exception
    assert first.value.signum == signal.SIGTERM
