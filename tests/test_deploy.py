"""deploy/: every example is parsed (or run against stand-ins for kubectl's, Vertex's, Slurm's
and gcloud's side) and starts `launch train` the way tests/test_cluster.py starts it."""

import json
import os
import shlex
import stat
import subprocess
import textwrap

import pytest
import yaml

from tests.conftest import REPO
from trainer.cluster import checked_tf_config, slurm_tf_config, tf_config_workers
from trainer.config import load_config

DEPLOY = REPO / "deploy"


def _check_train_command(words: list[str]) -> dict[str, str]:
    """`launch train --config X --workdir gs://... --set k=v`: X exists and the config loads."""
    assert words[:2] == ["launch", "train"], words
    options: dict[str, str] = {}
    overrides = []
    rest = iter(words[2:])
    for word in rest:
        name, _, value = word.partition("=")
        value = value or next(rest)
        if name == "--set":
            overrides.append(value)
        else:
            options[name] = value
    assert (REPO / options["--config"]).is_file()
    assert options["--workdir"].startswith("gs://")  # outlives the machine
    load_config(REPO / options["--config"], overrides)
    return options


def _engine_tf_config(jobs: dict[str, int], task: str) -> str:
    """The TF_CONFIG an engine writes: one address per replica of each job."""
    cluster = {job: [f"job-{job}-{i}.svc:2222" for i in range(count)] for job, count in jobs.items()}
    return json.dumps({"cluster": cluster, "task": {"type": task, "index": 0}})


def test_tfjob_manifest_runs_a_chief_and_a_worker_that_resume_after_preemption():
    manifest = yaml.safe_load((DEPLOY / "tfjob.yaml").read_text())
    assert manifest["kind"] == "TFJob"
    specs = manifest["spec"]["tfReplicaSpecs"]
    assert set(specs) == {"Chief", "Worker"}  # as in test_cluster's two-process run
    commands = set()
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"  # a stopped pod (exit 75) is restarted: it resumes
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60  # time to save after SIGTERM
        container = pod["containers"][0]
        assert container["name"] == "tensorflow"  # the operator's default container name
        words = container["command"] + container["args"]
        _check_train_command(words)
        commands.add(tuple(words))
    assert len(commands) == 1  # every replica runs the same command
    jobs = {name.lower(): spec["replicas"] for name, spec in specs.items()}
    for task in jobs:
        config = _engine_tf_config(jobs, task)
        checked_tf_config(config)
        assert tf_config_workers({"TF_CONFIG": config}) == 2


def test_vertex_custom_job_has_a_chief_pool_and_a_worker_pool():
    job = yaml.safe_load((DEPLOY / "vertex_custom_job.yaml").read_text())
    pools = job["workerPoolSpecs"]
    assert len(pools) == 2 and pools[0]["replicaCount"] == 1  # pool 0: the chief; no ps/evaluator pools
    commands = {tuple(pool["containerSpec"]["command"] + pool["containerSpec"]["args"]) for pool in pools}
    assert len(commands) == 1
    _check_train_command(list(commands.pop()))
    jobs = {"chief": pools[0]["replicaCount"], "worker": pools[1]["replicaCount"]}
    assert tf_config_workers({"TF_CONFIG": _engine_tf_config(jobs, "worker")}) == 2


def _stand_in(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in (DEPLOY / "slurm.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[name] = value
    return options


@pytest.mark.parametrize(("srun_exit", "requeued", "script_exit"), [(75, True, 0), (0, False, 0), (3, False, 3)])
def test_sbatch_script_requeues_a_job_stopped_before_its_time_limit(tmp_path, srun_exit, requeued, script_exit):
    options = _sbatch_options()
    assert options["--signal"].startswith("USR1@") and int(options["--signal"].split("@")[1]) >= 60
    assert "--requeue" in options
    log = tmp_path / "calls"
    _stand_in(tmp_path, "srun", f'echo "srun $*" >> {log}\nexit {srun_exit}\n')
    _stand_in(tmp_path, "scontrol", f'echo "scontrol $*" >> {log}\n')
    result = subprocess.run(
        ["bash", str(DEPLOY / "slurm.sbatch")],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4711"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == script_exit, result.stderr
    calls = log.read_text().splitlines()
    srun = shlex.split(calls[0])
    assert srun[:4] == ["srun", "--resv-ports", "--distribution=block", "launch"]
    _check_train_command(srun[3:])
    assert (calls[1:] == ["scontrol requeue 4711"]) == requeued
    # What srun then sets in each of the 2 nodes' tasks is what test_cluster simulates.
    tasks = int(options["--nodes"]) * int(options["--ntasks-per-node"])
    environment = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": f"{options['--ntasks-per-node']}(x{options['--nodes']})",
        "SLURM_STEP_RESV_PORTS": "12000",
    }
    assert json.loads(slurm_tf_config(environment))["cluster"]["worker"] == ["node1:12000", "node2:12000"]


def test_tpu_vm_script_trains_into_a_gs_workdir_on_worker_0(tmp_path):
    assert subprocess.run(["bash", "-n", str(DEPLOY / "tpu_vm.sh")]).returncode == 0
    log = tmp_path / "calls"
    _stand_in(tmp_path, "gcloud", f'printf "%s\\0" "$@" >> {log}\necho >> {log}\n')
    result = subprocess.run(
        ["bash", str(DEPLOY / "tpu_vm.sh")],
        env={
            **os.environ,
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "TPU_NAME": "t1",
            "ZONE": "z1",
            "BUCKET": "b1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    create, ssh = [call.strip("\n").strip("\0").split("\0") for call in log.read_text().split("\0\n") if call.strip()]
    assert create[:4] == ["compute", "tpus", "tpu-vm", "create"] and "--spot" in create
    assert "--worker=0" in ssh
    remote = next(arg for arg in ssh if arg.startswith("--command=")).removeprefix("--command=")
    train_line = next(line.strip() for line in remote.splitlines() if line.strip().startswith("launch train"))
    options = _check_train_command(shlex.split(train_line))
    assert options["--workdir"] == "gs://b1/runs/cifar10_tpu"


def test_missing_settings_of_the_tpu_script_are_named(tmp_path):
    result = subprocess.run(
        ["bash", str(DEPLOY / "tpu_vm.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr
