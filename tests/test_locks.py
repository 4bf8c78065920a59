"""One workdir, one writer: two exports at once (#24 item 2) and the lock's fault injection:
two trainers and an export started in random orders and spellings (#24, deliverable 3)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from launch.cli import cli
from tests import test_safety
from tests.conftest import REPO
from tests.test_safety import assert_one_error
from trainer import files
from trainer.checkpoints import checkpoint_steps
from trainer.errors import WorkdirBusyError

trained_once = test_safety.trained_once
SMOKE = str(REPO / "configs" / "smoke.yaml")


class _Process:
    """A `python -m launch ...` whose output lines are timestamped as they come."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        env.pop("TF_CONFIG", None)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "launch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: list[tuple[float, str]] = []
        self.ended = 0.0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append((time.monotonic(), line))

    def wait(self, timeout: float = 300) -> int:
        code = self.popen.wait(timeout)
        self.ended = time.monotonic()
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, fragment: str) -> float | None:
        return next((when for when, line in self.lines if fragment in line), None)


def _export_is_whole(workdir: Path) -> None:
    export = workdir / "export"
    assert sorted(p.name for p in export.iterdir()) == ["_SUCCESS", "labels.txt", "model.keras", "saved_model"]
    assert (export / "saved_model" / "saved_model.pb").stat().st_size > 0
    with zipfile.ZipFile(export / "model.keras") as archive:
        assert archive.testzip() is None
    assert not list(workdir.glob(".export.tmp-*"))


def test_a_second_writer_of_a_folder_is_refused_and_the_first_one_finishes(tmp_path):
    """Item 2, at its cause: the second writer deleted the first one's live temporary
    folder as a leftover; now it is refused before it touches anything."""
    target = tmp_path / "export"
    with files.replacing_folder(target) as first:
        (first / "model.keras").write_text("first")
        with (
            pytest.raises(WorkdirBusyError, match=rf"{target} is being written by another process \(pid {os.getpid()}"),
            files.replacing_folder(target),
        ):
            pass
        assert (first / "model.keras").read_text() == "first"
    assert (target / "model.keras").read_text() == "first"
    with files.replacing_folder(target) as second:  # the lock went with the first writer
        (second / "model.keras").write_text("second")
    assert (target / "model.keras").read_text() == "second"


def test_two_exports_at_once_leave_a_whole_export_and_the_second_says_so(trained, tmp_path):
    """Item 2 through the CLI: the first export is paused (SIGSTOP) once its temporary
    folder exists, a second one runs meanwhile, then the first is resumed."""
    first = _Process(["export", "--workdir", str(trained)], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(trained.glob(".export.tmp-*")):
        assert first.popen.poll() is None and time.monotonic() < deadline, first.output
        time.sleep(0.02)
    first.popen.send_signal(signal.SIGSTOP)
    try:
        second = CliRunner().invoke(cli, ["export", "--workdir", f"file://{trained}"])
    finally:
        first.popen.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.output
    assert "Exported step 16" in first.output
    assert_one_error(second, "is being written by another process", f"pid {first.popen.pid}")
    _export_is_whole(trained)


def _spellings(workdir: Path, cwd: Path) -> list[str]:
    link = cwd / "link-to-run"
    if not link.exists():
        link.symlink_to(workdir)
    return [str(workdir), f"file://{workdir}", str(link), os.path.relpath(workdir, cwd)]


@dataclass(frozen=True)
class _Round:
    """One round's draws: the trainers' and the export's spellings (indices into
    `_spellings`), whether B starts with --fresh, the start order and the pause after each start."""

    spelling: dict[str, int]
    fresh: bool
    order: list[str]
    pauses: list[float]


def _drawn_rounds(count: int) -> list[_Round]:
    """The first `count` rounds drawn from LOCK_ROUNDS_SEED (24): drawn up front, so a
    slice of them (one test of the slow suite) is the same rounds whichever test runs it."""
    rng = random.Random(int(os.environ.get("LOCK_ROUNDS_SEED", "24")))
    rounds = []
    for _ in range(count):
        fresh = rng.random() < 0.5
        spelling = {name: rng.randrange(4) for name in ("A", "B", "E")}
        order = rng.sample(["A", "B", "E"], 3)
        rounds.append(_Round(spelling, fresh, order, [rng.uniform(0, 1.5) for _ in order]))
    return rounds


def _one_round(plan: _Round, trained_once: Path, tmp_path: Path) -> str:
    """Two trainers (B with --fresh in the rounds that draw it) and an export on one workdir,
    spelled as drawn, started in the drawn order a drawn moment apart. Returns what happened."""
    workdir = Path(shutil.copytree(trained_once, tmp_path / "run"))
    (workdir / "notes.txt").write_text("mine")
    spellings = _spellings(workdir, tmp_path)
    fresh = plan.fresh
    commands = {
        "A": ["train", "--config", SMOKE, "--workdir", spellings[plan.spelling["A"]], "--set", "train.max_steps=24"],
        "B": ["train", "--config", SMOKE, "--workdir", spellings[plan.spelling["B"]], "--set", "train.max_steps=24"]
        + (["--fresh"] if fresh else []),
        "E": ["export", "--workdir", spellings[plan.spelling["E"]]],
    }
    order = plan.order
    processes = {}
    for name, pause in zip(order, plan.pauses, strict=True):
        processes[name] = _Process(commands[name], cwd=tmp_path)
        time.sleep(pause)
    codes = {name: process.wait() for name, process in processes.items()}
    trainers = [processes["A"], processes["B"]]

    if codes["E"] == 0 or (workdir / "export").exists():
        _export_is_whole(workdir)
    if codes["E"] != 0:  # only a --fresh deleting the checkpoint it was reading may stop it, in one line
        assert fresh and codes["E"] == 2 and "Traceback" not in processes["E"].output, processes["E"].output
    for name in ("A", "B"):
        output = processes[name].output
        assert codes[name] == 0 or (codes[name] == 2 and "is in use by another trainer" in output), output
    ran = [p for p in trainers if p.popen.returncode == 0 and p.first("Input:") is not None]
    assert ran, "neither trainer ran"
    if len(ran) == 2:  # both trained: one after the other, never at once
        (first, second) = sorted(ran, key=lambda p: p.first("Input:"))
        assert first.ended <= second.first("Input:"), (first.output, second.output)
    refused = [p for p in trainers if p.popen.returncode == 2]
    for process in refused:  # a refused --fresh removed nothing
        assert "--fresh: removed" not in process.output
    assert (workdir / "notes.txt").read_text() == "mine"
    assert checkpoint_steps(workdir / "checkpoints")[0] == 24
    shutil.rmtree(workdir)
    error = next((line for line in processes["E"].output.splitlines() if line.startswith("Error:")), "")
    return f"order {''.join(order)}, fresh B {fresh}, trained {len(ran)}, export exit {codes['E']} {error[:90]}"


def _rounds(first: int, stop: int, trained_once: Path, tmp_path: Path) -> list[str]:
    outcomes = []
    for index, plan in enumerate(_drawn_rounds(stop)[first:], start=first):
        folder = tmp_path / f"round-{index}"
        folder.mkdir()
        outcomes.append(f"round {index}: " + _one_round(plan, trained_once, folder))
    return outcomes


# The slow suite's 20 rounds in four tests of five: the same 20 rounds as one test of 20
# (drawn up front from the seed), but spread over the suite's workers instead of one
# 200-second test at its end.
SLOW_ROUNDS = [
    pytest.param(first, first + 5, marks=pytest.mark.slow, id=f"{first}-{first + 4}") for first in (0, 5, 10, 15)
]


@pytest.mark.parametrize(("first", "stop"), [pytest.param(0, 2, id="0-1"), *SLOW_ROUNDS])
def test_two_trainers_and_an_export_in_random_orders_and_spellings(trained_once, tmp_path, first, stop):
    outcomes = _rounds(first, stop, trained_once, tmp_path)
    print("\n".join(outcomes))
    assert len(outcomes) == stop - first


@pytest.fixture
def trained(trained_once, tmp_path) -> Path:
    return Path(shutil.copytree(trained_once, tmp_path / "run"))
