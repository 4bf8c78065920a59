"""Signals and lost peers (#24's sweep, holes H1, H4, H5, H6): every stop is heard, says what
happened in one line, and leaves nothing half-written or running.

The launcher tests run `run_local_workers` over stand-in workers (a few lines of Python, no
TensorFlow): what they check is the launcher's own part, in about a second. The others run
real `launch` processes on configs/smoke.yaml and signal them once a line was printed or a
file appeared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests import test_safety
from tests.conftest import REPO, launch_train
from tests.test_hostile_data import image_folder
from trainer.checkpoints import checkpoint_steps
from trainer.launcher import free_ports, tf_config
from trainer.preemption import EXIT_PREEMPTED

trained_once, trained = test_safety.trained_once, test_safety.trained
_ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


class _Lines:
    """A process's output, read by a thread: wait for a line without ever hanging."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.lines, self.changed = process, [], threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, fragment: str, count: int = 1, timeout: float = 120.0) -> list[str]:
        """The first `count` lines holding `fragment`, once they were printed."""

        def found() -> list[str]:
            return [line for line in self.lines if fragment in line]

        with self.changed:
            assert self.changed.wait_for(lambda: len(found()) >= count, timeout), (
                f"no {count} x {fragment!r} within {timeout} s: {self.text}"
            )
            return found()[:count]

    def finish(self, timeout: float = 120.0) -> str:
        """All the output, once the process ended."""
        self.process.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.lines)


# --- H4: SIGHUP, through one trainer and through the launcher; workers die with it -------


# A stand-in worker: says it is ready (with its pid) once its SIGTERM handler is in place;
# a SIGTERM makes it say so and exit 75, as a trainer stopping at a checkpoint does.
_WORKER = """
import os, signal, sys
def stop(signum, frame):
    print("stopping on", signal.Signals(signum).name, flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("ready", os.getpid(), flush=True)
while True:
    signal.pause()
"""
_LAUNCHER = """
import sys
from trainer.launcher import run_local_workers
sys.exit(run_local_workers([sys.executable, "-c", sys.argv[1]], 2, grace_seconds=5))
"""


def _launcher() -> tuple[subprocess.Popen, _Lines, list[int]]:
    """A launcher of two stand-in workers, both ready; and their pids."""
    process = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, _WORKER],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_ENV,
    )
    lines = _Lines(process)
    ready = lines.wait_for("] ready ", count=2, timeout=60)
    return process, lines, [int(line.split()[-1]) for line in ready]


def _alive(pid: int) -> bool:
    """Still running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sighup_to_the_launcher_stops_every_worker_cleanly():
    """H4: a SIGHUP to `launch train --workers N` is forwarded (as SIGTERM) like SIGTERM and
    Ctrl-C: every worker stops cleanly and the launcher exits 75. It used to kill the
    launcher alone (129) and leave the workers running."""
    process, lines, pids = _launcher()
    try:
        process.send_signal(signal.SIGHUP)
        output = lines.finish(timeout=30)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == EXIT_PREEMPTED, output
    assert "SIGHUP received: the workers stop" in output
    assert output.count("stopping on SIGTERM") == 2, output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_workers_die_with_a_killed_launcher():
    """H4: SIGKILL to the launcher (it can forward nothing) ends its workers within a
    second or two; they used to run on for 8-28 s, holding the workdir's lock."""
    process, lines, pids = _launcher()
    try:
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), lines.text
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- H1: SIGTERM during a multi-worker start-up ------------------------------------------


def test_sigterm_during_multi_worker_start_up_ends_both_workers_at_once(tmp_path):
    """H1: between the strategy's start and the first step, TensorFlow's coordination
    service swallowed SIGTERM and both workers trained to the end (rc 0). Now a SIGTERM
    there ends each worker at once, nothing saved, as it ends one trainer there; the
    launcher says so and exits 128+15."""
    launcher = launch_train(tmp_path / "run", workers=2)
    lines = _Lines(launcher)
    lines.wait_for("Data:")  # the data is being prepared: the strategy has started
    launcher.send_signal(signal.SIGTERM)
    output = lines.finish(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, output
    assert "stopped by the SIGTERM before training started" in output
    assert "Stopped by" not in output and "final test accuracy" not in output, output
    assert not checkpoint_steps(tmp_path / "run" / "checkpoints")


# --- H5: a peer that dies ----------------------------------------------------------------


def test_a_peer_killed_during_training_is_one_line_and_exit_75(tmp_path):
    """H5: worker 1 is SIGKILLed once training saved its first checkpoint; worker 0 used to
    end with a 136-line traceback (rc 1). Now: one `Error:` line naming worker 1 and what to
    do, exit 75 (the same command on every task resumes from the last checkpoint)."""
    ports = free_ports(2)
    processes = []
    for index in range(2):
        env = {name: value for name, value in _ENV.items() if name != "TF_CONFIG"}
        env["TF_CONFIG"] = tf_config(ports, index)
        args = [sys.executable, "-m", "launch", "train", "--config", str(REPO / "configs" / "smoke.yaml")]
        args += ["--workdir", str(tmp_path / "run"), "--set", "runtime.strategy=multi_worker"]
        args += ["--set", "train.epochs=1000"]
        processes.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    chief, peer = processes
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_steps(tmp_path / "run" / "checkpoints") and time.monotonic() < deadline:
            assert chief.poll() is None and peer.poll() is None, "a worker ended before its first checkpoint"
            time.sleep(0.05)
        peer.kill()
        output, _ = chief.communicate(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert chief.returncode == EXIT_PREEMPTED, output
    assert len(errors) == 1 and "Traceback" not in output, output
    assert "worker 1" in errors[0] and "stopped answering" in errors[0], errors[0]


# --- H6: data convert and export end cleanly on SIGTERM/SIGHUP ---------------------------

# Runs `launch` with one function wrapped so that the process signals itself half-way
# through the write: a moment chosen by what has been written, not by time.
_SIGNAL_HALF_WAY = """
import os, signal, sys
import {module} as target
original = target.{function}
calls = []
def wrapped(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == {after}:
        os.kill(os.getpid(), signal.{signal})
    return result
target.{function} = wrapped
from launch.cli import main
sys.argv = ["launch", *sys.argv[1:]]
main()
"""


def _run_signalled(module: str, function: str, after: int, signum: int, *args: str) -> subprocess.CompletedProcess:
    script = _SIGNAL_HALF_WAY.format(module=module, function=function, after=after, signal=signum.name)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=_ENV, timeout=120)


def _assert_signal_line(done: subprocess.CompletedProcess, signum: int, fragment: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 128 + signum, done.stdout + done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{signum.name} received" in errors[0] and fragment in errors[0], errors[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_data_convert_stopped_by_a_signal_removes_what_it_wrote(tmp_path, signum):
    """H6: a SIGTERM/SIGHUP while the shards are written (here once the 2nd of 8 test images
    was read: the train shards are done, a test shard is half-written) used to leave them and the
    .tmp shard in --to, and the next try was refused ("exists and is not empty"). Now the
    cleanup runs, the exit is 128+N with one line, and the same command then succeeds."""
    root, out = image_folder(tmp_path / "images"), tmp_path / "shards"
    args = ("data", "convert", "--from", str(root), "--to", str(out), "--shard-size", "0.001")
    done = _run_signalled("trainer.data.convert", "_read_example", 10, signum, *args)
    _assert_signal_line(done, signum, "stopped converting")
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    again = subprocess.run(
        [sys.executable, "-m", "launch", *args], capture_output=True, text=True, env=_ENV, timeout=120
    )
    assert again.returncode == 0, again.stdout + again.stderr


def test_export_stopped_by_a_signal_leaves_no_temporary_folder(trained):
    """H6 (export): a SIGTERM once model.keras is written used to leave `.export.tmp-*`
    beside export/. Now the temporary folder is removed and the exit is 143 with one line."""
    done = _run_signalled("keras", "Model.save", 1, signal.SIGTERM, "export", "--workdir", str(trained))
    _assert_signal_line(done, signal.SIGTERM, "the previous export is kept")
    left = sorted(p.name for p in Path(trained).iterdir() if p.name == "export" or p.name.startswith(".export.tmp"))
    assert left == []


def test_a_signal_during_an_evaluation_is_heard_while_the_pass_runs():
    """An evaluation is one compiled pass over the test set: a call into TensorFlow that
    Python does not interrupt, so SIGTERM's handler (the announcement, and a second signal's
    exit at once) ran only when the pass ended, minutes later on a large test set. Here a
    model that waits 2 s inside the pass (a py_function) stands for a long one; the pass is
    traced first, so the signal lands inside the compiled call."""
    from trainer.data.splits import Split
    from trainer.evaluation import Evaluator
    from trainer.preemption import StopRequest

    def slow_logits(images: tf.Tensor) -> tf.Tensor:
        time.sleep(2.0 if slow else 0.0)
        return tf.zeros([images.shape[0], 2])

    def model(images: tf.Tensor, training: bool = False) -> tf.Tensor:
        return tf.ensure_shape(tf.py_function(slow_logits, [images], tf.float32), [None, 2])

    split = Split(np.zeros([4, 8, 8, 3], np.uint8), np.array([0, 1, 0, 1], np.int32))
    evaluator = Evaluator(tf.distribute.get_strategy(), model, split, 4, ["ant", "bee"])
    slow = False
    assert evaluator(0).examples == 4  # traced
    slow, heard = True, []
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    with StopRequest(announce=lambda _line: heard.append(time.perf_counter())) as stop:
        timer.start()
        metrics = evaluator(0)
        ended = time.perf_counter()
    assert stop.requested and bool(stop.flag.numpy())
    assert len(heard) == 1 and ended - heard[0] > 1.0  # heard while the pass ran
    assert metrics.examples == 4  # and the pass went on to its end
