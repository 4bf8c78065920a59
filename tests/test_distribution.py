"""Distribution: multi-worker sharding and equivalence, the local launcher, XLA, TPU errors, precision."""

import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import EQUIVALENCE_RUN, REPO, launch_tasks, launch_train, smoke_config, tiny_loop
from trainer.checkpoints import checkpoint_steps
from trainer.config import RuntimeConfig
from trainer.data.pipeline import eval_dataset_fn, train_dataset_fn
from trainer.data.plan import InputSpec
from trainer.data.splits import Split
from trainer.errors import RuntimeSetupError
from trainer.launcher import run_local_workers
from trainer.runtime import _resolve_jit, cached_strategy, setup_runtime
from trainer.sums import NUM_SUMS
from trainer.training import train

SMOKE = str(REPO / "configs" / "smoke.yaml")
N = 48
IMAGES = np.zeros((N, 4, 4, 3), np.uint8)
LABELS = np.arange(N, dtype=np.int32)


def _pipeline_elements(dataset_fn, workers: int, replicas_per_worker: int):
    """What each worker's input pipeline yields, as lists of label arrays."""
    per_worker = []
    for worker in range(workers):
        context = tf.distribute.InputContext(workers, worker, workers * replicas_per_worker)
        per_worker.append([element[1].numpy() for element in dataset_fn(context)])
    return per_worker


@pytest.mark.parametrize(("workers", "replicas_per_worker"), [(2, 1), (2, 2), (3, 2)])
def test_each_training_example_is_used_once_per_epoch_across_all_workers(workers, replicas_per_worker):
    spec = InputSpec(global_batch=12, seed=3)
    per_epoch = N // 12
    elements = _pipeline_elements(
        train_dataset_fn(Split(IMAGES, LABELS), spec, 0, 2 * per_epoch), workers, replicas_per_worker
    )
    for epoch in range(2):
        seen = np.concatenate(
            [
                slice_
                for worker in elements
                for slice_ in worker[
                    epoch * per_epoch * replicas_per_worker : (epoch + 1) * per_epoch * replicas_per_worker
                ]
            ]
        )
        assert sorted(seen.tolist()) == list(range(N))
    # Same global batches as a single replica: the worker slices concatenate to them.
    single = _pipeline_elements(train_dataset_fn(Split(IMAGES, LABELS), spec, 0, 2 * per_epoch), 1, 1)[0]
    for step, batch in enumerate(single):
        pieces = [worker[step * replicas_per_worker + r] for worker in elements for r in range(replicas_per_worker)]
        np.testing.assert_array_equal(np.concatenate(pieces), batch)


def test_eval_shards_cover_the_test_set_once_across_workers():
    elements = []
    for worker in range(2):
        context = tf.distribute.InputContext(2, worker, 2)
        for _, labels, mask in eval_dataset_fn(Split(IMAGES[:37], LABELS[:37]), 8)(context):
            elements += labels.numpy()[mask.numpy() > 0].tolist()
    assert sorted(elements) == list(range(37))


def _weights(checkpoint_dir, step):
    """Every model variable in a checkpoint: the trainable ones are saved under the optimizer
    (the first object that tracks them), BatchNorm's moving statistics under the model."""
    reader = tf.train.load_checkpoint(str(checkpoint_dir / f"ckpt-{step}"))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith(("model/", "optimizer/_trainable_variables/"))
    }


def _train_on_one_and_two_replicas(tmp_path, overrides):
    """Final (step 8) weights of the same run on 1 and on 2 replicas in this process."""
    train(smoke_config(*overrides), tmp_path / "one", echo=lambda _: None)
    train(smoke_config(*overrides, "runtime.cpu_replicas=2"), tmp_path / "two", echo=lambda _: None)
    return _weights(tmp_path / "one" / "checkpoints", 8), _weights(tmp_path / "two" / "checkpoints", 8)


def test_two_replicas_and_two_workers_train_the_same_weights(tmp_path, two_worker_run):
    # resnet_small: synchronized BatchNorm and no Dropout, so the maths does not depend
    # on how the global batch is split (Dropout masks are drawn per replica). 1 replica vs
    # 2 is compared with smooth pooling below: max pooling's near-ties turn float rounding
    # into other gradients there, but not here (2 replicas in one process or two, bit for bit).
    overrides = (*EQUIVALENCE_RUN, "data.augment=false", "checkpoint.every_steps=4")
    train(smoke_config(*overrides, "runtime.cpu_replicas=2"), tmp_path / "two", echo=lambda _: None)
    two = _weights(tmp_path / "two" / "checkpoints", 8)
    workers_dir, output = two_worker_run  # launch train --workers 2, the same run saved every 8 steps
    assert "[worker 0] Strategy: multi_worker: MultiWorkerMirroredStrategy over 2 workers" in output
    assert "listen on ports" in output and "without authentication" in output  # the exposure is stated
    assert "[worker 1] Done" not in output  # only the chief reports

    workers = _weights(workers_dir / "checkpoints", 8)
    trainable = [name for name in two if name.startswith("optimizer/_trainable_variables/")]
    assert two.keys() == workers.keys() and len(trainable) == 26
    # 2 replicas in one process and 2 worker processes: the same computation.
    for name, value in two.items():
        np.testing.assert_allclose(workers[name], value, rtol=0, atol=1e-6, err_msg=name)
    # ...while 4 steps of training move the weights by far more (0.1 measured).
    halfway = _weights(tmp_path / "two" / "checkpoints", 4)
    assert max(np.abs(two[name] - halfway[name]).max() for name in trainable) > 0.01
    # Only the chief wrote the workdir: one event file per run folder, no scratch left.
    assert len(list((workers_dir / "tensorboard" / "train").iterdir())) == 1
    assert not (workers_dir / ".worker-temp").exists()


@pytest.mark.slow  # one worker with the training set on its devices is in test_device_feed.py
def test_two_workers_with_the_training_set_on_their_devices_train_the_same_weights(tmp_path, two_worker_run):
    overrides = (*EQUIVALENCE_RUN, "data.augment=false", "data.placement=device")
    process = launch_train(tmp_path / "device", *overrides, workers=2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "[worker 0] Input: the training set is kept on each replica's device" in output
    on_host = _weights(two_worker_run[0] / "checkpoints", 8)
    on_device = _weights(tmp_path / "device" / "checkpoints", 8)
    assert on_host.keys() == on_device.keys()
    for name, value in on_host.items():
        np.testing.assert_allclose(on_device[name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("augment", ["false", "true"])
def test_one_and_two_replicas_agree_when_pooling_is_smooth(tmp_path, monkeypatch, augment):
    # Max pooling meets near-ties (and flat padded borders with crops); the rounding
    # difference between a 1x32 and a 2x16 BatchNorm reduction flips some argmaxes and so
    # routes gradients elsewhere (measured up to 1.7e-2 apart after 8 steps, depending on
    # which batches come first). With the pools made smooth, 1 and 2 replicas train the same
    # weights up to float rounding amplified over 8 steps.
    monkeypatch.setattr(keras.layers, "MaxPooling2D", keras.layers.AveragePooling2D)
    monkeypatch.setattr(keras.layers, "GlobalMaxPooling2D", keras.layers.GlobalAveragePooling2D)
    one, two = _train_on_one_and_two_replicas(
        tmp_path, (*EQUIVALENCE_RUN, f"data.augment={augment}", "data.crop_padding=4")
    )
    assert one.keys() == two.keys() and len(one) > 26
    # Measured maxima on the AMD EPYC host: 2.05e-3 with crops (one value of 1,152).
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=4e-3, err_msg=name)


def test_gradient_accumulation_trains_alike_on_one_and_two_replicas(tmp_path, monkeypatch):
    # Micro-batch i is the global batch's rows i, i+k, ... on any number of replicas, so
    # synchronized BatchNorm normalises each micro-batch over the same examples on 1 and
    # on 2 replicas: the same weights up to float rounding, as without accumulation above.
    monkeypatch.setattr(keras.layers, "MaxPooling2D", keras.layers.AveragePooling2D)
    monkeypatch.setattr(keras.layers, "GlobalMaxPooling2D", keras.layers.GlobalAveragePooling2D)
    overrides = (*EQUIVALENCE_RUN, "data.augment=false", "optimizer.gradient_accumulation_steps=4")
    one, two = _train_on_one_and_two_replicas(tmp_path, overrides)
    assert one.keys() == two.keys() and len(one) > 26
    # Measured after 8 steps (augmentation off), at most: 9.7e-5 (Intel, AVX-512), 1.1e-4 (AMD
    # EPYC, AVX2 kernels), 1.9e-3 (the same AMD with oneDNN's AVX-512 kernels, in a BatchNorm
    # moving mean): the sibling test's bound above.
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=4e-3, err_msg=name)
    # The key reached the step: BatchNorm over micro-batches of 8 trains other weights
    # (0.46 apart measured, far beyond the rounding above).
    train(smoke_config(*EQUIVALENCE_RUN, "data.augment=false"), tmp_path / "plain", echo=lambda _: None)
    plain = _weights(tmp_path / "plain" / "checkpoints", 8)
    assert max(np.abs(plain[name] - one[name]).max() for name in one) > 0.1


def _fake_worker(script: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script)]


def test_launcher_prefixes_output_and_returns_the_chief_exit_code():
    lines: list[str] = []
    code = run_local_workers(
        _fake_worker("""
            import json, os
            index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
            print("hello from", index, len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]))
        """),
        3,
        echo=lines.append,
    )
    assert code == 0
    note = next(line for line in lines if line.startswith("Note: the workers' TensorFlow servers listen on ports"))
    assert "without authentication" in note and "firewall" in note
    assert sorted(line for line in lines if line != note) == [f"[worker {i}] hello from {i} 3" for i in range(3)]


def test_launcher_stops_everyone_when_one_worker_fails():
    lines: list[str] = []
    started = __import__("time").monotonic()
    code = run_local_workers(
        _fake_worker("""
            import json, os, sys, time
            if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
                print("boom", flush=True)
                sys.exit(7)
            time.sleep(120)
        """),
        2,
        echo=lines.append,
        grace_seconds=5,
    )
    assert code == 7
    assert "[worker 1] boom" in lines
    assert any("worker 1 failed with exit code 7; stopping the other workers" in line for line in lines)
    assert __import__("time").monotonic() - started < 60


def test_xla_compiled_training_and_evaluation_run_on_cpu(tmp_path):
    lines: list[str] = []
    result = train(smoke_config("runtime.jit_compile=true", "train.max_steps=16"), tmp_path, echo=lines.append)
    assert "XLA on" in lines[0]
    assert result.final_eval.accuracy > 0.2 and np.isfinite(result.final_eval.loss)


def _xla_compiled_functions(loop, iterator) -> list[str]:
    """Names of the functions inside the compiled call that XLA must compile."""
    concrete = loop.compiled.get_concrete_function(
        iterator, tf.constant(0, tf.int64), tf.constant(1), tf.zeros([NUM_SUMS]), tf.constant(-1, tf.int64)
    )
    library = concrete.graph.as_graph_def().library.function
    return [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]


@pytest.mark.parametrize("jit", [True, False])
def test_with_jit_compile_the_forward_and_backward_pass_is_an_xla_cluster(jit):
    strategy = cached_strategy("one_device", ("/cpu:0",))
    batches = np.random.default_rng(0).uniform(0, 255, (2, 8, 32, 32, 3)).astype(np.float32)
    _, _, loop, iterator = tiny_loop(strategy, batches, np.zeros((2, 8), np.int32), jit_compile=jit)
    loop(iterator, tf.constant(1), tf.zeros([NUM_SUMS]))
    compiled = _xla_compiled_functions(loop, iterator)
    assert bool(compiled) is jit
    if jit:
        assert all("forward_backward" in name for name in compiled)


def test_a_deterministic_run_does_not_leave_determinism_on_for_the_next_run_in_the_process(tmp_path):
    from tensorflow.python.framework.config import is_op_determinism_enabled

    setup_runtime(RuntimeConfig(deterministic=True))
    assert is_op_determinism_enabled()
    setup_runtime(RuntimeConfig())
    assert not is_op_determinism_enabled()
    # Determinism left on made XLA refuse the max-pool gradient here ("no deterministic XLA implementation").
    setup_runtime(RuntimeConfig(deterministic=True))
    result = train(smoke_config("runtime.jit_compile=true", "train.max_steps=2"), tmp_path, echo=lambda _: None)
    assert result.step == 2


def test_xla_is_off_under_determinism_and_asking_for_both_is_a_clear_error():
    # auto: XLA on a single GPU, but not when the run must be deterministic.
    assert _resolve_jit("auto", "gpu", 1) is True
    assert _resolve_jit("auto", "gpu", 1, deterministic=True) is False
    assert setup_runtime(RuntimeConfig(deterministic=True, jit_compile="auto")).jit_compile is False
    with pytest.raises(RuntimeSetupError, match="runtime.jit_compile=true cannot run with runtime.deterministic=true"):
        setup_runtime(RuntimeConfig(deterministic=True, jit_compile="true"))
    result = CliRunner().invoke(
        cli, ["train", "--config", SMOKE, "--set", "runtime.jit_compile=true", "--set", "runtime.deterministic=true"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "XLA has no deterministic max-pool gradient" in result.output


def test_tpu_request_without_a_tpu_is_one_line():
    result = CliRunner().invoke(cli, ["train", "--config", SMOKE, "--set", "runtime.strategy=tpu"])
    assert result.exit_code == 2
    assert "no TPU could be used: tried TPUClusterResolver(tpu='local')" in result.output
    assert result.output.count("\n") == 1


def test_multi_worker_without_a_cluster_is_one_line(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["train", "--config", SMOKE, "--set", "runtime.strategy=multi_worker"])
    assert result.exit_code == 2 and "launch train --workers N" in result.output


def test_loss_scale_adapts_when_a_float16_gradient_overflows():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = cached_strategy("one_device", ("/cpu:0",))
        batches = np.random.default_rng(0).uniform(0, 1, (3, 8, 32, 32, 3)).astype(np.float32)
        batches[2] *= 6e4  # activations past float16's range: the gradients overflow
        model, optimizer, loop, iterator = tiny_loop(
            strategy,
            batches,
            np.zeros((3, 8), np.int32),
            optimizer_options={"learning_rate": 0.01, "loss_scaling": True},
            check_gradients=False,
        )
        optimizer.dynamic_growth_steps = 2  # grow after 2 clean steps (Keras' default: 2000)
        initial = float(optimizer.dynamic_scale.numpy())
        loop(iterator, tf.constant(2), tf.zeros([NUM_SUMS]))
        scale_before = float(optimizer.dynamic_scale.numpy())
        assert scale_before == 2 * initial  # two clean steps: the scale grew...
        weights_before = [v.numpy().copy() for v in model.trainable_variables]
        loop(iterator, tf.constant(1), tf.zeros([NUM_SUMS]))
        assert float(optimizer.dynamic_scale.numpy()) == scale_before / 2  # overflow: scale halved...
        assert all(np.array_equal(a, v.numpy()) for a, v in zip(weights_before, model.trainable_variables))
        assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)  # ...and step skipped
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_one_replica_checkpoint_resumes_on_two_replicas(tmp_path):
    train(smoke_config("train.max_steps=16"), tmp_path, echo=lambda _: None)
    lines: list[str] = []
    result = train(smoke_config("runtime.cpu_replicas=2"), tmp_path, echo=lines.append)
    assert any("written with 1 replica(s), this run has 2" in line for line in lines)
    assert result.step == 48 and result.final_eval.accuracy > 0.5


def test_sigterm_to_the_launcher_stops_all_workers_at_one_checkpoint(tmp_path):
    import signal
    import time

    from trainer.checkpoints import checkpoint_steps

    launcher = launch_train(
        tmp_path,
        "data.synthetic_train_size=4096",
        "data.batch_size=32",
        "model.width=32",
        "checkpoint.every_steps=10",
        "train.steps_per_loop=5",
        workers=2,
    )
    deadline = time.monotonic() + 120
    while not checkpoint_steps(tmp_path / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 75, output
    stops = [line for line in output.splitlines() if "Stopped by" in line]
    assert len(stops) == 2, output  # both workers stopped...
    steps = {line.split(" at step ")[1].split()[0] for line in stops}
    assert len(steps) == 1  # ...at the same step
    assert int(steps.pop()) in checkpoint_steps(tmp_path / "checkpoints")


def _cluster(workdir, *overrides: str, stop_worker_1_at: int | None = None) -> list[str]:
    """Two `launch train` processes with hand-written TF_CONFIGs (as a cluster engine starts
    them, not through --workers); the stop seam only on worker 1, the non-chief."""
    from trainer.launcher import free_ports, tf_config

    ports = free_ports(2)
    environments = [{"TF_CONFIG": tf_config(ports, index)} for index in range(2)]
    if stop_worker_1_at is not None:
        environments[1]["TRAINER_STOP_AT_STEP"] = str(stop_worker_1_at)
    expected = 0 if stop_worker_1_at is None else 75
    return launch_tasks(workdir, environments, *overrides, "runtime.strategy=multi_worker", expected_code=expected)


def test_a_stop_on_the_non_chief_stops_both_workers_at_one_step_and_resumes_exactly(tmp_path):
    from tests.test_fault_tolerance import _checkpoint_tensors

    run = ("train.max_steps=24", "train.steps_per_loop=5", "runtime.deterministic=true", "checkpoint.every_steps=8")
    _cluster(tmp_path / "straight", *run)
    chief, other = _cluster(tmp_path / "stopped", *run, stop_worker_1_at=13)
    assert "Stopped by TRAINER_STOP_AT_STEP at step 13 of 24" in other
    assert "Stopped by a stop on another worker at step 13 of 24" in chief
    assert checkpoint_steps(tmp_path / "stopped" / "checkpoints")[0] == 13
    chief, _ = _cluster(tmp_path / "stopped", *run)
    assert "ckpt-13 at step 13" in chief
    expected = _checkpoint_tensors(str(tmp_path / "straight" / "checkpoints" / "ckpt-24"))
    actual = _checkpoint_tensors(str(tmp_path / "stopped" / "checkpoints" / "ckpt-24"))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
