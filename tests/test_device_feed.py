"""data.placement=device: batches made on the replicas' devices equal the host pipeline's."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import smoke_config
from trainer.data.device import DeviceFeed, resolve_placement
from trainer.data.pipeline import train_dataset_fn
from trainer.data.plan import InputSpec, steps_per_epoch
from trainer.data.splits import Split
from trainer.errors import ConfigError
from trainer.runtime import cached_strategy
from trainer.training import train

N = 40
IMAGES = np.arange(N * 8 * 8 * 3, dtype=np.int64).reshape(N, 8, 8, 3).__mod__(251).astype(np.uint8)
LABELS = np.arange(N, dtype=np.int32)  # label == index


def _strategy(replicas):
    return cached_strategy("mirrored", tuple(f"/cpu:{i}" for i in range(replicas)))


def _local(strategy, value):
    return np.concatenate([t.numpy() for t in strategy.experimental_local_results(value)])


def _host_stream(replicas, spec, start, total):
    strategy = _strategy(replicas)
    dataset = strategy.distribute_datasets_from_function(train_dataset_fn(Split(IMAGES, LABELS), spec, start, total))
    return [(_local(strategy, labels), _local(strategy, images)) for images, labels in dataset]


def _device_stream(replicas, spec, start, total):
    strategy = _strategy(replicas)
    feed = DeviceFeed(strategy, IMAGES, LABELS, spec)

    @tf.function
    def batch(plan):
        return feed.run(strategy, lambda images, labels: (images, labels), plan, tf.constant(0))

    steps = []
    for step in range(start, total):
        images, labels = batch(feed.plan(step))
        steps.append((_local(strategy, labels), _local(strategy, images)))
    return steps


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(global_batch=8, seed=3),
        InputSpec(global_batch=8, seed=3, augment=True, crop_padding=2),
        InputSpec(global_batch=8, seed=4, augment=True, crop_padding=2, pad_mode="reflect", flip="alternating"),
    ],
    ids=["plain", "crop_flip", "reflect_alternating"],
)
def test_device_batches_equal_the_host_pipelines(replicas, spec):
    start, total = 3, 2 * steps_per_epoch(N, spec.global_batch) + 2  # from mid-epoch, across two epoch ends
    host = _host_stream(replicas, spec, start, total)
    device = _device_stream(replicas, spec, start, total)
    assert len(host) == len(device) == total - start
    for (host_labels, host_images), (device_labels, device_images) in zip(host, device, strict=True):
        np.testing.assert_array_equal(device_labels, host_labels)
        assert device_images.dtype == np.float16  # exact for 0-255
        np.testing.assert_array_equal(device_images.astype(np.uint8), host_images)


def test_each_replica_holds_its_own_copy_of_the_training_set():
    strategy = _strategy(2)
    feed = DeviceFeed(strategy, IMAGES, LABELS, InputSpec(global_batch=8, seed=0))
    copies = strategy.experimental_local_results(feed.images)
    assert [copy.device.split(":")[-1] for copy in copies] == ["0", "1"]
    assert feed.bytes_per_replica == IMAGES.size * 2


def test_placement_auto_is_device_on_gpus_only():
    split, spec = Split(IMAGES, LABELS), InputSpec(global_batch=8, seed=0)
    assert resolve_placement("auto", "gpu", split, spec) == "device"
    assert resolve_placement("auto", "cpu", split, spec) == "host"
    assert resolve_placement("auto", "tpu", split, spec) == "host"
    assert resolve_placement("device", "cpu", split, spec) == "device"
    assert resolve_placement("host", "gpu", split, spec) == "host"
    huge = np.lib.stride_tricks.as_strided(IMAGES, shape=(2**30, 3), strides=(0, 1))  # 6 GiB as float16, no memory
    assert resolve_placement("auto", "gpu", Split(huge, LABELS), spec) == "host"


def test_placement_device_on_tpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="data.placement=device is not supported on TPUs.*data.placement=host"):
        resolve_placement("device", "tpu", Split(IMAGES, LABELS), InputSpec(global_batch=8, seed=0))


def test_unknown_placement_is_rejected():
    with pytest.raises(ConfigError, match="data.placement must be one of auto, host, device"):
        smoke_config("data.placement=gpu")


def _checkpointed(workdir):
    """Every value in the run's latest checkpoint: weights, optimizer slots, step, RNG states."""
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints"))
    bookkeeping = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    names = [name for name in reader.get_variable_to_shape_map() if name not in bookkeeping]
    return {name: reader.get_tensor(name) for name in names}


def test_training_on_the_device_matches_the_host_pipeline_and_resumes_across_them(tmp_path):
    overrides = ("runtime.deterministic=true", "runtime.cpu_replicas=2", "train.epochs=2")
    lines: list[str] = []
    host = train(smoke_config(*overrides, "data.placement=host"), tmp_path / "host", echo=lambda _: None)
    device = train(smoke_config(*overrides, "data.placement=device"), tmp_path / "device", echo=lines.append)
    assert any(line.startswith("Input: the training set is kept on each replica's device") for line in lines)
    assert device.step == host.step == 32
    assert device.final_eval.loss == host.final_eval.loss
    assert device.final_eval.accuracy == host.final_eval.accuracy
    host_values, device_values = _checkpointed(tmp_path / "host"), _checkpointed(tmp_path / "device")
    assert host_values.keys() == device_values.keys()
    for name, value in host_values.items():
        np.testing.assert_array_equal(device_values[name], value, err_msg=name)
    # Interrupted on the host pipeline at step 12, finished on the device: the same run.
    train(
        smoke_config(*overrides, "data.placement=host", "train.max_steps=12"), tmp_path / "mixed", echo=lambda _: None
    )
    mixed = train(smoke_config(*overrides, "data.placement=device"), tmp_path / "mixed", echo=lambda _: None)
    assert mixed.step == 32
    assert mixed.final_eval.loss == host.final_eval.loss
    mixed_values = _checkpointed(tmp_path / "mixed")
    for name, value in host_values.items():
        np.testing.assert_array_equal(mixed_values[name], value, err_msg=name)
