"""Devices, strategy and precision: one factory turns `runtime.*` into a ready Runtime.

The rest of the code only sees a `tf.distribute.Strategy`; one replica, eight GPUs,
several worker processes or a TPU run the same path. The reason for every choice is
kept, for the console and `launch devices`. Reaching a TPU over the network is
trainer.tpu; meeting a cluster's other tasks before TensorFlow does is trainer.rendezvous.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import keras
import tensorflow as tf

from trainer import rendezvous
from trainer.cluster import adopt_slurm_cluster, checked_tf_config, tf_config_workers
from trainer.config import RuntimeConfig
from trainer.errors import PeerLostError, RuntimeSetupError
from trainer.say import Say
from trainer.tpu import connect_tpu, tpu_is_resolvable

# What a collective or the coordination service raises when a peer task is gone.
_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
)


@dataclass
class Runtime:
    strategy: tf.distribute.Strategy
    precision: str
    reason: str  # why this strategy/precision, for the console and logs
    device_kind: str = "cpu"  # "cpu" | "gpu" | "tpu"
    jit_compile: bool = False
    worker_index: int = 0
    num_workers: int = 1

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def is_chief(self) -> bool:
        """Only the chief writes checkpoints, TensorBoard events, exports and metrics."""
        return self.worker_index == 0

    @property
    def local_replicas(self) -> int:
        """Replicas on this worker (`num_replicas` counts every worker's)."""
        return self.num_replicas // max(self.num_workers, 1)

    def barrier(self, name: str) -> None:
        """Wait until every worker got here; a no-op for one worker.

        Through TensorFlow's coordination service (the chief answers every worker), not a
        collective: a worker that leaves right after its last collective can take away data
        a slower peer has not pulled yet, which aborts the peer. TensorFlow 2.21 has no
        public API for the coordination service: `context.wait_at_barrier` is private, so
        it is reached here only, and its absence is one clear error rather than a crash.
        """
        if self.num_workers <= 1:
            return
        try:
            from tensorflow.python.eager import context

            wait = context.context().wait_at_barrier
        except (ImportError, AttributeError) as err:
            raise RuntimeSetupError(
                f"this TensorFlow ({tf.__version__}) has no coordination-service barrier, which multi-worker runs "
                "need; install the version in pyproject.toml"
            ) from err
        wait(f"trainer_{name}", timeout_in_ms=30 * 60 * 1000)

    @property
    def loss_scaling(self) -> bool:
        """float16 gradients underflow without dynamic loss scaling; bfloat16 do not."""
        return self.precision == "mixed_float16"

    def peer_lost(self, err: BaseException) -> PeerLostError | None:
        """`err` as one line naming the lost peer, if it is a peer's disappearance; else None.

        TensorFlow reports it from whichever collective was waiting (a broadcast at start-up,
        an all-reduce in a step or an evaluation) with a long traceback that never says what
        to do: look at that task's log, then start every task again. One process has no
        peer to lose: its errors are left as they are.
        """
        if self.num_workers <= 1 or not isinstance(err, _PEER_ERRORS):
            return None
        resolver = getattr(self.strategy, "cluster_resolver", None)
        me = f"{resolver.task_type} {resolver.task_id}" if resolver is not None else ""
        named = {f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", err.message or "")}
        others = sorted(named - {me})
        who = f"task {', '.join(others)} of the cluster" if others else "another task of the cluster"
        return PeerLostError(
            f"{who} stopped answering ({type(err).__name__} in this task, {me or 'a worker'}): check that task's log "
            "for why; then start every task again with the same command, which resumes from the last checkpoint"
        )


def setup_runtime(config: RuntimeConfig, announce: Say = print, cluster: bool = True) -> Runtime:
    """Create the strategy `config.strategy` asks for and set the global precision policy.

    Args:
        announce: told what a long wait (for the cluster's other tasks, a TPU) waits for.
        cluster: False for one-process commands (evaluate), which must not join the
            cluster of a $TF_CONFIG or a Slurm step they happen to run in.
    """
    if config.cpu_replicas > 1:
        split_cpu(config.cpu_replicas)
    strategy, kind, reason = _build_strategy(config, announce, cluster)
    precision, why_precision = _resolve_precision(config.precision, kind)
    keras.mixed_precision.set_global_policy(precision)
    set_op_determinism(config.deterministic)
    jit = _resolve_jit(config.jit_compile, kind, strategy.num_replicas_in_sync, config.deterministic)
    worker_index, num_workers = _worker_position(strategy)
    reason = f"{reason}; precision {precision} ({why_precision}); XLA {'on' if jit else 'off'}"
    return Runtime(strategy, precision, reason, kind, jit, worker_index, num_workers)


def set_op_determinism(enabled: bool) -> None:
    """Turn TensorFlow's op determinism on or off for this process.

    It is process-wide and TensorFlow only offers to turn it on; a second run in the same
    process (a notebook, the tests) that does not ask for it must not inherit it: it slows
    GPUs down and makes XLA refuse max-pool gradients.
    """
    if enabled:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_framework_config  # no public "off" switch

        tf_framework_config.disable_op_determinism()


def split_cpu(replicas: int) -> None:
    """Expose the CPU as `replicas` logical devices (must happen before TensorFlow starts)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        # TensorFlow already started in this process; fine if it has enough CPUs already.
        available = len(tf.config.list_logical_devices("CPU"))
        if available < replicas:
            raise RuntimeSetupError(
                f"runtime.cpu_replicas={replicas} must be set before TensorFlow starts, and this "
                f"process already runs with {available} CPU device(s); start a new process"
            ) from None


_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def cached_strategy(kind: str, devices: tuple[str, ...] = ()) -> tf.distribute.Strategy:
    """One strategy per device set and process.

    Two MirroredStrategy objects over the same devices allocate the same collective
    keys, and their all-reduces then collide ("Shape mismatch in the collective
    instance"); several runs in one process (tests, notebooks) must share one.
    """
    key = (kind, devices)
    if key not in _STRATEGIES:
        if kind == "one_device":
            _STRATEGIES[key] = tf.distribute.OneDeviceStrategy(devices[0])
        else:
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(devices) or None)
    return _STRATEGIES[key]


def _cpu_devices(count: int) -> list[str]:
    return [f"/cpu:{i}" for i in range(count)]


def _build_strategy(config: RuntimeConfig, announce: Say, cluster: bool) -> tuple[tf.distribute.Strategy, str, str]:
    name, cpus = config.strategy, config.cpu_replicas
    if name == "tpu" or (name == "auto" and tpu_is_resolvable(config)):
        return (*connect_tpu(config, announce), f"{name}: TPUStrategy")
    if cluster:
        from_slurm = name in ("auto", "multi_worker") and adopt_slurm_cluster()
        workers = tf_config_workers()
        if name == "multi_worker" or (name == "auto" and workers > 1):
            strategy, kind, reason = _multi_worker(config, workers, name, announce)
            return strategy, kind, reason + (" (cluster from Slurm's srun variables)" if from_slurm else "")
    elif name == "multi_worker":
        name = "auto"  # one process: the same devices as one worker of the run
    num_gpus = len(tf.config.list_physical_devices("GPU"))
    if name == "gpu" and not num_gpus:
        raise RuntimeSetupError(
            "runtime.strategy=gpu but TensorFlow sees no GPU (install the [gpu] extra and check "
            "`launch devices`), or use runtime.strategy=auto"
        )
    if name == "cpu" or (name in ("auto", "mirrored") and not num_gpus):
        if cpus > 1 or name == "mirrored":
            strategy = cached_strategy("mirrored", tuple(_cpu_devices(cpus)))
            return strategy, "cpu", f"{name}: MirroredStrategy over {cpus} logical CPU device(s) (no GPU in use)"
        why = "no GPU found" if name == "auto" else "runtime.strategy=cpu"
        return cached_strategy("one_device", ("/cpu:0",)), "cpu", f"{name}: OneDeviceStrategy on /cpu:0 ({why})"
    if name == "gpu" or (name == "auto" and num_gpus == 1):
        strategy = cached_strategy("one_device", ("/gpu:0",))
        return strategy, "gpu", f"{name}: OneDeviceStrategy on /gpu:0 ({num_gpus} GPU(s) found)"
    return cached_strategy("mirrored"), "gpu", f"{name}: MirroredStrategy over {num_gpus} GPUs"


def _multi_worker(
    config: RuntimeConfig, workers: int, name: str, announce: Say
) -> tuple[tf.distribute.Strategy, str, str]:
    if workers < 1:
        raise RuntimeSetupError(
            "runtime.strategy=multi_worker needs TF_CONFIG describing the cluster (as TFJob and Vertex AI write it) "
            "or a Slurm step (srun -n N); on one machine use `launch train --workers N`, which writes it for each "
            "worker"
        )
    kind = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    implementation = {
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        # NCCL is the fast path between GPUs; gRPC rings work everywhere.
        "auto": tf.distribute.experimental.CommunicationImplementation.NCCL
        if kind == "gpu"
        else tf.distribute.experimental.CommunicationImplementation.RING,
    }[config.collective]
    # Meet the other tasks first: TensorFlow's own wait has no deadline and ignores signals.
    rendezvous.meet(
        rendezvous.Cluster.from_tf_config(checked_tf_config(os.environ["TF_CONFIG"])),
        config.connect_timeout_s,
        announce,
    )
    with _sigterm_kept():
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        )
    return strategy, kind, f"{name}: MultiWorkerMirroredStrategy over {workers} workers ({implementation.name})"


@contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Put SIGTERM's handler back as it was once the block (the strategy's start) is done.

    TensorFlow's coordination service installs a C-level SIGTERM handler when a
    multi-worker strategy starts (the preemption notifier of PreemptionCheckpointHandler,
    which the trainer does not use): it only records the signal, so until StopRequest took
    over at the first step, a SIGTERM was swallowed and the run trained to its end. Put
    back, a SIGTERM during start-up (data, model, restore, the start barrier) ends the
    worker at once, nothing saved, exactly as it ends a single-worker run there; a
    recorded stop could not interrupt the start barrier's wait for a peer.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _worker_position(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 0, 1
    cluster = resolver.cluster_spec().as_dict()
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    # The chief (task "chief", or worker 0 when there is none) is index 0.
    if resolver.task_type == "chief":
        return 0, workers
    offset = 1 if "chief" in cluster else 0
    return resolver.task_id + offset, workers


def _resolve_precision(requested: str, kind: str) -> tuple[str, str]:
    if requested == "mixed_float16" and kind == "cpu":
        # Measured on a 2-core CPU: 21 img/s against 2,000 in mixed_bfloat16 (airbench, smoke config).
        return requested, "runtime.precision; CPUs have no fast float16 kernels: many times slower than float32"
    if requested != "auto":
        return requested, "runtime.precision"
    if kind == "tpu":
        return "mixed_bfloat16", "auto: TPU"
    if kind == "cpu":
        if cpu_has_bfloat16():
            # Not chosen for the user (it changes the numerics; the quickstart's small net even
            # ran 1.5x slower in it), but worth knowing about.
            hint = "runtime.precision=mixed_bfloat16 trains larger nets faster"
            return "float32", f"auto: CPU; it has bfloat16 instructions: {hint}"
        return "float32", "auto: CPU"
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    if capabilities and min(capabilities) >= (7, 0):
        return "mixed_float16", "auto: GPUs with compute capability >= 7.0"
    return "float32", f"auto: GPU compute capability {min(capabilities, default=(0, 0))} < 7.0"


def cpu_has_bfloat16() -> bool:
    """This CPU has native bfloat16 math (AVX512_BF16 or AMX), where mixed_bfloat16 pays off.

    Measured on such a 2-core CPU: 1.3x (airbench) to 1.6x (paper CNN) the float32 speed.
    Elsewhere bfloat16 is emulated and slower than float32. Linux only (/proc/cpuinfo).
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _resolve_jit(requested: str, kind: str, replicas: int, deterministic: bool = False) -> bool:
    if deterministic and requested == "true" and kind != "tpu":
        raise RuntimeSetupError(
            "runtime.jit_compile=true cannot run with runtime.deterministic=true: XLA has no deterministic "
            "max-pool gradient; set runtime.jit_compile=false (or auto) or runtime.deterministic=false"
        )
    if requested == "true" and replicas > 1 and kind != "tpu":
        raise RuntimeSetupError(
            f"runtime.jit_compile=true with {replicas} replicas is not supported: XLA cannot compile the "
            "cross-replica all-reduce of synchronized BatchNorm (a merge_call inside the compiled function), and "
            "on logical CPU devices it cannot reach the other replicas' variables; use runtime.jit_compile=auto "
            "(off for several replicas, as Keras does) or one replica"
        )
    if requested == "auto":
        # Measured on a 2-core CPU: XLA made training 2-3x slower there. Across several
        # GPU replicas Keras itself turns XLA off (cross-replica ops inside compiled
        # clusters); TPUs compile everything anyway. Under op determinism XLA refuses
        # max-pool gradients, so deterministic runs stay on plain graphs.
        return kind == "tpu" or (kind == "gpu" and replicas == 1 and not deterministic)
    return requested == "true"


def describe_devices(config: RuntimeConfig | None = None, announce: Say = print) -> dict:
    """What TensorFlow sees and what `auto` (or `config`) would choose: `launch devices`."""
    runtime = setup_runtime(config or RuntimeConfig(), announce)
    devices = []
    for device in tf.config.list_physical_devices():
        details = _details(device)
        devices.append({"name": device.name, "type": device.device_type, **{k: str(v) for k, v in details.items()}})
    return {"devices": devices, **_report(runtime)}


def _report(runtime: Runtime) -> dict:
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "strategy": type(runtime.strategy).__name__,
        "replicas": runtime.num_replicas,
        "workers": runtime.num_workers,
        "precision": runtime.precision,
        "jit_compile": runtime.jit_compile,
        "reason": runtime.reason,
    }


def _details(device) -> dict:
    return tf.config.experimental.get_device_details(device) if device.device_type == "GPU" else {}


def environment(runtime: Runtime) -> dict[str, str]:
    """What a run ran on, for TensorBoard's text tab: `describe_devices`, as text."""
    report = _report(runtime)
    return {
        "TensorFlow": report["tensorflow"],
        "Keras": report["keras"],
        "devices": ", ".join(d.name for d in tf.config.list_logical_devices()) or "none",
        "strategy": report["strategy"],
        "replicas": str(report["replicas"]),
        "workers": str(report["workers"]),
        "precision": report["precision"],
        "XLA": str(report["jit_compile"]),
        "why": report["reason"],
    }


def accelerator_names(runtime: Runtime) -> list[str]:
    """Names of this worker's GPUs in use (as many as its replicas), for MFU peaks."""
    if runtime.device_kind != "gpu":
        return []
    names = [_details(gpu).get("device_name", "") for gpu in tf.config.list_physical_devices("GPU")]
    return names[: runtime.local_replicas]
