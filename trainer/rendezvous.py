"""Waiting for something outside (a cluster's other tasks, a TPU's address): deadline,
a line saying what we wait for, and signals that still work.

TensorFlow's own waits cannot give these: while `MultiWorkerMirroredStrategy()` waits
for the other tasks to register, it holds the GIL (no Python signal handler, no other
Python thread runs), it installs its own SIGTERM handler (so SIGTERM is swallowed), and
it waits up to an hour. So every task first meets the others here, in plain sockets and
Python, and only then starts TensorFlow's cluster, which then connects at once.

The meeting point is the coordination leader's own port (the chief, or worker 0 when
there is no chief), before TensorFlow binds it: the leader listens there, every other
task connects, says who it is and waits for "go"; once all arrived the leader sends
"go" to each and closes the port, and every task starts TensorFlow. The workers close
their connections first, so no connection lingers on the leader's port (TIME_WAIT) when
TensorFlow binds it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

from trainer import files, signals
from trainer.errors import RuntimeSetupError, StoppedWaitingError
from trainer.say import Say

_HELLO = b"trainer-hello "
_GO = b"go\n"
# The first line comes after this long (a healthy start says nothing), then every minute.
_FIRST_ANNOUNCE_S = 3.0
_ANNOUNCE_EVERY_S = 60.0
_POLL_S = 0.25


@dataclass(frozen=True)
class Task:
    job: str
    index: int
    address: str  # host:port

    @property
    def name(self) -> str:
        return f"{self.job} {self.index}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Cluster:
    """The tasks of a checked $TF_CONFIG, the leader first (trainer.cluster checked it)."""

    tasks: tuple[Task, ...]
    me: Task

    @classmethod
    def from_tf_config(cls, parsed: dict) -> Cluster:
        cluster, task = parsed["cluster"], parsed.get("task", {})
        tasks = tuple(
            Task(job, index, address)
            for job in ("chief", "worker")
            for index, address in enumerate(cluster.get(job, []))
        )
        me = next(t for t in tasks if (t.job, t.index) == (task.get("type", "worker"), task.get("index", 0)))
        return cls(tasks, me)

    @property
    def leader(self) -> Task:
        return self.tasks[0]


def meet(cluster: Cluster, deadline_s: float, announce: Say) -> None:
    """Return once every task of `cluster` got here; else raise at the deadline or a signal."""
    if len(cluster.tasks) <= 1:
        return
    _check_own_port_free(cluster)
    if cluster.me == cluster.leader:
        with _Gathering(cluster) as gathering:
            wait_until(gathering.everyone_arrived, deadline_s, announce, gathering.waiting_for, gathering.hint)
            gathering.release()
    else:
        arrival = _Arrival(cluster)
        try:
            wait_until(arrival.released, deadline_s, announce, arrival.waiting_for, arrival.hint)
        finally:
            arrival.close()


def wait_until(
    ready: Callable[[], bool],
    deadline_s: float,
    announce: Say,
    waiting_for: Callable[[], str],
    hint: Callable[[], str],
) -> None:
    """Call `ready()` (each call returns within about a second) until it says yes.

    SIGTERM, SIGINT, SIGHUP and SIGUSR1 end the wait with StoppedWaitingError (exit 75:
    nothing had started, so running the same command again starts over); the deadline
    ends it with one line saying what was missing and what to check.
    """
    gave_up = lambda: RuntimeSetupError(
        f"gave up after {deadline_s:g} s waiting for {waiting_for()}; {hint()} "
        "(runtime.connect_timeout_s sets how long to wait)"
    )
    wait = signals.Wait(deadline_s, gave_up, _stopped_waiting)
    wait.until(ready, _Announcements(announce, waiting_for, deadline_s).after)


def _stopped_waiting(signum: int) -> StoppedWaitingError:
    return StoppedWaitingError(
        f"{signal.Signals(signum).name} received while waiting for the cluster or TPU: nothing had started, nothing "
        "was written; run the same command to start again"
    )


@dataclass
class _Announcements:
    """What a wait says while it lasts: a first line after _FIRST_ANNOUNCE_S (a healthy start
    says nothing), then one every _ANNOUNCE_EVERY_S."""

    announce: Say
    waiting_for: Callable[[], str]
    deadline_s: float
    next_s: float = _FIRST_ANNOUNCE_S

    def after(self, elapsed: float) -> None:
        if elapsed >= self.next_s:
            self.announce(f"Waiting for {self.waiting_for()} ({elapsed:.0f} s of {self.deadline_s:g} s; Ctrl-C stops)")
            self.next_s = elapsed + _ANNOUNCE_EVERY_S


def _check_own_port_free(cluster: Cluster) -> None:
    """TensorFlow will listen on this task's port; another program there is one line, not
    TensorFlow's "Could not start gRPC server" traceback. (The leader binds it itself.)"""
    if cluster.me == cluster.leader:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _share_port_as_tensorflow_does(probe)
        try:
            probe.bind(("", cluster.me.host_port[1]))
        except OSError as err:
            raise _port_in_use(cluster.me, err) from None


def _share_port_as_tensorflow_does(sock: socket.socket) -> None:
    """`launch train --workers N` holds its workers' ports with SO_REUSEPORT until they end
    and tells TensorFlow to join them (TF_GRPC_REUSE_PORT=1, trainer.launcher): so do we."""
    if os.environ.get("TF_GRPC_REUSE_PORT", "").lower() in ("1", "true") and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _port_in_use(task: Task, err: OSError) -> RuntimeSetupError:
    return RuntimeSetupError(
        f"port {task.host_port[1]} of this task ({task.name} at {task.address} in TF_CONFIG) cannot be used: "
        f"{err.strerror or err}; another program (or an earlier trainer) listens there: stop it or give this "
        "task another port"
    )


@dataclass
class _Gathering:
    """The leader's side: listen on its port until every other task said hello."""

    cluster: Cluster
    arrived: dict[str, socket.socket] = field(default_factory=dict)
    listener: socket.socket | None = None

    def __enter__(self) -> _Gathering:
        port = self.cluster.leader.host_port[1]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _share_port_as_tensorflow_does(listener)
        try:
            listener.bind(("", port))
            listener.listen(len(self.cluster.tasks))
        except OSError as err:
            listener.close()
            raise _port_in_use(self.cluster.leader, err) from None
        listener.settimeout(_POLL_S)
        self.listener = listener
        return self

    def __exit__(self, *exc) -> None:
        for connection in self.arrived.values():
            connection.close()
        if self.listener is not None:
            self.listener.close()

    def everyone_arrived(self) -> bool:
        if len(self.arrived) == len(self.cluster.tasks) - 1:
            return True
        try:
            connection, _ = self.listener.accept()
        except TimeoutError:
            return False
        name = _read_hello(connection)
        if name is None or name not in self._expected():
            connection.close()  # not one of ours (a port scanner, a stray client)
            return False
        if name in self.arrived:
            self.arrived[name].close()  # that task restarted: its new connection counts
        self.arrived[name] = connection
        return False

    def _expected(self) -> set[str]:
        return {task.name for task in self.cluster.tasks[1:]}

    def release(self) -> None:
        """Say go to everyone, then wait (briefly) for each to close its end first."""
        for connection in self.arrived.values():
            with suppress(OSError):
                connection.sendall(_GO)
        for connection in self.arrived.values():
            connection.settimeout(5.0)
            with suppress(OSError):
                connection.recv(1)

    def waiting_for(self) -> str:
        missing = [task for task in self.cluster.tasks[1:] if task.name not in self.arrived]
        shown = ", ".join(f"{task.name} ({task.address})" for task in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        return f"{len(missing)} of the cluster's {len(self.cluster.tasks) - 1} other task(s): {shown}{more}"

    def hint(self) -> str:
        return "start the missing tasks with the same TF_CONFIG cluster, and check that they can reach this host"


def _read_hello(connection: socket.socket) -> str | None:
    connection.settimeout(2.0)
    try:
        line = connection.recv(256)
    except OSError:
        return None
    if not line.startswith(_HELLO) or not line.endswith(b"\n"):
        return None
    return line[len(_HELLO) : -1].decode("ascii", errors="replace")


@dataclass
class _Arrival:
    """A task's side: connect to the leader (retrying), say hello, wait for go."""

    cluster: Cluster
    connection: socket.socket | None = None
    answered_without_go: bool = False
    last_error: str = ""

    def released(self) -> bool:
        if self.connection is None:
            self._connect()
            return False
        try:
            reply = self.connection.recv(16)
        except TimeoutError:
            return False
        except OSError as err:
            reply, self.last_error = b"", str(err.strerror or err)
        if reply == _GO:
            return True
        # The leader went away, or something else listens there (a leader that is past
        # its wait and already training answers like this too): try again.
        self.answered_without_go = True
        self.close()
        time.sleep(_POLL_S)
        return False

    def _connect(self) -> None:
        try:
            connection = socket.create_connection(self.cluster.leader.host_port, timeout=1.0)
        except OSError as err:
            self.last_error = str(err.strerror or err)
            time.sleep(_POLL_S)
            return
        try:
            connection.sendall(_HELLO + self.cluster.me.name.encode("ascii") + b"\n")
        except OSError as err:
            self.last_error = str(err.strerror or err)
            connection.close()
            return
        connection.settimeout(_POLL_S)
        self.connection = connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def waiting_for(self) -> str:
        leader = self.cluster.leader
        return f"the cluster's leader, {leader.name} at {leader.address}"

    def hint(self) -> str:
        if self.answered_without_go:
            return (
                "something answers there but never lets this task in: the leader already started without it "
                "(restart every task of the job together) or another program holds that port"
            )
        reason = f" (last attempt: {self.last_error})" if self.last_error else ""
        return f"start the leader task, and check its address and that this host can reach it{reason}"


def wait_for_address(url: str, deadline_s: float, announce: Say) -> None:
    """Wait until something accepts TCP connections at a grpc://host:port URL."""
    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    if not host or not files.is_port(port):
        raise RuntimeSetupError(f"{url[:80]!r} is not grpc://host:port with a port from 1 to 65535")
    probe = _Probe((host.strip("[]"), int(port)))
    wait_until(
        probe.answers,
        deadline_s,
        announce,
        lambda: f"{url} to answer",
        lambda: f"nothing accepts connections there ({probe.last_error}); check the TPU's address and that it runs",
    )


@dataclass
class _Probe:
    address: tuple[str, int]
    last_error: str = "no attempt yet"

    def answers(self) -> bool:
        try:
            socket.create_connection(self.address, timeout=1.0).close()
        except OSError as err:
            self.last_error = str(err.strerror or err)
            time.sleep(_POLL_S)
            return False
        return True
