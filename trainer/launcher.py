"""`launch train --workers N`: N local worker processes forming one multi-worker cluster.

Each worker gets a TF_CONFIG naming all N on free localhost ports and its own index
(worker 0 is the chief). The ports are reserved before the workers start and held until
they end (SO_REUSEPORT, which TensorFlow's gRPC server joins when TF_GRPC_REUSE_PORT=1),
so no other program can take one between our choice and TensorFlow's bind.

Security: TensorFlow's gRPC server binds every network interface (0.0.0.0; its bind
address is hard-coded in grpc_server_lib.cc), whatever host TF_CONFIG names, and it has
no authentication. `run_local_workers` says so when it starts. Output is prefixed `[worker i]`. If a worker fails, the
others are stopped and the failure's exit code is returned; otherwise the chief's.
SIGTERM/SIGINT/SIGHUP/SIGUSR1 to the launcher are forwarded once (as SIGTERM) to every
worker, which then stop together at a checkpoint (or at once, nothing written, if they
are still starting); a second signal kills them. The workers run in their own process
groups, so a terminal's Ctrl-C or hang-up reaches them once, through the launcher; and
they die with it (Linux), so a launcher killed outright leaves none holding the workdir.

This module needs no TensorFlow: it only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from trainer import signals
from trainer.say import Say

# Exit codes that mean "the worker did what it was asked": done, or stopped to resume later.
_CLEAN_EXITS = (0, 75)


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free now (bound to port 0 and released): for servers that
    bind localhost only, where a lost race is a failed start, not an exposure."""
    with reserved_ports(count) as ports:
        return ports


@contextlib.contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    """Free ports, held (bound with SO_REUSEPORT, not listening) while the block runs.

    A process that binds without SO_REUSEPORT (any other program) is refused these ports
    until the block ends; TensorFlow's gRPC server binds them with TF_GRPC_REUSE_PORT=1.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("0.0.0.0", 0))
            sockets.append(sock)
        yield [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def run_local_workers(
    command: Sequence[str],
    num_workers: int,
    echo: Say = print,
    grace_seconds: float = 20,
    env: dict[str, str] | None = None,
) -> int:
    """Run `command` as `num_workers` cooperating workers; returns the run's exit code.

    `env`: more environment variables for every worker.
    """
    with reserved_ports(num_workers) as ports:
        echo(
            f"Note: the workers' TensorFlow servers listen on ports {', '.join(map(str, ports))} of every network "
            "interface, without authentication (TensorFlow cannot bind them to localhost only); on an untrusted "
            "network, firewall these ports"
        )
        return _run_workers(command, ports, echo, grace_seconds, env or {})


def _run_workers(
    command: Sequence[str], ports: list[int], echo: Say, grace_seconds: float, extra_env: dict[str, str]
) -> int:
    lock = threading.Lock()
    workers = []
    # SIGKILL: a launcher killed outright will not relay the workers' output or stop them
    # later; a worker left running would hold the workdir's lock for its whole run.
    die_with_us = _die_with_parent_hook(signal.SIGKILL)
    for index in range(len(ports)):
        env = {
            **os.environ,
            **extra_env,
            "TF_CONFIG": tf_config(ports, index),
            "TF_GRPC_REUSE_PORT": "1",  # join the port reservation held by reserved_ports
            "PYTHONUNBUFFERED": "1",
        }
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_us,
        )
        thread = threading.Thread(target=_relay, args=(process, f"[worker {index}] ", echo, lock), daemon=True)
        thread.start()
        workers.append((process, thread))
    processes = [process for process, _ in workers]
    forwarded = _forward_signals(processes, echo)
    try:
        code = _wait(processes, echo, lock, grace_seconds, forwarded)
    finally:
        forwarded.restore()
        for _, thread in workers:
            thread.join(timeout=5)
    return code


def _relay(process: subprocess.Popen, prefix: str, echo: Say, lock: threading.Lock) -> None:
    for line in process.stdout:
        with lock:
            echo(prefix + line.rstrip("\n"))


def _wait(
    processes: list[subprocess.Popen],
    echo: Say,
    lock: threading.Lock,
    grace_seconds: float,
    forwarded: _forward_signals | None = None,
) -> int:
    while True:
        codes = [process.poll() for process in processes]
        failed = [(index, code) for index, code in enumerate(codes) if code is not None and code not in _CLEAN_EXITS]
        if failed:
            index, code = failed[0]
            received = forwarded.first_signal if forwarded is not None else None
            stopped = received is not None and code == -signal.SIGTERM
            with lock:
                if stopped:  # our own forwarded SIGTERM, taken before training began: nothing to save
                    echo(f"worker {index} stopped by the {received.name} before training started; nothing was saved")
                else:
                    echo(f"worker {index} failed with exit code {code}; stopping the other workers")
            _stop_all(processes, grace_seconds)
            # A signal's stop says which signal, as one trainer killed by it would (128+N).
            return 128 + received if stopped else as_exit_code(code)
        if all(code is not None for code in codes):
            return as_exit_code(codes[0])  # the chief's
        time.sleep(0.1)


def as_exit_code(returncode: int) -> int:
    """A child's return code as this process's exit code: killed by signal N is 128+N, as a
    shell reports it (Popen says -N, and `sys.exit(-9)` would exit with 247)."""
    return 128 - returncode if returncode < 0 else returncode


def _stop_all(processes: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM (a clean stop where possible), then SIGKILL after the grace period.

    A worker blocked in a collective with a dead peer cannot stop cleanly: it is killed.
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _forward_signals:  # noqa: N801 - used like a function
    """Pass the launcher's first SIGTERM/SIGINT/SIGHUP/SIGUSR1 (as SIGTERM) to every worker;
    kill them on the second."""

    def __init__(self, processes: list[subprocess.Popen], echo: Say = print) -> None:
        self.processes, self.count, self.previous, self.echo = processes, 0, {}, echo
        self.first_signal: signal.Signals | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in signals.STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        self.first_signal = self.first_signal or signal.Signals(signum)
        for process in self.processes:
            if process.poll() is None:
                if self.count == 1:
                    process.send_signal(signal.SIGTERM)
                else:
                    process.kill()
        if self.count == 1:
            self.echo(
                f"{signal.Signals(signum).name} received: the workers stop at their next step, or at once if still "
                "starting (again: at once)"
            )
        else:
            # As a single trainer does: a second signal means "now", and says which one.
            os._exit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the trainer dies.

    A `finally:` in the trainer stops TensorBoard on every exit Python sees; this covers
    the one it cannot (SIGKILL, a crash), which would leave TensorBoard serving forever.
    Other systems keep the `finally:` only.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _die_with_parent_hook(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send `signum` to the child when this process dies.

    prctl is looked up here, in the parent: the hook runs between fork and exec while
    other threads (the output relays) may hold locks, so it only makes one C call. A
    parent that died before the call was made is noticed too. None elsewhere than Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signum)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signum)

    return hook


def start_tensorboard(logdir: str, echo: Say = print) -> subprocess.Popen | None:
    """`launch train --tensorboard`: TensorBoard on a free localhost port beside the run."""
    port = free_ports(1)[0]
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--port",
        str(port),
        "--host",
        "localhost",
    ]
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    except OSError as err:
        echo(f"Warning: could not start TensorBoard ({err}); run: tensorboard --logdir {logdir}")
        return None
    echo(f"TensorBoard: http://localhost:{port}/ (logdir {logdir}; stops with this run)")
    return process
