"""Connecting to a TPU: find it, wait for it with a deadline, and start its system.

Kept apart from trainer.runtime (which chooses among every kind of device) because a TPU
is the one device reached over the network: by a name the GCE metadata server resolves,
or by a grpc:// address. TensorFlow's own calls for both can wait forever without
hearing signals, so each is waited for here, through trainer.rendezvous, with
`runtime.connect_timeout_s` and a line saying what it waits for.
"""

from __future__ import annotations

import glob
import os
import threading

import tensorflow as tf

from trainer import rendezvous
from trainer.config import RuntimeConfig
from trainer.errors import RuntimeSetupError, TrainerError
from trainer.say import Say


def tpu_is_resolvable(config: RuntimeConfig) -> bool:
    """A TPU is named (runtime.tpu, $TPU_NAME) or this is a TPU VM (accelerator devices)."""
    return bool(config.tpu or os.environ.get("TPU_NAME") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def connect_tpu(config: RuntimeConfig, announce: Say) -> tuple[tf.distribute.Strategy, str]:
    """A TPUStrategy on the TPU runtime.tpu or $TPU_NAME names (or this TPU VM's own), and its kind.

    Whatever goes wrong is one line naming what was tried and what to set: TensorFlow's
    errors here (no TPU library, an unknown name, an address that refuses) say neither.
    """
    target = config.tpu or os.environ.get("TPU_NAME") or "local"
    if target.startswith("grpc://"):
        # TensorFlow's connect to an address where nothing answers has no deadline and
        # ignores signals (it holds the GIL): reach the address first, in Python.
        rendezvous.wait_for_address(target, config.connect_timeout_s, announce)
    try:
        resolver = _tpu_resolver(target, config.connect_timeout_s, announce)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), "tpu"
    except TrainerError:
        raise  # the metadata server's deadline, or a signal during the wait: already one line
    except Exception as err:  # noqa: BLE001 - every failure here means "no usable TPU"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RuntimeSetupError(
            f"no TPU could be used: tried TPUClusterResolver(tpu={target!r}) and got: {reason}. On a Cloud TPU VM "
            "install the [tpu] extra; elsewhere set runtime.tpu to the TPU's name or grpc:// address, or use "
            "runtime.strategy=auto"
        ) from None


def _tpu_resolver(target: str, deadline_s: float, announce: Say) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    """TPUClusterResolver(tpu=target), waited for with a deadline, a "Waiting for" line and
    signals heard.

    Why a thread: for a TPU given by name, TensorFlow asks the GCE metadata server with
    urlopen and no timeout; a server that accepts the connection and never answers held
    the command silent forever. The thread is left behind (a daemon) when the wait ends.
    """
    outcome: dict = {}

    def resolve() -> None:
        try:
            outcome["resolver"] = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=target)
        except Exception as err:  # noqa: BLE001 - handed to the caller, which words it
            outcome["error"] = err

    worker = threading.Thread(target=resolve, name="tpu-resolver", daemon=True)
    worker.start()

    def finished() -> bool:
        worker.join(timeout=0.25)
        return not worker.is_alive()

    server = _metadata_server()
    rendezvous.wait_until(
        finished,
        deadline_s,
        announce,
        lambda: f"the metadata server ({server}) to say where TPU {target[:80]!r} is",
        lambda: (
            "it did not answer; on a Cloud TPU VM check that the metadata server answers, elsewhere set "
            "runtime.tpu to the TPU's grpc://host:port address"
        ),
    )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["resolver"]


def _metadata_server() -> str:
    """Where TensorFlow's TPU client asks (tensorflow/python/tpu/client/client.py)."""
    host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    return f"http://{host}"


def short_loop_warning(steps_per_loop: int, steps_per_epoch: int) -> str | None:
    """The warning for a compiled call too short for a TPU, where host round trips dominate.

    A call also ends at every epoch's end, so a loop of a whole epoch (or more) is as long as
    calls get and is not warned about, however few steps an epoch has.
    """
    if steps_per_loop >= min(50, steps_per_epoch):
        return None
    return (
        f"Warning: train.steps_per_loop={steps_per_loop} is small for a TPU, where host round trips dominate; "
        f"use 100 or more (or one epoch: {steps_per_epoch} steps)"
    )
