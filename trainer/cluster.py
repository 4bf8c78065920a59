"""Where a multi-worker cluster comes from: $TF_CONFIG, or the variables Slurm's `srun` sets.

Cluster engines start one `launch train` per machine and tell each where it stands:
- Kubeflow's TFJob and Vertex AI write $TF_CONFIG, with a `chief` task and `worker`
  tasks (`--workers N` writes workers only; worker 0 is then the chief);
- Slurm's `srun` sets SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and
  SLURM_STEP_TASKS_PER_NODE; `slurm_tf_config` turns them into the same $TF_CONFIG.

MultiWorkerMirroredStrategy then reads $TF_CONFIG, whatever wrote it: one code path.
TensorFlow's `SlurmClusterResolver` is not used directly: it needs `nvidia-smi` (or a
GPU count) and divides by the GPUs per task, which fails on CPU-only nodes; its hostlist
parsing is reused. An `evaluator` (side-car evaluation) and `ps` tasks (parameter
servers) are refused: the chief evaluates in-line, and every worker trains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping

from trainer import files
from trainer.errors import RuntimeSetupError

_TF_CONFIG_HINT = (
    'it must look like {"cluster": {"chief": ["host:port"], "worker": ["host:port", ...]}, '
    '"task": {"type": "worker", "index": 0}}'
)
_TRAINING_JOBS = ("chief", "worker")
# Slurm's srun reserves ports for a step with --resv-ports; otherwise this base (as TF's
# SlurmClusterResolver), plus the task's index on its node.
PORT_BASE_VARIABLE = "TRAINER_PORT_BASE"
DEFAULT_PORT_BASE = 8888


def tf_config_workers(environ: Mapping[str, str] = os.environ) -> int:
    """Number of training tasks (chief and workers) in $TF_CONFIG; 0 if unset."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return 0
    cluster = checked_tf_config(raw)["cluster"]
    return sum(len(cluster.get(job, [])) for job in _TRAINING_JOBS)


def checked_tf_config(raw: str) -> dict:
    """$TF_CONFIG parsed and checked for the shape TensorFlow expects, or one clear error.

    TensorFlow itself meets a malformed one with a traceback, an unparsable-port error
    or (an empty job list beside others) a segfault, so nothing of it is left to TF.
    """
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:
        raise RuntimeSetupError(f"TF_CONFIG is not valid JSON ({str(err)[:80]}); {_TF_CONFIG_HINT}") from None
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    task = parsed.get("task", {}) if isinstance(parsed, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise RuntimeSetupError(f"TF_CONFIG has no cluster/task mapping; {_TF_CONFIG_HINT}")
    for job, addresses in cluster.items():
        _check_job_addresses(str(job)[:40], addresses)
    _refuse_other_jobs(cluster, task)
    if len(cluster.get("chief", [])) > 1:
        raise RuntimeSetupError(f"TF_CONFIG names {len(cluster['chief'])} chief tasks; a cluster has one chief")
    if task or sum(len(cluster.get(job, [])) for job in _TRAINING_JOBS) > 1:
        _check_task(cluster, task)
    return parsed


def _check_job_addresses(job: str, addresses) -> None:
    """A non-empty list of distinct "host:port" strings with ports TCP can use."""
    if not isinstance(addresses, list) or not addresses:
        raise RuntimeSetupError(
            f'TF_CONFIG cluster job "{job}" must be a non-empty list of "host:port"; {_TF_CONFIG_HINT}'
        )
    for address in addresses:
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not host or not files.is_port(port):
            raise RuntimeSetupError(
                f'TF_CONFIG cluster job "{job}" has {str(address)[:60]!r}, which is not "host:port" with a port '
                f"from 1 to 65535; {_TF_CONFIG_HINT}"
            )
    if len(set(addresses)) < len(addresses):
        raise RuntimeSetupError(f'TF_CONFIG cluster job "{job}" names one address twice; every task needs its own port')


def _check_task(cluster: dict, task: dict) -> None:
    """The task names one task of the cluster: which one this process is."""
    job, index = task.get("type"), task.get("index", 0)
    if job not in cluster or type(index) is not int or not 0 <= index < len(cluster[job]):
        raise RuntimeSetupError(
            f"TF_CONFIG task {json.dumps(task)[:80]} names no task of its cluster (a cluster of several tasks needs "
            f'"task": {{"type": "worker", "index": N}}); {_TF_CONFIG_HINT}'
        )


def _refuse_other_jobs(cluster: dict, task: dict) -> None:
    """Only chief and worker tasks train here; say what to do about the others."""
    if task.get("type") == "evaluator" or "evaluator" in cluster:
        raise RuntimeSetupError(
            "TF_CONFIG has an evaluator task, and side-car evaluation is not supported: the chief evaluates during "
            "training (eval.every_epochs) and `launch evaluate --workdir ...` evaluates any checkpoint; remove the "
            "evaluator from the job (TFJob: the Evaluator replica spec; Vertex AI: the fourth worker pool)"
        )
    others = sorted(set(cluster) - set(_TRAINING_JOBS))
    if others:
        raise RuntimeSetupError(
            f"TF_CONFIG has {', '.join(map(str, others))[:60]} tasks, which this trainer does not run "
            "(MultiWorkerMirroredStrategy: every task trains); keep only chief and worker tasks"
        )


def slurm_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """Tasks of the current `srun` step (0 outside one)."""
    raw = environ.get("SLURM_STEP_NUM_TASKS")
    if raw is None or "SLURM_PROCID" not in environ:
        return 0
    return _slurm_int(environ, "SLURM_STEP_NUM_TASKS", minimum=1)


def slurm_tf_config(environ: Mapping[str, str] = os.environ) -> str:
    """The $TF_CONFIG of this `srun` task: every task of the step is a worker, rank 0 the chief.

    Tasks are placed on the step's nodes in order (Slurm's default block distribution),
    and task k of a node listens on port base + k.
    """
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (  # hostlist syntax, as TF
        expand_hostlist,
        expand_tasks_per_node,
    )

    tasks = slurm_tasks(environ)
    rank = _slurm_int(environ, "SLURM_PROCID", minimum=0)
    if rank >= tasks:
        raise RuntimeSetupError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={tasks}")
    hosts = _slurm_list(environ, "SLURM_STEP_NODELIST", expand_hostlist)
    per_node = _slurm_list(environ, "SLURM_STEP_TASKS_PER_NODE", expand_tasks_per_node)
    if len(per_node) != len(hosts) or sum(per_node) != tasks:
        raise RuntimeSetupError(
            f"SLURM_STEP_TASKS_PER_NODE={environ['SLURM_STEP_TASKS_PER_NODE']!r} does not place "
            f"SLURM_STEP_NUM_TASKS={tasks} tasks on the {len(hosts)} node(s) of SLURM_STEP_NODELIST"
        )
    base = _port_base(environ)
    if base + max(per_node) - 1 > 65535:
        raise RuntimeSetupError(
            f"ports {base} to {base + max(per_node) - 1} (SLURM_STEP_RESV_PORTS or {PORT_BASE_VARIABLE}, one per task "
            "of a node) go past 65535; reserve lower ports"
        )
    workers = [f"{host}:{base + slot}" for host, count in zip(hosts, per_node) for slot in range(count)]
    _check_block_placement(environ, hosts, per_node, rank)
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}})


def _check_block_placement(environ: Mapping[str, str], hosts: list[str], per_node: list[int], rank: int) -> None:
    """This task runs on the node block placement puts it on (else the addresses are wrong)."""
    if "SLURM_NODEID" not in environ:
        return
    node = _slurm_int(environ, "SLURM_NODEID", minimum=0)
    expected = next(index for index, end in enumerate(_running_sum(per_node)) if rank < end)
    if node != expected:
        raise RuntimeSetupError(
            f"task {rank} runs on node {node} of the step, but block placement puts it on node {expected} "
            f"({hosts[expected]}); start with `srun --distribution=block` (Slurm's default)"
        )


def _running_sum(values: list[int]) -> list[int]:
    total, sums = 0, []
    for value in values:
        total += value
        sums.append(total)
    return sums


def _port_base(environ: Mapping[str, str]) -> int:
    reserved = environ.get("SLURM_STEP_RESV_PORTS")
    if reserved:
        first = reserved.split(",")[0].split("-")[0]
        if not files.digits(first):
            raise RuntimeSetupError(f"SLURM_STEP_RESV_PORTS={reserved!r} is not a port range like 12000-12015")
        return int(first)
    if PORT_BASE_VARIABLE in environ:
        return _slurm_int(environ, PORT_BASE_VARIABLE, minimum=1, maximum=65_000)
    return DEFAULT_PORT_BASE


def _slurm_int(environ: Mapping[str, str], name: str, minimum: int, maximum: int | None = None) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeSetupError(f"{name}={raw[:40]!r} is not a whole number; is this a Slurm step (srun)?") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise RuntimeSetupError(f"{name}={value} must be {bound}")
    return value


def _slurm_list(environ: Mapping[str, str], name: str, expand) -> list:
    raw = environ.get(name)
    if not raw:
        raise RuntimeSetupError(f"{name} is not set, but SLURM_STEP_NUM_TASKS is: start the trainer with srun")
    try:
        values = expand(raw)
    except (ValueError, IndexError) as err:
        raise RuntimeSetupError(f"{name}={raw[:60]!r} cannot be read ({str(err)[:80]})") from None
    if not values:
        raise RuntimeSetupError(f"{name}={raw[:60]!r} names nothing")
    return values


def adopt_slurm_cluster(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Inside a multi-task `srun` step without $TF_CONFIG, write $TF_CONFIG from Slurm's
    variables (before TensorFlow reads it); returns whether it did."""
    if environ.get("TF_CONFIG") or slurm_tasks(environ) <= 1:
        return False
    environ["TF_CONFIG"] = slurm_tf_config(environ)
    return True
