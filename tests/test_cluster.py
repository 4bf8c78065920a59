"""Cluster engines as they start us: TFJob/Vertex AI ($TF_CONFIG with a chief), Slurm (srun's
SLURM_* variables), their preemption signals, and the deploy/ examples."""

import json
import signal
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import EQUIVALENCE_RUN, launch_tasks, launch_train
from tests.test_distribution import _weights
from tests.test_fault_tolerance import _wait_for_checkpoint_after
from tests.test_safety import assert_one_error
from trainer.checkpoints import checkpoint_steps
from trainer.cluster import slurm_tf_config, tf_config_workers
from trainer.errors import RuntimeSetupError
from trainer.launcher import free_ports
from trainer.preemption import EXIT_PREEMPTED

RUN = (*EQUIVALENCE_RUN, "data.augment=false")  # as conftest.two_worker_run


def _srun_environment(rank: int, tasks: int = 2, **extra: str) -> dict[str, str]:
    """What `srun -n 2` on one node sets for task `rank` (the variables the trainer reads)."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": str(rank),
        **extra,
    }


def test_slurm_variables_become_a_tf_config():
    environment = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_NODELIST": "gpu[07-08],cpu1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
        "SLURM_NODEID": "1",
    }
    parsed = json.loads(slurm_tf_config(environment))
    assert parsed["cluster"] == {"worker": ["gpu07:8888", "gpu07:8889", "gpu08:8888", "gpu08:8889", "cpu1:8888"]}
    assert parsed["task"] == {"type": "worker", "index": 3}
    reserved = json.loads(slurm_tf_config({**environment, "SLURM_STEP_RESV_PORTS": "12000-12001"}))
    assert reserved["cluster"]["worker"][4] == "cpu1:12000"
    assert tf_config_workers({"TF_CONFIG": json.dumps(parsed)}) == 5


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a whole number"),
        ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_STEP_NUM_TASKS=2"),
        ({"SLURM_STEP_NODELIST": "node[1-"}, "SLURM_STEP_NODELIST='node[1-' cannot be read"),
        ({"SLURM_STEP_NODELIST": None}, "SLURM_STEP_NODELIST is not set"),
        ({"SLURM_STEP_TASKS_PER_NODE": "3"}, "does not place SLURM_STEP_NUM_TASKS=2 tasks"),
        ({"SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "a,b", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, "--distribution"),
        ({"SLURM_STEP_RESV_PORTS": "none"}, "SLURM_STEP_RESV_PORTS='none' is not a port range"),
        ({"TRAINER_PORT_BASE": "99999"}, "TRAINER_PORT_BASE=99999 must be from 1 to 65000"),
    ],
)
def test_malformed_slurm_variables_are_one_line(change, fragment):
    environment = {**_srun_environment(0), **change, "TF_CONFIG": None}
    result = CliRunner().invoke(cli, ["devices"], env=environment)
    assert_one_error(result, fragment)
    with pytest.raises(RuntimeSetupError):
        slurm_tf_config({k: v for k, v in environment.items() if v is not None})


@pytest.mark.parametrize(
    ("tf_config", "fragment"),
    [
        (
            {"cluster": {"chief": ["a:1"], "worker": ["b:1"], "evaluator": ["c:1"]}, "task": {"type": "evaluator"}},
            "side-car evaluation is not supported",
        ),
        ({"cluster": {"chief": ["a:1"], "ps": ["b:1"]}, "task": {"type": "chief"}}, "TF_CONFIG has ps tasks"),
        ({"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief"}}, "one chief"),
    ],
)
def test_tf_config_tasks_we_do_not_run_are_one_line(tf_config, fragment):
    result = CliRunner().invoke(cli, ["devices"], env={"TF_CONFIG": json.dumps(tf_config)})
    assert_one_error(result, fragment)


def _adjacent_free_ports() -> int:
    """A port p with p and p+1 free (Slurm's per-node ports are consecutive)."""
    for _ in range(50):
        base = free_ports(1)[0]
        if base >= 65_000:
            continue
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("0.0.0.0", base))
                second.bind(("0.0.0.0", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two adjacent free ports")


def test_tfjob_chief_and_slurm_srun_train_the_same_weights_as_local_workers(tmp_path, two_worker_run):
    expected = _weights(two_worker_run[0] / "checkpoints", 8)  # launch train --workers 2

    chief_port, worker_port = free_ports(2)
    cluster = {"chief": [f"localhost:{chief_port}"], "worker": [f"localhost:{worker_port}"]}
    tfjob = [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": job, "index": 0}})} for job in cluster]
    chief, worker = launch_tasks(tmp_path / "tfjob", tfjob, *RUN)
    assert "Strategy: auto: MultiWorkerMirroredStrategy over 2 workers" in chief
    assert "Done." in chief and "Done." not in worker  # the chief reports and writes
    assert len(list((tmp_path / "tfjob" / "tensorboard" / "train").iterdir())) == 1

    base = _adjacent_free_ports()
    srun = [_srun_environment(rank, SLURM_STEP_RESV_PORTS=f"{base}-{base + 1}") for rank in range(2)]
    rank0, _ = launch_tasks(tmp_path / "slurm", srun, *RUN)
    assert "MultiWorkerMirroredStrategy over 2 workers (RING) (cluster from Slurm's srun variables)" in rank0

    for run in ("tfjob", "slurm"):
        actual = _weights(tmp_path / run / "checkpoints", 8)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(actual[name], value, err_msg=f"{run}: {name}")


def test_slurm_sigusr1_before_the_time_limit_saves_and_a_requeued_job_resumes(tmp_path):
    run = ("data.synthetic_train_size=2048", "data.batch_size=32", "train.epochs=1", "checkpoint.every_steps=8")
    process = launch_train(tmp_path, *run)
    _wait_for_checkpoint_after(tmp_path, 0, process)
    process.send_signal(signal.SIGUSR1)  # sbatch --signal=USR1@120
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    assert "SIGUSR1 received" in output and "Stopped by SIGUSR1 at step" in output
    stopped = checkpoint_steps(tmp_path / "checkpoints")[0]
    assert 8 <= stopped < 64
    process = launch_train(tmp_path, *run)  # the requeued job runs the same command
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert f"ckpt-{stopped} at step {stopped}" in output and checkpoint_steps(tmp_path / "checkpoints")[0] == 64
