"""Devices, strategy and precision: one factory turns `runtime.*` into a ready Runtime.

The rest of the code only sees a `tf.distribute.Strategy`; one replica or eight run
the same path. `describe_devices` shows what `auto` would pick and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from trainer.config import RuntimeConfig
from trainer.errors import RuntimeSetupError


@dataclass
class Runtime:
    strategy: tf.distribute.Strategy
    precision: str
    reason: str  # why this strategy/precision, for the console and logs

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def loss_scaling(self) -> bool:
        """float16 gradients underflow without dynamic loss scaling; bfloat16 do not."""
        return self.precision == "mixed_float16"


def quiet_tensorflow(verbose: bool = False) -> None:
    """Hide TensorFlow's start-up notices (oneDNN, CUDA probing) unless asked for.

    Environment variables only take effect before TensorFlow is imported, so the CLI
    calls this first thing.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


def setup_runtime(config: RuntimeConfig) -> Runtime:
    """Create the strategy `config.strategy` asks for and set the global precision policy."""
    if config.cpu_replicas > 1:
        split_cpu(config.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    strategy, reason = _build_strategy(config, len(gpus))
    uses_gpu = config.strategy == "gpu" or (config.strategy in ("auto", "mirrored") and gpus)
    precision, why_precision = _resolve_precision(config.precision, uses_gpu)
    keras.mixed_precision.set_global_policy(precision)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    return Runtime(strategy, precision, f"{reason}; precision {precision} ({why_precision})")


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


def _cpu_devices(count: int) -> list[str]:
    return [f"/cpu:{i}" for i in range(count)]


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


def _build_strategy(config: RuntimeConfig, num_gpus: int) -> tuple[tf.distribute.Strategy, str]:
    name, cpus = config.strategy, config.cpu_replicas
    if name == "gpu" and not num_gpus:
        raise RuntimeSetupError(
            "runtime.strategy=gpu but TensorFlow sees no GPU (install the [gpu] extra and check "
            "`launch devices`), or use runtime.strategy=auto"
        )
    if name == "cpu" or (name == "auto" and not num_gpus):
        if cpus > 1:
            return cached_strategy("mirrored", tuple(_cpu_devices(cpus))), (
                f"{name}: MirroredStrategy over {cpus} logical CPU devices (runtime.cpu_replicas={cpus})"
            )
        why = "no GPU found" if name == "auto" else "runtime.strategy=cpu"
        return cached_strategy("one_device", ("/cpu:0",)), f"{name}: OneDeviceStrategy on /cpu:0 ({why})"
    if name == "gpu" or (name == "auto" and num_gpus == 1):
        return cached_strategy("one_device", ("/gpu:0",)), f"{name}: OneDeviceStrategy on /gpu:0 ({num_gpus} GPU found)"
    if name == "mirrored" and not num_gpus:
        return cached_strategy("mirrored", tuple(_cpu_devices(cpus))), (
            f"mirrored: MirroredStrategy over {cpus} logical CPU device(s) (no GPU found)"
        )
    return cached_strategy("mirrored"), f"{name}: MirroredStrategy over {num_gpus} GPUs"


def _resolve_precision(requested: str, uses_gpu: bool) -> tuple[str, str]:
    if requested != "auto":
        return requested, "runtime.precision"
    if not uses_gpu:
        return "float32", "auto: CPU"
    capabilities = [
        tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    if capabilities and min(capabilities) >= (7, 0):
        return "mixed_float16", "auto: GPUs with compute capability >= 7.0"
    return "float32", f"auto: GPU compute capability {min(capabilities, default=(0, 0))} < 7.0"


def describe_devices(config: RuntimeConfig | None = None) -> dict:
    """What TensorFlow sees and what `auto` (or `config`) would choose: `launch devices`."""
    config = config or RuntimeConfig()
    runtime = setup_runtime(config)
    devices = []
    for device in tf.config.list_physical_devices():
        details = tf.config.experimental.get_device_details(device) if device.device_type == "GPU" else {}
        devices.append({"name": device.name, "type": device.device_type, **{k: str(v) for k, v in details.items()}})
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "devices": devices,
        "strategy": type(runtime.strategy).__name__,
        "replicas": runtime.num_replicas,
        "precision": runtime.precision,
        "reason": runtime.reason,
    }
