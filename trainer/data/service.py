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
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable

import tensorflow as tf

from trainer.errors import ConfigError, DataError

PROBE_SECONDS = 10.0
_SERVE_HINT = "start one with `launch data serve --dispatcher` (and workers with `launch data serve --worker`)"


def _host_port(address: str, what: str = "data.service") -> tuple[str, int]:
    """`grpc://host:port` or `host:port` as (host, port); anything else is a typed error."""
    bare = address.split("://", 1)[-1]
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"{what}={address!r} is not host:port; name a dispatcher, e.g. localhost:5050")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = PROBE_SECONDS, what: str = "data.service") -> None:
    """Fail fast when nothing listens at the dispatcher address.

    tf.data service clients retry an unreachable dispatcher for a long time (minutes, then
    an opaque UNAVAILABLE); a TCP connect bounded by `timeout_s` turns that into one line.
    """
    host, port = _host_port(address, what)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise DataError(
            f"{what}={address!r}: no tf.data service dispatcher answers there within {timeout_s:g}s "
            f"({err.strerror or err}); {_SERVE_HINT}, or set data.service='' to feed from this process"
        ) from None


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


def start_worker(dispatcher: str, port: int = 0, host: str = "") -> tf.data.experimental.service.WorkerServer:
    """A worker on `port` that registers with `dispatcher`; `host`: the name the trainer
    reaches it by (a pod's DNS name), default this machine's `localhost`."""
    check_reachable(dispatcher, what="--worker")  # nothing listening: one line now, not retried for ever
    worker_address = f"{host}:%port%" if host else "localhost:%port%"
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=dispatcher.split("://", 1)[-1],
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


def serve_until_signal(server, announce: Callable[[], None]) -> int:
    """Block until SIGTERM or SIGINT, then stop `server`: 0, as a clean stop is not a failure.
    `announce` runs once the handlers are in place: whoever reads the address line may
    signal at once."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    announce()
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0
