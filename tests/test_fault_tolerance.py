"""Fault tolerance: exact resume, preemption signals, damaged checkpoints, divergence."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from launch.cli import cli
from tests.conftest import REPO, launch_train, made_once, smoke_config, tiny_loop
from trainer.checkpoints import checkpoint_steps
from trainer.config import load_config
from trainer.data.convert import convert
from trainer.errors import DivergedError, WorkdirBusyError
from trainer.preemption import EXIT_PREEMPTED
from trainer.runtime import cached_strategy
from trainer.sums import NUM_SUMS, StepSums
from trainer.training import train

SMOKE = str(REPO / "configs" / "smoke.yaml")
# 64 steps per epoch, 128 in all, deterministic ops: room for four interruptions. Batches
# of 16 through a narrow model, 64 test images: each of the test's six runs costs little
# more than its start.
EXACT = (
    "data.synthetic_train_size=1024",
    "data.synthetic_test_size=64",
    "data.batch_size=16",
    "model.width=8",
    "train.epochs=2",
    "train.steps_per_loop=5",
    "checkpoint.every_steps=10",
    "checkpoint.keep=20",
    "runtime.deterministic=true",
)
TOTAL = 128
# The smoke run's steps (16 per epoch) on half its examples and a quarter of its test images.
HALF_SMOKE = ("data.synthetic_train_size=512", "data.synthetic_test_size=64", "data.batch_size=32")


def quiet(_line: str) -> None:
    pass


def _wait_for_checkpoint_after(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll (bounded) until a checkpoint newer than `step` exists: an event, not a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s > step for s in checkpoint_steps(workdir / "checkpoints")):
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer ended early:\n{process.communicate(timeout=30)[0]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no new checkpoint appeared:\n{process.communicate(timeout=30)[0]}")


def _checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(path)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        # save_counter counts saves, and an interrupted run saves more often by design
        if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))
    }


_WALL_CLOCK_TAGS = ("images_per_second", "step_time_seconds")  # differ between runs by nature


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["tensors"]:
        points = events.Tensors(tag)
        if tag in _WALL_CLOCK_TAGS or points[0].tensor_proto.tensor_shape.dim:
            continue  # images, histograms and text are not scalars
        if points[0].tensor_proto.dtype != tf.float32.as_datatype_enum:
            continue
        scalars[tag] = [(e.step, float(make_ndarray(e.tensor_proto))) for e in points]
    return scalars


def _stop_line(output: str, by: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"Stopped by {by}"))


def _stop_step(output: str, by: str) -> int:
    return int(_stop_line(output, by).split(" at step ")[1].split()[0])


def test_stops_at_exact_steps_and_resumes_bit_identically(tmp_path, monkeypatch):
    """The stop seam at chosen steps, then a real SIGTERM, then the rest: equal to a straight run.

    Steps: 7 is inside a steps_per_loop window (5..10), 64 an epoch's end, 65 the step
    after it; each stop must leave its checkpoint at exactly that step (one-step latency).
    The seam's stops run in this process (what they prove is the step, not the process);
    the SIGTERM goes to a `launch train` process that resumes what this process saved.
    """
    train(smoke_config(*EXACT), tmp_path / "straight", echo=quiet)
    interrupted = tmp_path / "interrupted"
    for step in (7, 64, 65):
        monkeypatch.setenv("TRAINER_STOP_AT_STEP", str(step))
        lines: list[str] = []
        result = train(smoke_config(*EXACT), interrupted, echo=lines.append)
        assert result.stopped_by == "TRAINER_STOP_AT_STEP" and result.step == step, lines
        assert _stop_step("\n".join(lines), "TRAINER_STOP_AT_STEP") == step
        assert checkpoint_steps(interrupted / "checkpoints")[0] == step
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    process = launch_train(interrupted, *EXACT)  # a real signal, once the run has made progress
    _wait_for_checkpoint_after(interrupted, 65, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    assert "Resuming from" in output and "ckpt-65 at step 65" in output
    last = _stop_step(output, "SIGTERM")
    assert "resume with: launch train --config" in _stop_line(output, "SIGTERM")  # what the CLI adds
    assert 65 < last < TOTAL and checkpoint_steps(interrupted / "checkpoints")[0] == last
    lines = []
    assert train(smoke_config(*EXACT), interrupted, echo=lines.append).step == TOTAL
    assert any(f"Resuming from {interrupted / 'checkpoints' / f'ckpt-{last}'}" in line for line in lines), lines
    _assert_same_run(tmp_path / "straight", interrupted)


def _assert_same_run(straight: Path, resumed: Path, step: int = TOTAL) -> None:
    """Weights, optimizer slots, RNG states and every logged scalar, bit for bit."""
    expected = _checkpoint_tensors(str(straight / "checkpoints" / f"ckpt-{step}"))
    actual = _checkpoint_tensors(str(resumed / "checkpoints" / f"ckpt-{step}"))
    assert expected.keys() == actual.keys()
    assert any("optimizer" in name for name in expected) and any("seed_generators" in name for name in expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    for run in ("train", "eval"):
        assert _scalars(resumed / "tensorboard" / run) == _scalars(straight / "tensorboard" / run)
    steps = [s for s, _ in _scalars(resumed / "tensorboard" / "train")["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == step  # one point per logged step


# A workdir that the code before #25 (commit 793a59c, when the checkpoint store still took
# the loop's window sums itself) stopped at step 8 of 16: model, momentum slots, lookahead
# slow weights, step, epoch, dropout RNG states and a logging window in flight (its sums
# are logged at 16). How it was made: tests/fixtures/README.md.
WORKDIR_BEFORE_25 = REPO / "tests" / "fixtures" / "workdir_793a59c"


def _resume_fixture(fixture: Path, config, tmp_path: Path, stopped_at: int, total: int) -> Path:
    """A copy of an old workdir resumed by today's code, and a straight run of today's code:
    the same run, bit for bit. Returns the resumed workdir."""
    resumed = tmp_path / "resumed"
    shutil.copytree(fixture, resumed)
    lines: list[str] = []
    assert train(config, resumed, echo=lines.append).step == total
    checkpoint = resumed / "checkpoints" / f"ckpt-{stopped_at}"
    assert any(f"Resuming from {checkpoint} at step {stopped_at}" in line for line in lines), lines
    train(config, tmp_path / "straight", echo=quiet)
    _assert_same_run(tmp_path / "straight", resumed, step=total)
    return resumed


def test_a_checkpoint_written_before_the_store_split_resumes_bit_for_bit(tmp_path):
    config = load_config(WORKDIR_BEFORE_25 / "config.yaml")
    window = tf.train.load_checkpoint(str(WORKDIR_BEFORE_25 / "checkpoints" / "ckpt-8"))
    assert StepSums.of(window.get_tensor("window_sums/.ATTRIBUTES/VARIABLE_VALUE")).steps == 8
    resumed = _resume_fixture(WORKDIR_BEFORE_25, config, tmp_path, stopped_at=8, total=16)
    assert any("lookahead" in name for name in _checkpoint_tensors(str(resumed / "checkpoints" / "ckpt-16")))


# A workdir that the code before trainer/data/ was split (commit f62fdb8) stopped at step 12
# of 24, mid-epoch, training on TFRecord shards streamed with augmentation (data.cache=none):
# the resume skips raw records by the seeded shard and block order trainer.data.plan now
# builds. The shards are written again here, by today's `data convert`, from the same PNGs.
WORKDIR_BEFORE_DATA_SPLIT = REPO / "tests" / "fixtures" / "workdir_f62fdb8_tfrecord"


def _write_fixture_photos(root: Path) -> None:
    """4 classes, 16 train + 4 test PNGs each, 16x16, from a fixed seed (as the fixture's)."""
    rng = np.random.default_rng(7)
    for split, count in (("train", 16), ("test", 4)):
        for label in range(4):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 * label + 40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_a_streamed_tfrecord_checkpoint_written_before_the_data_split_resumes_bit_for_bit(tmp_path):
    _write_fixture_photos(tmp_path / "photos")
    convert(str(tmp_path / "photos"), str(tmp_path / "shards"), shard_size_mb=0.002, progress=quiet)
    config = load_config(WORKDIR_BEFORE_DATA_SPLIT / "config.yaml", [f"data.path={tmp_path / 'shards'}"])
    _resume_fixture(WORKDIR_BEFORE_DATA_SPLIT, config, tmp_path, stopped_at=12, total=24)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_first_signal_requests_a_stop_and_the_second_exits_at_once(signum):
    """SIGHUP (a closed terminal or SSH session) is a stop request as SIGTERM is (#24 sweep)."""
    name = signal.Signals(signum).name
    script = f"""
import os, signal, time
from trainer.preemption import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.{name})
    deadline = time.monotonic() + 30
    while stop.signal_name is None and time.monotonic() < deadline:  # until the handler ran
        time.sleep(0.01)
    print(stop.signal_name, bool(stop.flag.numpy()), flush=True)
    os.kill(os.getpid(), signal.{name})
    time.sleep(10)
print("not reached")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == [name, "True"], done.stdout + done.stderr
    assert done.returncode == 128 + signum


# Deterministic (half) smoke runs, 16 steps per epoch: checkpoints at 8 and 16, then on to 24.
DAMAGE_RUN = (*HALF_SMOKE, "checkpoint.every_steps=8", "runtime.deterministic=true", "checkpoint.keep=5")


@pytest.fixture(scope="session")
def runs_to_damage(tmp_path_factory):
    """A straight run to step 24, and a run stopped at 16 whose newest checkpoint gets damaged
    (in a copy: these are made once per test run and only read; test_resume_removes_orphaned_
    tensorboard_points copies the second one too)."""

    def make(root: Path) -> None:
        train(smoke_config(*DAMAGE_RUN, "train.max_steps=24"), root / "straight", echo=quiet)
        train(smoke_config(*DAMAGE_RUN, "train.max_steps=16"), root / "at16", echo=quiet)

    root = made_once(tmp_path_factory, "runs-to-damage", make)
    return root / "straight", root / "at16"


def _damage(checkpoints: Path, how: str) -> None:
    data = next(checkpoints.glob("ckpt-16.data-*"))
    index = checkpoints / "ckpt-16.index"
    if how == "truncated data":  # a save killed half-way
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "garbage data":
        content = data.read_bytes()
        data.write_bytes(content[:100] + bytes(len(content) - 100))
    elif how == "corrupted index":
        content = index.read_bytes()
        index.write_bytes(content[:40] + bytes(len(content) - 40))
    elif how == "missing data":
        data.unlink()
    elif how == "state file names a deleted checkpoint":
        data.unlink()
        index.unlink()  # `checkpoints/checkpoint` still says ckpt-16 is the latest


@pytest.mark.parametrize(
    "damage",
    ["truncated data", "garbage data", "corrupted index", "missing data", "state file names a deleted checkpoint"],
)
def test_a_damaged_newest_checkpoint_falls_back_and_the_run_matches_a_straight_one(runs_to_damage, tmp_path, damage):
    straight, at16 = runs_to_damage
    workdir = Path(shutil.copytree(at16, tmp_path / "run"))
    _damage(workdir / "checkpoints", damage)
    lines: list[str] = []
    result = train(smoke_config(*DAMAGE_RUN, "train.max_steps=24"), workdir, echo=lines.append)
    if damage != "state file names a deleted checkpoint":
        warning = next(line for line in lines if line.startswith("Warning: checkpoint"))
        assert "ckpt-16 is unreadable" in warning and "trying an older one" in warning
    assert any("Resuming from" in line and "ckpt-8 at step 8" in line for line in lines)
    assert result.step == 24
    _assert_same_run(straight, workdir, step=24)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(smoke_config(*HALF_SMOKE, "train.max_steps=8"), tmp_path, echo=quiet)
    with pytest.raises(DivergedError) as err:
        train(smoke_config(*HALF_SMOKE, "optimizer.learning_rate=1e12", "train.max_steps=40"), tmp_path, echo=quiet)
    message = str(err.value)
    assert "NaN or infinite at step" in message and "last good checkpoint is step 8" in message
    assert checkpoint_steps(tmp_path / "checkpoints") == [8]


def test_nan_exit_code_from_the_cli(tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "--config", SMOKE, "--workdir", str(tmp_path), "--set", "optimizer.learning_rate=1e12"]
    )
    assert result.exit_code == DivergedError.exit_code == 3
    assert "Error: the loss became NaN or infinite at step" in result.output


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_nonfinite_step_is_stopped_on_or_skipped(policy):
    strategy = cached_strategy("mirrored", ("/cpu:0", "/cpu:1"))
    batches = np.random.default_rng(0).uniform(0, 255, (3, 8, 32, 32, 3)).astype(np.float32)
    batches[1, 0, 0, 0, 0] = np.inf  # one poisoned example in the second step
    model, _, loop, iterator = tiny_loop(
        strategy,
        batches,
        np.zeros((3, 8), np.int32),
        optimizer_options={"skip_nonfinite": policy == "skip_step"},
        stop_on_nonfinite=policy == "stop",
    )
    if policy == "stop":
        sums, steps, _ = loop(iterator, tf.constant(3), tf.zeros([NUM_SUMS]))
        assert int(steps) == 2 and StepSums.of(sums).nonfinite == 1
        return
    snapshots, sums = [], tf.zeros([NUM_SUMS])
    for _ in range(3):  # one step per call, to look at the weights in between
        sums, steps, _ = loop(iterator, tf.constant(1), sums)
        assert int(steps) == 1
        snapshots.append([v.numpy().copy() for v in model.trainable_variables])
    assert StepSums.of(sums).nonfinite == 1
    assert all(np.array_equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 skipped
    assert not all(np.array_equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 applied
    assert all(np.isfinite(v).all() for v in snapshots[2])


def test_best_checkpoint_is_kept_and_selectable(tmp_path):
    train(smoke_config(*HALF_SMOKE), tmp_path, echo=quiet)
    record = __import__("json").loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    evals = _scalars(tmp_path / "tensorboard" / "eval")["accuracy"]
    best_step, best_accuracy = max(evals, key=lambda point: point[1])
    assert record["step"] == best_step and record["accuracy"] == pytest.approx(best_accuracy)
    result = CliRunner().invoke(cli, ["evaluate", "--workdir", str(tmp_path), "--checkpoint", "best"])
    assert result.exit_code == 0, result.output
    assert f"step {best_step})" in result.output
    result = CliRunner().invoke(cli, ["evaluate", "--workdir", str(tmp_path), "--checkpoint", "7"])
    assert result.exit_code == 2 and "no checkpoint at step 7" in result.output


def test_two_replica_checkpoint_resumes_on_one_replica(tmp_path):
    once = (*HALF_SMOKE, "train.eval_every_epochs=3")  # 48 steps, evaluated at the end only
    train(smoke_config(*once, "runtime.cpu_replicas=2", "train.max_steps=16"), tmp_path, echo=quiet)
    lines: list[str] = []
    result = train(smoke_config(*once, "runtime.cpu_replicas=1"), tmp_path, echo=lines.append)
    assert any("written with 2 replica(s), this run has 1" in line for line in lines)
    assert result.step == 48 and result.final_eval.accuracy > 0.5


def test_time_based_checkpoints(tmp_path):
    train(
        smoke_config(*HALF_SMOKE, "train.epochs=1", "checkpoint.every_steps=0", "checkpoint.every_minutes=0.00001"),
        tmp_path,
        echo=quiet,
    )
    assert checkpoint_steps(tmp_path / "checkpoints") == [16, 8]


def test_busy_workdir_is_refused(tmp_path):
    with open(tmp_path / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("4242")
        handle.flush()
        with pytest.raises(WorkdirBusyError, match=r"in use by another trainer \(pid 4242\)"):
            train(smoke_config(), tmp_path, echo=quiet)


def test_resume_removes_orphaned_tensorboard_points(runs_to_damage, tmp_path):
    """A copy of a run that stopped at step 16, having logged steps 8 and 16, then loses ckpt-16."""
    workdir = Path(shutil.copytree(runs_to_damage[1], tmp_path / "run"))
    for path in (workdir / "checkpoints").glob("ckpt-16*"):
        path.unlink()  # as if killed after logging step 16 but before saving it
    (workdir / "checkpoints" / "checkpoint").unlink()
    train(smoke_config(*DAMAGE_RUN, "train.max_steps=24"), workdir, echo=quiet)
    steps = [step for step, _ in _scalars(workdir / "tensorboard" / "train")["loss"]]
    assert steps == [8, 16, 24]


# Saves every step and evaluates every epoch (16 steps): kills land in saves, evaluations
# and best-keeping as often as in plain steps.
KILL_RUN = (
    "data.synthetic_train_size=512",
    "data.synthetic_test_size=128",
    "data.batch_size=32",
    "model.width=8",
    "train.epochs=6",
    "train.steps_per_loop=1",
    "checkpoint.every_steps=1",
    "checkpoint.keep=2",
)
KILL_TOTAL = 96


def _assert_workdir_usable(workdir: Path, image: Path) -> None:
    """What a user does after a crash: read the side files, evaluate, predict."""
    import json

    from trainer.config import load_config

    load_config(workdir / "config.yaml")
    json.loads((workdir / "dataset.json").read_text())
    best = workdir / "checkpoints" / "best" / "best.json"
    if best.exists():
        assert json.loads(best.read_text())["step"] in checkpoint_steps(best.parent)
    for args in (["evaluate"], ["predict", str(image)]):
        result = CliRunner().invoke(cli, [args[0], "--workdir", str(workdir), *args[1:]])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kills", [3, pytest.param(10, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_never_loses_the_workdir(tmp_path, kills):
    """SIGKILL 3 times (10 in the slow suite) at seeded random moments of a run that saves every step.

    The moments are random by design (seeded, so a failure repeats); what is asserted
    holds after every one of them. This replaces a single kill 0.3 s after a save. Each
    killed run is a `launch train` process; the last resume, which only has to finish,
    runs in this process (what it proves is the workdir, not the process).
    """
    from PIL import Image

    image = tmp_path / "probe.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    workdir, rng = tmp_path / "run", np.random.default_rng(10)
    tried = survived = 0
    for _ in range(kills):
        last = max(checkpoint_steps(workdir / "checkpoints"), default=0)
        process = launch_train(workdir, *KILL_RUN)
        _wait_for_checkpoint_after(workdir, last, process)  # it resumed and made progress
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment: a step, a save, an evaluation
        process.kill()
        process.communicate(timeout=60)
        tried += 1
        _assert_workdir_usable(workdir, image)
        survived += 1
    lines: list[str] = []
    # Not killed, this last run saves at epoch ends only (a resume may change checkpoint keys).
    final = train(smoke_config(*KILL_RUN, "checkpoint.every_steps=0"), workdir, echo=lines.append)
    assert (final.exit_code, final.step) == (0, KILL_TOTAL), lines
    assert any("Resuming from" in line for line in lines) and checkpoint_steps(workdir / "checkpoints")[0] == KILL_TOTAL
    print(f"SIGKILL: {survived} of {tried} kills survived")  # for the bench note (pytest -s)


def test_early_stopping_counts_on_across_a_stop_and_resume_bit_for_bit(tmp_path, monkeypatch):
    """A run stopped after its second evaluation resumes with its count (in the checkpoint):
    it stops early at the same step as a straight run, with the same weights and scalars."""
    # 4 steps per epoch, 20 in all. min_delta=1: after the first evaluation nothing is a gain,
    # so the count is 1 at step 8 and 2 at step 12, where the run stops.
    config = smoke_config(
        "data.synthetic_train_size=256",
        "data.synthetic_test_size=64",
        "model.width=8",
        "train.epochs=5",
        "train.steps_per_loop=2",
        "checkpoint.every_steps=0",
        "runtime.deterministic=true",
        "train.early_stopping_patience=2",
        "train.early_stopping_min_delta=1",
        "tensorboard.images=false",  # the scalars are compared; drawing images costs each evaluation
    )
    straight = train(config, tmp_path / "straight", echo=quiet)
    assert (straight.stopped_by, straight.step) == ("early_stopping", 12)
    interrupted = tmp_path / "interrupted"
    monkeypatch.setenv("TRAINER_STOP_AT_STEP", "9")  # inside a call, after the second evaluation
    assert train(config, interrupted, echo=quiet).stopped_by == "TRAINER_STOP_AT_STEP"
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    lines: list[str] = []
    resumed = train(config, interrupted, echo=lines.append)
    # Without the count from the checkpoint it would be 1 at step 12, and the run would go on.
    assert (resumed.stopped_by, resumed.step, resumed.exit_code) == ("early_stopping", 12, 0)
    assert any(
        line.startswith("Early stopping at step 12 of 20: no accuracy gain of >= 100.00% in the last 2 evaluations")
        for line in lines
    ), lines
    _assert_same_run(tmp_path / "straight", interrupted, step=12)
