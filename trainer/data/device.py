"""Training batches made on the accelerator (`data.placement=device`, airbench's way).

The whole training set sits on every replica's device once; each step gathers its
slice of the global batch there and crops and flips it there, inside the compiled call.
Per step only the batch's indices and augmentation draws (a few KB) go to the device,
and nothing waits for a host thread: with a fast accelerator, a host tf.data pipeline
can become the bottleneck (airbench94 keeps CIFAR-10 on the GPU for this reason).

The batches are exactly those of the host pipeline (`pipeline.train_dataset_fn`) for the
same (seed, step): the same epoch order and per-example crops and flips, here computed
once per epoch on the host rather than once per batch. So a run resumes exactly whichever
placement it used before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from trainer.data.augment import apply_augmentation, augmentation_draws
from trainer.data.plan import InputSpec, epoch_permutation, steps_per_epoch
from trainer.data.splits import Examples, Split
from trainer.errors import ConfigError

# Kept as float16: exact for pixel values 0-255 (and 0-2048), and every accelerator has
# gather/pad/reverse kernels for it, which is not true of uint8 on every GPU build.
DEVICE_DTYPE = np.float16
# `auto` keeps a training set on the device up to this size per replica.
AUTO_LIMIT_BYTES = 2 * 1024**3


def resolve_placement(placement: str, device_kind: str, split: Examples, spec: InputSpec) -> str:
    """`data.placement` -> "host" or "device" for this run.

    auto: device on GPUs (when the set is in memory, fits comfortably and uses the pad
    recipe), host elsewhere: a CPU gains nothing from it, and TPUs want their input from a
    host pipeline.
    """
    if spec.service:  # a tf.data service makes host-pipeline batches (rules refuse placement=device)
        return "host"
    images = split.images if isinstance(split, Split) else None
    if placement == "device" and (images is None or spec.crop != "pad"):
        raise ConfigError(
            "data.placement=device needs the training images in memory and data.crop=pad; "
            "set data.cache=memory and data.crop=pad, or use data.placement=host"
        )
    if images is None or spec.crop != "pad":
        return "host"
    if placement == "device" and device_kind == "tpu":
        raise ConfigError(
            "data.placement=device is not supported on TPUs (TPUStrategy feeds from the host); "
            "use data.placement=host or auto"
        )
    if placement != "auto":
        return placement
    fits = images.size * np.dtype(DEVICE_DTYPE).itemsize <= AUTO_LIMIT_BYTES
    return "device" if device_kind == "gpu" and fits else "host"


def _on_every_replica(strategy: tf.distribute.Strategy, array: np.ndarray):
    """One copy of `array` on each local replica's device (a PerReplica value)."""
    devices = strategy.extended.worker_devices

    def value_fn(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        # Replica ids are global under MultiWorkerMirroredStrategy; this worker's come in order.
        with tf.device(devices[context.replica_id_in_sync_group % len(devices)]):
            return tf.identity(array)

    return strategy.experimental_distribute_values_from_function(value_fn)


class DeviceFeed:
    """The training set on the replicas' devices and the per-epoch plan that indexes it.

    Use: `plan(step)` on the host before each compiled call (a call never crosses an
    epoch's end), then `run(strategy, step_fn, plan, steps_done)` inside it in place of
    `strategy.run(step_fn, args=next(iterator))`.
    """

    def __init__(self, strategy: tf.distribute.Strategy, images: np.ndarray, labels: np.ndarray, spec: InputSpec):
        self.spec, self.num_examples = spec, len(labels)
        self.per_epoch = steps_per_epoch(self.num_examples, spec.global_batch)
        self.per_replica = spec.global_batch // strategy.num_replicas_in_sync
        self.images = _on_every_replica(strategy, images.astype(DEVICE_DTYPE))
        self.labels = _on_every_replica(strategy, labels.astype(np.int32))
        self.bytes_per_replica = images.size * np.dtype(DEVICE_DTYPE).itemsize
        self._epoch: int | None = None
        self._plan: dict[str, tf.Tensor] = {}

    def plan(self, step: int) -> dict[str, tf.Tensor]:
        """The compiled call's argument for a call starting at global step `step`."""
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            self._plan, self._epoch = self._epoch_plan(epoch), epoch
        return {**self._plan, "first": tf.constant(step % self.per_epoch, tf.int32)}

    def _epoch_plan(self, epoch: int) -> dict[str, tf.Tensor]:
        """Epoch `epoch`'s batches as [steps, global batch] tables of indices and draws."""
        spec, shape = self.spec, [self.per_epoch, self.spec.global_batch]
        with tf.device("/cpu:0"):
            epoch_t = tf.constant(epoch, tf.int64)
            order = epoch_permutation(self.num_examples, spec.seed, epoch_t)[: self.per_epoch * spec.global_batch]
            plan = {"indices": tf.reshape(order, shape)}
            if spec.augment:
                offset_y, offset_x, flipped = augmentation_draws(order, epoch_t, spec)
                plan.update(
                    offset_y=tf.reshape(offset_y, shape),
                    offset_x=tf.reshape(offset_x, shape),
                    flipped=tf.reshape(flipped, shape),
                )
        return plan

    def run(self, strategy: tf.distribute.Strategy, step_fn: Callable, plan: dict[str, tf.Tensor], steps_done):
        """`strategy.run(step_fn, args=(images, labels))` on this step's batch, made on each replica."""
        position = plan["first"] + tf.cast(steps_done, tf.int32)
        row = {name: table[position] for name, table in plan.items() if name != "first"}

        def replica_step(images: tf.Tensor, labels: tf.Tensor):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            start = tf.cast(replica, tf.int32) * self.per_replica
            mine = {name: values[start : start + self.per_replica] for name, values in row.items()}
            batch = tf.gather(images, mine["indices"])
            if self.spec.augment:
                batch = apply_augmentation(batch, mine["offset_y"], mine["offset_x"], mine["flipped"], self.spec)
            batch = tf.ensure_shape(batch, [self.per_replica, *images.shape[1:]])
            return step_fn(batch, tf.gather(labels, mine["indices"]))

        return strategy.run(replica_step, args=(self.images, self.labels))
