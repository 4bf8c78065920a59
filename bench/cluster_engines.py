"""Two worker processes started three ways: `--workers 2`, as a TFJob (TF_CONFIG with a
chief and a worker) and as Slurm's `srun -n 2` (SLURM_* variables): img/s of each and
whether their final weights are the same (deterministic ops, same seed, CPU).

    python bench/cluster_engines.py [--steps 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.launcher import free_ports  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def _overrides(steps: int) -> list[str]:
    return [
        "model.name=resnet_small",
        "model.width=16",
        "data.batch_size=64",
        "data.synthetic_train_size=4096",
        f"train.max_steps={steps}",
        "train.steps_per_loop=8",
        "runtime.deterministic=true",
        "tensorboard.images=false",
    ]


def _command(workdir: str, steps: int, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "launch", "train", "--config", SMOKE, "--workdir", workdir, *extra]
    for override in _overrides(steps):
        command += ["--set", override]
    return command


def _speed(output: str) -> float:
    return float(re.search(r"speed\s+([\d.]+) img/s", output).group(1))


def _base_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "TF_CONFIG"}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _two(workdir: str, steps: int, environments: list[dict[str, str]]) -> str:
    processes = [
        subprocess.Popen(
            _command(workdir, steps),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**_base_env(), **extra},
        )
        for extra in environments
    ]
    outputs = [process.communicate(timeout=1800)[0] for process in processes]
    for process, output in zip(processes, outputs):
        if process.returncode:
            raise SystemExit(output)
    return outputs[0]


def local_workers(workdir: str, steps: int) -> str:
    result = subprocess.run(
        _command(workdir, steps, "--workers", "2"), capture_output=True, text=True, env=_base_env(), check=True
    )
    return result.stdout


def tfjob(workdir: str, steps: int) -> str:
    chief, worker = free_ports(2)
    cluster = {"chief": [f"localhost:{chief}"], "worker": [f"localhost:{worker}"]}
    return _two(
        workdir,
        steps,
        [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": job, "index": 0}})} for job in cluster],
    )


def slurm(workdir: str, steps: int) -> str:
    base = free_ports(1)[0]
    if base >= 65_000:
        base -= 1000
    common = {
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_RESV_PORTS": f"{base}-{base + 1}",
    }
    return _two(workdir, steps, [{**common, "SLURM_PROCID": str(rank)} for rank in range(2)])


def _final_weights(workdir: str, steps: int) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(f"{workdir}/checkpoints/ckpt-{steps}")
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith(("model/", "optimizer/_trainable_variables/"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory() as root:
        reference = None
        for round_ in range(args.rounds):
            for name, run in (("--workers 2", local_workers), ("TFJob", tfjob), ("Slurm", slurm)):
                workdir = f"{root}/{name.strip('-').split()[0]}-{round_}"
                speed = _speed(run(workdir, args.steps))
                weights = _final_weights(workdir, args.steps)
                reference = reference or weights
                same = all(np.array_equal(weights[key], value) for key, value in reference.items())
                line = f"round {round_ + 1} {name:12s} {speed:6.0f} img/s  final weights == first run: {same}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
