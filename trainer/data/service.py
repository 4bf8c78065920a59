"""The tf.data service: dispatcher and worker servers, and sending the train pipeline there.

`data.service` names a dispatcher (`launch data serve --dispatcher`); its workers
(`launch data serve --worker DISPATCHER`) run the same pipeline the trainer would run
itself, so the trainer process only receives finished batches. The stream starts at the
run's start step (pipeline.train_dataset_fn), and every `iter()` makes a new anonymous
job: no job is shared between runs or resumes.

Exactness: the index-based pipelines are read with ShardingPolicy.DYNAMIC, which hands
each worker whole steps of `range(start_step, total_steps)`: every batch is still the
function of (seed, step) that the local pipeline makes, each step is served once, and
with one service worker in the same order (weights bit-identical to the local pipeline).
With several workers the steps arrive in the order the workers finish them, so the
order of batches (not their contents) may differ. TFRecord streams are not splittable by
step and are read with ShardingPolicy.OFF: exact with one service worker only (each
worker would produce the whole stream). A worker lost mid-run: DYNAMIC is at-most-once,
so its in-flight steps never come and the consumer waits for them; the controller bounds
that wait (data.service_timeout_s, trainer.loop.controller) and the run stops with exit 75.

Start-up: TensorFlow retries a dispatcher that does not answer without end, so nothing
here trusts it to: `check_reachable` asks the address with one gRPC call with a deadline
(a TCP listener of another kind is told from a dispatcher), the trainer makes its first
iterator within data.service_timeout_s (`first_iterator`), and `launch data serve` waits
for its dispatcher with the signal handlers in place (`serve_worker`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc
import tensorflow as tf

from trainer import files, signals
from trainer.config import DataConfig
from trainer.errors import (
    ConfigError,
    DataError,
    InputStalledError,
    StoppedBySignalError,
    StoppedWaitingError,
)
from trainer.say import Say

T = TypeVar("T")

PROBE_SECONDS = 10.0
# How long `launch data serve --worker` waits for its dispatcher to answer (its --timeout).
START_SECONDS = 30.0
# The dispatcher's own gRPC method (tensorflow/core/data/service/dispatcher.proto): its
# request message is empty, so b"" is one, and the probe needs no generated classes.
_GET_VERSION = "/tensorflow.data.DispatcherService/GetVersion"
_THREAD = "tf-data-service-wait"  # the thread a call that may never return runs in
_SERVE_HINT = "start one with `launch data serve --dispatcher` (and workers with `launch data serve --worker`)"
_EXAMPLES = "e.g. localhost:5050, grpc://data-dispatcher:5050 or [::1]:5050"


def _host_port(address: str, what: str = "data.service") -> tuple[str, int]:
    """`grpc://host:port`, `host:port` or `[IPv6]:port` as (host, port); anything else is a
    DataError naming the value: TensorFlow would retry a malformed address as if it were
    only unreachable, without a word."""
    scheme, sep, bare = address.rpartition("://")
    if sep and scheme != "grpc":
        raise _malformed(address, what, f"{scheme}:// is not how a tf.data service is reached (grpc:// or none)")
    host, port = _split_port(bare, address, what)
    if not files.digits(port) or len(port) > 5:  # str.isdigit alone takes '１２３' and '²'
        raise _malformed(address, what, f"its port {files.short(repr(port), 40)} is not a number from 1 to 65535")
    if not 0 < int(port) <= 65_535:
        raise _malformed(address, what, f"its port {int(port)} is not in 1-65535")
    return host, int(port)


def _split_port(bare: str, address: str, what: str) -> tuple[str, str]:
    """(host, port) as written; an IPv6 host needs its brackets (`::1:5050` is ambiguous)."""
    if bare.startswith("["):
        host, sep, port = bare[1:].partition("]:")
    else:
        host, sep, port = bare.rpartition(":")
        if ":" in host:
            raise _malformed(address, what, "an IPv6 address needs brackets, as in [::1]:5050")
    if not (sep and host) or "[" in host or "]" in host:
        raise _malformed(address, what, "it is not host:port")
    return host, port


def _malformed(address: str, what: str, reason: str) -> DataError:
    return DataError(f"{what}={_shown(address)}: {reason}; name a tf.data service dispatcher as host:port, {_EXAMPLES}")


def _shown(address: str) -> str:
    """The address as an error line quotes it: escaped, and cut if long (it may be anything)."""
    return files.short(repr(address), 120)


def _bare(address: str) -> str:
    return address.rpartition("://")[2]


def check_reachable(address: str, timeout_s: float | None = None, what: str = "data.service") -> None:
    """Fail fast unless a tf.data service dispatcher answers at `address`.

    TensorFlow's clients and workers retry a dispatcher that does not answer without end
    (a closed port for minutes; a listener that accepts and never answers, or an HTTP
    server, for ever), and a worker's start ignores SIGINT meanwhile. One call of the
    dispatcher's own gRPC method with a deadline (`timeout_s`, default PROBE_SECONDS) tells a
    dispatcher from nothing, from another kind of server and from a tf.data worker.
    """
    _host_port(address, what)
    seconds = PROBE_SECONDS if timeout_s is None else timeout_s
    why = _asked(lambda: _unanswered(_bare(address), seconds), address, what, seconds)
    if why is not None:
        raise DataError(f"{what}={_shown(address)}: no tf.data service dispatcher answers there ({why}); {_hint(what)}")


def _asked(call: Callable[[], T], address: str, what: str, seconds: float) -> T:
    """`call()` (the probe); in the main thread, in a daemon thread while this one takes
    SIGTERM, SIGINT, SIGHUP and SIGUSR1: gRPC's wait does not let Python run a handler, and Ctrl-C
    was lost for the probe's 10 s. A signal: StoppedWaitingError (exit 75, nothing started)."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    late = lambda: DataError(f"{what}={_shown(address)}: no answer within {seconds:g} s; {_hint(what)}")
    stopped = lambda signum: StoppedWaitingError(
        f"{signal.Signals(signum).name} received while asking {what}={_shown(address)} for a tf.data service "
        "dispatcher; nothing was started: run the same command to start again"
    )
    return signals.Wait(seconds + 1, late, stopped).result(call, _THREAD)


def _unanswered(target: str, seconds: float) -> str | None:
    """None when a dispatcher answered GetVersion at `target` within `seconds`, else why not."""
    channel = grpc.insecure_channel(target)
    try:
        channel.unary_unary(_GET_VERSION)(b"", timeout=seconds)
    except grpc.RpcError as err:
        return _why(err, seconds)
    finally:
        channel.close()
    return None


def _why(err: grpc.RpcError, seconds: float) -> str:
    code = err.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "a gRPC server answers, but not as a dispatcher: a tf.data service worker's address?"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # A listener of another kind that accepts and stays silent, or a firewall that drops the connection.
        return f"nothing answered there as a gRPC server within {seconds:g} s"
    # gRPC's details end with the cause: "...: Connection refused", "...: Failed parsing HTTP/2 (...)".
    return (err.details() or code.name).rsplit(": ", 1)[-1].strip(" ]")


def _hint(what: str) -> str:
    if what == "--worker":
        return "start `launch data serve --dispatcher` there first (--worker takes the address it prints)"
    return f"{_SERVE_HINT}, or set data.service='' to feed from this process"


def _grpc(address: str) -> str:
    return address if "://" in address else f"grpc://{address}"


def served(
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], address: str, splittable: bool
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """`dataset_fn`, its datasets made by the tf.data service at `address` instead of here.

    `splittable`: the stream's source is the range of global steps, which DYNAMIC sharding
    hands out step by step (see the module docstring for what each mode keeps exact).
    """
    check_reachable(address)
    policy = tf.data.experimental.service.ShardingPolicy
    mode = policy.DYNAMIC if splittable else policy.OFF

    def dataset_fn_on_service(context: tf.distribute.InputContext) -> tf.data.Dataset:
        distribute = tf.data.experimental.service.distribute(processing_mode=mode, service=_grpc(address))
        return dataset_fn(context).apply(distribute)

    return dataset_fn_on_service


# A worker silent this long is dropped by the dispatcher (tf's default is far longer, and
# until then a consumer waits on the lost worker's steps); workers heartbeat 5x as often.
WORKER_TIMEOUT_MS = 10_000


def start_dispatcher(port: int = 0) -> tf.data.experimental.service.DispatchServer:
    """A dispatcher on `port` (0: any free one). Not fault tolerant: a restarted dispatcher
    forgets its jobs, and the trainer resumes from its last checkpoint."""
    config = tf.data.experimental.service.DispatcherConfig(port=port, worker_timeout_ms=WORKER_TIMEOUT_MS)
    return _started(tf.data.experimental.service.DispatchServer, config, port)


def start_worker(
    dispatcher: str, port: int = 0, host: str = "", timeout_s: float = PROBE_SECONDS
) -> tf.data.experimental.service.WorkerServer:
    """A worker on `port` that registers with `dispatcher`; `host`: the name the trainer
    reaches it by (a pod's DNS name), default this machine's `localhost`. A dispatcher that
    does not answer within `timeout_s` is one DataError, not TensorFlow's endless retry."""
    check_reachable(dispatcher, timeout_s, what="--worker")
    return _new_worker(dispatcher, port, host)


def _new_worker(dispatcher: str, port: int, host: str) -> tf.data.experimental.service.WorkerServer:
    """The worker, registered with `dispatcher`: TensorFlow blocks in that until the dispatcher
    takes it, holding Python's lock (no other thread and no signal handler runs meanwhile)."""
    worker_address = f"{host}:%port%" if host else "localhost:%port%"
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=_bare(dispatcher),
        worker_address=worker_address,
        port=port,
        heartbeat_interval_ms=WORKER_TIMEOUT_MS // 5,
    )
    return _started(tf.data.experimental.service.WorkerServer, config, port)


def _started(server_class, config, port: int):
    """The server, or a ConfigError when its port is taken (TensorFlow raises a bare RuntimeError)."""
    try:
        return server_class(config)
    except RuntimeError as err:
        raise ConfigError(
            f"cannot start a tf.data service server on port {port} ({err}); pick another --port, or 0"
        ) from None


def server_address(server) -> str:
    """The host:port a DispatchServer or WorkerServer listens on (tf's own `_address`: the
    only accessor both servers have)."""
    return server._address  # noqa: SLF001


# --- waits on TensorFlow calls that may never return ---------------------------------------


def _default_actions() -> contextlib.AbstractContextManager[None]:
    """The signals' default actions while the block runs (a call that holds Python's lock, where
    no Python handler would run): one still ends the process at once. The previous ones after."""
    return signals.handled(signals.STOP_SIGNALS, signal.SIG_DFL)


def first_iterator(make: Callable[[], T], data: DataConfig) -> T:
    """`make()`, the training stream's iterator; with data.service, made within
    data.service_timeout_s, and a signal meanwhile ends the run.

    Making it registers the pipeline with the dispatcher and starts a job: calls that
    TensorFlow retries without end while the dispatcher does not answer, before the
    controller's deadline on each compiled call (trainer.loop.controller) applies. Past the
    deadline: InputStalledError (exit 75, as a stalled call); on SIGTERM, SIGINT, SIGHUP or SIGUSR1:
    StoppedWaitingError (exit 75: nothing was trained yet, the same command starts again).
    """
    if not data.service:
        return make()
    address, seconds = data.service, data.service_timeout_s
    stalled = lambda: InputStalledError(
        f"the tf.data service at data.service={_shown(address)} did not start the training stream within {seconds:g} s "
        "(data.service_timeout_s): its dispatcher does not take the pipeline. Restart the dispatcher and its "
        "workers (launch data serve), then run the same command"
    )
    stopped = lambda signum: StoppedWaitingError(
        f"{signal.Signals(signum).name} received while waiting for the tf.data service at data.service="
        f"{_shown(address)} to start the training stream; nothing was trained, run the same command to start again"
    )
    return signals.Wait(seconds, stalled, stopped).result(_in_callers_scope(make), _THREAD)


def _in_callers_scope(make: Callable[[], T]) -> Callable[[], T]:
    """`make` under the caller's distribution strategy scope, which TensorFlow keeps per thread."""
    scope = tf.distribute.get_strategy().scope if tf.distribute.has_strategy() else contextlib.nullcontext

    def made() -> T:
        with scope():
            return make()

    return made


# --- `launch data serve` -------------------------------------------------------------------


def serve_dispatcher(port: int, say: Say) -> int:
    """Start a dispatcher on `port`, `say` its address line, serve until a signal: 0."""
    with _default_actions():
        server = start_dispatcher(port)
    address = server_address(server)
    return _serve(server, f"tf.data service dispatcher at {address}; train with --set data.service={address}", say)


def serve_worker(dispatcher: str, port: int, host: str, say: Say, timeout_s: float = START_SECONDS) -> int:
    """Start a worker of `dispatcher`, `say` its address line, serve until a signal: 0.

    The dispatcher is asked first, in a daemon thread while this one waits with the signal
    handlers in place: nothing answering there as a dispatcher within `timeout_s` is a
    DataError naming the address (exit 2), a signal meanwhile StoppedBySignalError (exit
    128+N: nothing was served). Then TensorFlow registers the worker, a call that holds
    Python's lock: the signals' default actions are in place for it, so one still ends the
    process at once (killed by it, 128+N to the shell).
    """
    late = lambda: DataError(f"--worker={_shown(dispatcher)}: no answer within {timeout_s:g} s; {_hint('--worker')}")
    probe = signals.Wait(timeout_s + 1, late, _stopped)  # `late` is a backstop: the probe's own comes first
    probe.result(lambda: check_reachable(dispatcher, timeout_s, "--worker"), _THREAD)
    with _default_actions():
        server = _new_worker(dispatcher, port, host)
    return _serve(server, f"tf.data service worker at {server_address(server)} for dispatcher {dispatcher}", say)


def _serve(server, line: str, say: Say) -> int:
    """Block until SIGTERM, SIGINT, SIGHUP (a dropped ssh session) or SIGUSR1, then stop `server`: 0,
    as a clean stop is not a failure. `line` is said once the handlers are in place:
    whoever reads the address may signal at once."""
    with signals.recorded(signals.STOP_SIGNALS) as received:
        say(line)
        while not received.event.wait(1.0):
            pass
        server.stop()
    return 0


def _stopped(signum: int) -> StoppedBySignalError:
    name = signal.Signals(signum).name
    return StoppedBySignalError(f"{name} received while waiting for the tf.data service dispatcher", signum)
