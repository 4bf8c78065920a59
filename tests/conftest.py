"""Shared test setup.

TensorFlow can split the CPU into logical devices only before it starts, so the whole
session gets two up front: tests ask for 1 or 2 replicas through runtime.cpu_replicas
and the runtime reuses these devices.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from trainer.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Each test starts from TensorFlow's defaults, whatever the test before it left.

    A run sets the global mixed-precision policy and op determinism for the whole process;
    without this, the suite would pass only in the order its files happen to run.
    """
    import keras

    from trainer.runtime import set_op_determinism

    policy = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(policy)
    set_op_determinism(False)
    os.environ.pop("TRAINER_STOP_AT_STEP", None)


@pytest.fixture
def cifar10_dir() -> Path:
    """The shared CIFAR-10 image folder ($CIFAR10_DIR); tests using it skip if it is absent."""
    value = os.environ.get("CIFAR10_DIR")
    if not value or not (Path(value) / "train").is_dir():
        pytest.skip("CIFAR10_DIR is not set to the shared CIFAR-10 image folder")
    return Path(value)


def smoke_config(*overrides: str):
    """configs/smoke.yaml with overrides: the small synthetic run most tests start from."""
    return load_config(REPO / "configs" / "smoke.yaml", overrides)


# The equivalence runs: synchronized BatchNorm, 8 steps of a small global batch.
EQUIVALENCE_RUN = (
    "model.name=resnet_small",
    "model.width=8",
    "train.max_steps=8",
    "data.batch_size=32",
    "runtime.deterministic=true",  # the reduction order of each op is fixed, so the comparisons are repeatable
)

# float16 has no fast kernels on a CPU (each op is emulated): runs in that precision use
# batches of 16 and 64 test images, a quarter of the smoke run's work per step.
SMALL_FLOAT16_RUN = ("data.batch_size=16", "data.synthetic_test_size=64")


def launch_tasks(workdir, environments: list[dict[str, str]], *overrides: str, expected_code: int = 0) -> list[str]:
    """`python -m launch train` on configs/smoke.yaml once per environment, started together
    as a cluster engine starts them: the same command, each with its own variables (and no
    TF_CONFIG but the one given). Returns their outputs; each must exit `expected_code`."""
    import subprocess
    import sys

    processes = []
    for extra in environments:
        env = {name: value for name, value in os.environ.items() if name != "TF_CONFIG"}
        env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra})
        args = [sys.executable, "-m", "launch", "train", "--config", str(REPO / "configs" / "smoke.yaml")]
        args += ["--workdir", str(workdir)]
        for override in overrides:
            args += ["--set", override]
        processes.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == expected_code, output
    return outputs


def launch_train(workdir, *overrides: str, workers: int = 1, env: dict[str, str] | None = None):
    """`python -m launch train` on configs/smoke.yaml in a subprocess, output piped as text.

    Read its output with `communicate(timeout=...)`, which fails instead of hanging.
    `env` adds variables, e.g. {"TRAINER_STOP_AT_STEP": "7"} (the stop seam).
    """
    import subprocess
    import sys

    args = [sys.executable, "-m", "launch", "train", "--config", str(REPO / "configs" / "smoke.yaml")]
    args += ["--workdir", str(workdir), "--workers", str(workers)]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


class TinyLoop:
    """`loop(iterator, num_steps, sums, first_step=0)` over the compiled call: the test seam is off."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def __call__(self, iterator, num_steps, sums, first_step: int = 0):
        sums, steps, stopped, _ = self.compiled(
            iterator, tf.constant(first_step, tf.int64), num_steps, sums, tf.constant(-1, tf.int64)
        )
        return sums, steps, stopped


def tiny_loop(strategy, batches, labels, *, optimizer_options=None, model_name="paper_cnn", **loop_options):
    """A width-4 model, its optimizer and compiled loop over `batches`: for step-level tests."""
    from trainer.config import OptimizerConfig
    from trainer.loop.step import StepOptions, Votes, make_train_loop
    from trainer.models import build_model
    from trainer.optim import build_optimizer, gradient_multipliers

    options = dict(optimizer_options or {})
    optimizer_config = OptimizerConfig(
        learning_rate=options.pop("learning_rate", 0.05),
        ema_momentum=options.pop("ema_momentum", 0.0),
        bias_lr_multiplier=options.pop("bias_lr_multiplier", 1.0),
    )
    with strategy.scope():
        model = build_model(model_name, input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
        optimizer = build_optimizer(optimizer_config, 10, 10, **options)
        optimizer.build(model.trainable_variables)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((batches, labels)))
    step_options = StepOptions(
        global_batch=batches.shape[1],
        num_classes=10,
        gradient_multipliers=gradient_multipliers(model.trainable_variables, optimizer_config),
        skip_nonfinite=options.get("skip_nonfinite", False),
        **loop_options,
    )
    loop = make_train_loop(strategy, model, optimizer, Votes.create(), step_options)
    return model, optimizer, TinyLoop(loop), iter(dataset)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that `make` fills once per test run, whichever pytest-xdist worker asks first.

    Why: a run that several tests only read (a two-process cluster costs ~15 s of two cores)
    is made once, not once per worker. The workers share the parent of their base temp
    folder; a lock file orders them, and the others wait for the first one's result. Tests
    must not change what it holds (copy it first).
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / f"made-once-{name}"
    with open(shared / f"made-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def two_worker_run(tmp_path_factory) -> tuple[Path, str]:
    """The equivalence run (augmentation off) through `launch train --workers 2`: its
    workdir and output. test_distribution and test_cluster compare other runs with it."""

    def make(folder: Path) -> None:
        process = launch_train(folder / "run", *EQUIVALENCE_RUN, "data.augment=false", workers=2)
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
        (folder / "output.txt").write_text(output)

    folder = made_once(tmp_path_factory, "two-worker-run", make)
    return folder / "run", (folder / "output.txt").read_text()


@pytest.fixture
def store(gcs):
    """The GCS emulator of the requesting module's `gcs` fixture (test_gcs_emulator,
    test_gcs_lease), answering every request; faults set by a test end with it."""
    gcs.set_faults(0.0)
    yield gcs
    gcs.set_faults(0.0)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The order's seed at the end of every log: `-q` (make test) hides pytest-randomly's header."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"Test order: pytest-randomly seed {seed} (replay it with --randomly-seed={seed})")
