"""The training loop's parts (trainer.loop) and the bugs found in it (#13), one test each."""

from __future__ import annotations

import os
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.cli import cli
from tests.conftest import REPO, launch_train, smoke_config, tiny_loop
from trainer.checkpoints import checkpoint_steps
from trainer.config import OptimizerConfig
from trainer.errors import DivergedError
from trainer.flops import peak_flops
from trainer.loop.step import StepOptions, Votes, make_train_loop
from trainer.optim import build_optimizer
from trainer.runtime import Runtime, accelerator_names, cached_strategy
from trainer.sums import NUM_SUMS, StepSums
from trainer.training import train

SMOKE = str(REPO / "configs" / "smoke.yaml")


def quiet(_line: str) -> None:
    pass


def _batches(steps: int, poisoned: list[int], batch: int = 8) -> np.ndarray:
    batches = np.random.default_rng(0).uniform(0, 255, (steps, batch, 32, 32, 3)).astype(np.float32)
    for step in poisoned:
        batches[step, 0, 0, 0, 0] = np.inf
    return batches


class StepRecorder:
    """Stands in for the lookahead: records the step it is called with."""

    def __init__(self) -> None:
        self.seen = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def after_step(self, step) -> None:
        self.seen.assign(tf.cast(step, tf.int64))


# --- bug 1: lookahead follows the global step, not optimizer.iterations --------------------


def test_lookahead_gets_the_global_step_even_when_steps_are_skipped():
    strategy = cached_strategy("one_device", ("/cpu:0",))
    recorder = StepRecorder()
    _, optimizer, loop, iterator = tiny_loop(
        strategy,
        _batches(3, poisoned=[1]),
        np.zeros((3, 8), np.int32),
        optimizer_options={"skip_nonfinite": True},
        stop_on_nonfinite=False,
        lookahead=recorder,
    )
    loop(iterator, tf.constant(3), tf.zeros([NUM_SUMS]), first_step=40)
    assert int(optimizer.iterations.numpy()) == 2  # the skipped step did not count...
    assert int(recorder.seen.numpy()) == 43  # ...but the lookahead's schedule did


# --- bug 2: skipped steps must not shrink later updates ------------------------------------


def test_many_skipped_steps_leave_later_updates_untouched():
    strategy = cached_strategy("one_device", ("/cpu:0",))
    skips = 150  # each skip used to halve the scale: 2**-150 is 0 in float32
    labels = np.zeros((skips + 1, 8), np.int32)
    model, optimizer, loop, iterator = tiny_loop(
        strategy,
        _batches(skips + 1, poisoned=list(range(skips))),
        labels,
        optimizer_options={"skip_nonfinite": True},
        stop_on_nonfinite=False,
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    sums, steps, _ = loop(iterator, tf.constant(skips), tf.zeros([NUM_SUMS]))
    assert int(steps) == skips and StepSums.of(sums).nonfinite == skips
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
    assert float(optimizer.dynamic_scale.numpy()) == 1.0
    loop(iterator, tf.constant(1), tf.zeros([NUM_SUMS]))  # one clean step
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 1e-4


# --- bug 3: timed checkpoints are agreed by every worker -----------------------------------


def test_timed_checkpoints_with_two_workers_are_taken_together(tmp_path):
    # every call end (every 4 steps) is past the chief's 0.6 ms: saves there, not only at epoch ends
    overrides = ("train.max_steps=24", "train.steps_per_loop=4", "checkpoint.every_minutes=0.00001")
    process = launch_train(tmp_path, *overrides, "checkpoint.keep=10", workers=2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert checkpoint_steps(tmp_path / "checkpoints") == [24, 20, 16, 12, 8, 4]


# --- bug 4: MFU counts this worker's devices, names matched as words -----------------------


def test_accelerators_are_this_workers_and_names_match_whole_words(monkeypatch):
    gpus = [SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda d: {"device_name": "NVIDIA H100"})
    two_workers = Runtime(SimpleNamespace(num_replicas_in_sync=2), "mixed_bfloat16", "", "gpu", num_workers=2)
    names = accelerator_names(two_workers)
    assert names == ["NVIDIA H100"]  # one local GPU, although the job has 2 replicas
    assert peak_flops(names * two_workers.num_workers, "mixed_bfloat16") == pytest.approx(2 * 989e12)
    assert peak_flops(["NVIDIA L40S"], "mixed_float16") is None  # not an L4
    assert peak_flops(["NVIDIA L4"], "mixed_float16") == pytest.approx(121e12)
    assert peak_flops(["NVIDIA A100-SXM4-40GB"], "mixed_float16") == pytest.approx(312e12)
    assert peak_flops(["NVIDIA A10"], "mixed_float16") == pytest.approx(125e12)


# --- bug 5: a --workers run resumes and evaluates like any other ---------------------------


def test_a_workers_run_names_its_own_resume_command_and_evaluates(tmp_path):
    workdir = tmp_path / "run with space"
    os.environ["TRAINER_STOP_AT_STEP"] = "5"  # both workers vote to stop before step 5
    try:
        process = launch_train(workdir, "train.max_steps=16", "train.steps_per_loop=4", workers=2)
        output, _ = process.communicate(timeout=300)
    finally:
        del os.environ["TRAINER_STOP_AT_STEP"]
    assert process.returncode == 75, output
    line = next(line for line in output.splitlines() if line.startswith("[worker 0] Stopped by"))
    assert "at step 5 of 16" in line
    expected = f"--workdir '{workdir}' --set train.max_steps=16 --set train.steps_per_loop=4 --workers 2"
    assert f"resume with: launch train --config {SMOKE} {expected}" in line
    assert "runtime.strategy=multi_worker" not in line
    result = CliRunner().invoke(cli, ["evaluate", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "(256 images, step 5)" in result.output


# --- bug 6: XLA with several replicas ------------------------------------------------------


def test_xla_with_several_replicas_is_refused_with_one_line(tmp_path):
    args = ["train", "--config", SMOKE, "--workdir", str(tmp_path / "run")]
    args += ["--set", "runtime.cpu_replicas=2", "--set", "runtime.jit_compile=true"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert "runtime.jit_compile=true with 2 replicas is not supported" in result.output
    assert not (tmp_path / "run").exists()


# --- bug 7: a diverged run still closes TensorBoard ----------------------------------------


def test_a_diverged_run_stops_the_profiler_and_flushes_its_logs(tmp_path):
    overrides = ("optimizer.learning_rate=1e12", "train.max_steps=40", "tensorboard.profile_steps=0:30")
    with pytest.raises(DivergedError):
        train(smoke_config(*overrides), tmp_path, echo=quiet)
    # The monitor was closed: its profiler no longer runs (a later run could not start one)...
    with pytest.raises(tf.errors.UnavailableError):
        tf.profiler.experimental.stop()
    # ...and what was logged is on disk.
    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    events.Reload()
    assert {"config", "environment"} <= set(events.Tags()["tensors"])


# --- bug 8: the gradient norm does not depend on the replica count --------------------------


def test_gradient_norm_is_the_global_gradients_on_one_and_two_replicas():
    batches = _batches(2, poisoned=[], batch=8)
    labels = np.random.default_rng(1).integers(0, 10, (2, 8)).astype(np.int32)
    norms = []
    for strategy in (
        cached_strategy("one_device", ("/cpu:0",)),
        cached_strategy("mirrored", ("/cpu:0", "/cpu:1")),
    ):
        keras.utils.set_random_seed(3)
        _, _, loop, iterator = tiny_loop(strategy, batches, labels, model_name="resnet_small")
        sums, _, _ = loop(iterator, tf.constant(1), tf.zeros([NUM_SUMS]))
        norms.append(StepSums.of(sums).gradient_norm)
    assert norms[0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)


# --- #28: gradient accumulation (optimizer.gradient_accumulation_steps) --------------------


def _small_model() -> keras.Model:
    """No BatchNorm or Dropout: a micro-batch's gradient is its own examples' alone."""
    keras.utils.set_random_seed(5)
    layers = keras.layers
    return keras.Sequential(
        [keras.Input((8, 8, 3)), layers.Rescaling(1 / 255), layers.Conv2D(4, 3, activation="relu")]
        + [layers.Flatten(), layers.Dense(10)]
    )


def _one_update(strategy, images, labels, accumulation_steps: int):
    """Weights and StepSums after one update of the global batch `images`, the optimizer ours."""
    with strategy.scope():
        model = _small_model()
        optimizer = build_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant"), 10, 10)
        optimizer.build(model.trainable_variables)
    batches = tf.data.Dataset.from_tensor_slices((images[None], labels[None]))
    options = StepOptions(global_batch=len(labels), num_classes=10, accumulation_steps=accumulation_steps)
    loop = make_train_loop(strategy, model, optimizer, Votes.create(), options)
    sums, steps, _, _ = loop(
        iter(strategy.experimental_distribute_dataset(batches)),
        tf.constant(0, tf.int64),
        tf.constant(1),
        tf.zeros([NUM_SUMS]),
        tf.constant(-1, tf.int64),
    )
    assert int(steps) == 1 and int(optimizer.iterations.numpy()) == 1  # one update, not four
    return [v.numpy() for v in model.trainable_variables], StepSums.of(sums)


@pytest.mark.parametrize("replicas", [1, 2])
def test_accumulating_four_micro_batches_of_32_is_one_step_of_128(replicas):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, 128).astype(np.int32)
    start = [v.numpy() for v in _small_model().trainable_variables]
    one_step, one_sums = _one_update(cached_strategy("one_device", ("/cpu:0",)), images, labels, 1)
    devices = ("/cpu:0",) if replicas == 1 else ("/cpu:0", "/cpu:1")
    strategy = cached_strategy("one_device" if replicas == 1 else "mirrored", devices)
    # 2 replicas: each cuts its 64 examples into 4 micro-batches of 16, so an update still
    # sums 4 micro-batches of 32 examples of the global batch.
    accumulated, sums = _one_update(strategy, images, labels, 4)
    assert sums.examples == one_sums.examples == 128 and sums.correct == one_sums.correct
    assert sums.loss == pytest.approx(one_sums.loss, rel=1e-6)
    assert sums.gradient_norm == pytest.approx(one_sums.gradient_norm, rel=1e-5)
    # The update moves the weights by far more than the tolerance (0.02, measured)...
    assert max(float(np.abs(a - b).max()) for a, b in zip(one_step, start)) > 0.01
    # ...which is float rounding of sums taken in another order: measured 3.0e-8 apart at
    # most, on 1 and on 2 replicas (weights up to 0.3).
    for expected, actual in zip(one_step, accumulated):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
