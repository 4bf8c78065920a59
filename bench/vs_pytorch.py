"""airbench94's step: `launch train` (its real pipeline) vs the same net in PyTorch, alternating.

Issue #26 asks for our step to match PyTorch's on a small CPU. The two sides run in their
own processes, one after the other (ours, torch, ours, torch, ...), so neither shares the
two cores with the other:

- ours: `launch train --config configs/cifar10_airbench94.yaml` (or --config), float32,
  `--steps` steps in calls of `--window`; the img/s of every window after the first
  (tracing, the decode of the data and the whitening init are in the first) is kept.
- torch: the same network (2x2 whitening conv, frozen; groups of 64/256/256 channels of
  conv-pool-BN-GELU-conv-BN-GELU; global max pool; /9; linear head) with the same
  optimizer (SGD, Nesterov, label smoothing), float32, channels-last, on one batch kept
  in memory (no input pipeline at all), after 2 warm-up steps.

PyTorch is not a dependency of the project: install the CPU build where the bench runs,
`pip install torch==2.13.0` (`pip install -e .[bench-torch]`), or point --torch-python at an
interpreter that has it. Prints each run's img/s and the ratio of the best runs.

    CIFAR10_DIR=../shared/data/cifar10 python bench/vs_pytorch.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_WINDOW_SPEED = re.compile(r"img/s: ([0-9.]+)")


def _torch_side(batch: int, width: int, steps: int, threads: int) -> float:
    """img/s of the net's training steps in PyTorch on one in-memory batch (runs in a child)."""
    import time

    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def group(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(cout, momentum=0.4, eps=1e-5),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, momentum=0.4, eps=1e-5),
            nn.GELU(),
        )

    whiten = nn.Conv2d(3, 24, 2, bias=True)
    whiten.requires_grad_(False)
    body = nn.Sequential(whiten, nn.GELU(), group(24, width), group(width, 4 * width), group(4 * width, 4 * width))
    head = nn.Linear(4 * width, 10, bias=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(torch.amax(body(x), dim=(2, 3)) / 9)

    params = [p for p in list(body.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.85, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    body.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(forward(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def run_torch(python: str, batch: int, width: int, steps: int, threads: int) -> float:
    code = (
        "import sys; sys.path.insert(0, {bench!r}); import vs_pytorch; "
        "print('TORCH', vs_pytorch._torch_side({batch}, {width}, {steps}, {threads}))"
    ).format(bench=str(ROOT / "bench"), batch=batch, width=width, steps=steps, threads=threads)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split("TORCH")[-1])


def run_ours(config: str, batch: int, steps: int, window: int, extra: list[str]) -> float:
    """The best window's img/s after the first, from `launch train`'s console lines."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable, "-m", "launch", "train", "--config", config, "--workdir", workdir,
            "--set", f"data.batch_size={batch}", "--set", f"train.max_steps={steps}",
            "--set", f"train.steps_per_loop={window}", "--set", "runtime.precision=float32",
            "--set", "eval.tta=none", "--set", "tensorboard.images=false",
            *[arg for pair in extra for arg in ("--set", pair)],
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    windows = [float(speed) for speed in _WINDOW_SPEED.findall(out)][1:]
    if not windows:
        raise SystemExit(f"no img/s windows after the first in:\n{out[-2000:]}")
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10_airbench94.yaml")
    parser.add_argument("--width", type=int, default=64, help="the config's model.width (for the torch net)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24, help="our steps per run (the first window left out)")
    parser.add_argument("--window", type=int, default=6, help="our steps per compiled call")
    parser.add_argument("--torch-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-python", default=sys.executable, help="an interpreter with torch installed")
    parser.add_argument("--set", action="append", default=[], help="more overrides for our side")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    ours_runs, torch_runs = [], []
    for repeat in range(args.repeats):
        ours_runs.append(run_ours(args.config, args.batch, args.steps, args.window, args.set))
        torch_runs.append(run_torch(args.torch_python, args.batch, args.width, args.torch_steps, threads))
        print(f"run {repeat + 1}: ours {ours_runs[-1]:.1f} img/s, torch {torch_runs[-1]:.1f} img/s", flush=True)
    print(
        f"best: ours {max(ours_runs):.1f}, torch {max(torch_runs):.1f} img/s: "
        f"{max(ours_runs) / max(torch_runs):.2f}x (batch {args.batch}, float32, {threads} threads)"
    )


if __name__ == "__main__":
    main()
