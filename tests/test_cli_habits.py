"""CLI habits a Keras/Lightning user has (#28 item 4): `--version`, usage errors as one
`Error:` line, `train --dry-run` (checks everything, writes nothing) and shell completion."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from launch.cli import _Group, cli
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")
_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _run(*args, command=cli):
    return CliRunner().invoke(command, [str(a) for a in args], prog_name="launch")


def _launch_command() -> list[str]:
    """The installed `launch` script beside this Python, else `python -m launch`."""
    script = Path(sys.executable).parent / "launch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launch"]


# --- --version -----------------------------------------------------------------------------


def test_version_names_ours_tensorflows_and_keras_without_importing_tensorflow():
    script = (
        "import sys\nfrom launch.cli import main\nsys.argv = ['launch', '--version']\n"
        "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
        "print('exit', code, 'tensorflow imported:', 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_ENV, timeout=60)
    first, last = done.stdout.splitlines()
    assert last == "exit 0 tensorflow imported: False", done.stdout + done.stderr
    tensorflow = next(
        version
        for name in ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tensorflow-macos")
        if (version := _installed(name))
    )
    assert (
        first == f"launch {metadata.version('tf-dist-trainer')} (TensorFlow {tensorflow}, Keras {_installed('keras')})"
    )
    assert done.stderr == ""


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_version_falls_back_to_pyproject_when_the_package_is_not_installed(monkeypatch):
    from launch import version

    def nothing_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.metadata, "version", nothing_installed)
    expected = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert version.own_version() == expected
    assert version.version_line() == f"launch {expected} (TensorFlow not installed, Keras not installed)"


# --- usage errors: one line ------------------------------------------------------------------


@click.group(cls=_Group)
def _tool() -> None:
    """A stand-in group: `launch` has no click.Choice option, the error is click's own."""


@_tool.command("go")
@click.option("--mode", type=click.Choice(["fast", "safe"]))
def _go(mode: str) -> None:
    pass


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("train", "--config", SMOKE, "--bogus"), "No such option '--bogus'. Try 'launch train --help'."),
        (
            ("train", "--config", SMOKE, "--workdri", "x"),
            "No such option '--workdri'. (Did you mean one of: '--workdir', '--workers'?) Try 'launch train --help'.",
        ),
        (("--xyz",), "No such option '--xyz'. Try 'launch --help'."),
        (("trian",), "No such command 'trian'. Did you mean 'train'? Try 'launch --help'."),
        (("data", "shwo"), "No such command 'shwo'. Did you mean 'show'? Try 'launch data --help'."),
        (("predict", "--workdir", "w"), "Missing argument 'IMAGES...'. Try 'launch predict --help'."),
        (("data", "show", "--config", SMOKE), "Missing option '--out'. Try 'launch data show --help'."),
        (
            ("train", "--config", SMOKE, "--workers", "0"),
            "Invalid value for '--workers': 0 is not in the range 1<=x<=64. Try 'launch train --help'.",
        ),
        (("train", "--config", SMOKE, "--set"), "Option '--set' requires an argument. Try 'launch train --help'."),
    ],
)
def test_usage_errors_are_one_error_line_with_the_help_hint(args, line):
    result = _run(*args)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {line}\n"
    assert result.stdout == ""


def test_a_bad_choice_is_one_error_line():
    result = _run("go", "--mode", "quick", command=_tool)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: Invalid value for '--mode': 'quick'")
    assert "'fast'" in result.stderr and result.stderr.endswith(" Try 'launch go --help'.\n")


def test_a_usage_error_through_the_launch_process_is_one_line():
    done = subprocess.run([*_launch_command(), "trian"], capture_output=True, text=True, env=_ENV, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "Error: No such command 'trian'. Did you mean 'train'? Try 'launch --help'.\n"


def test_a_group_alone_still_shows_its_help():
    for args in ((), ("data",)):
        result = _run(*args)
        assert result.exit_code == 2 and "Usage: launch" in result.output and "Commands:" in result.output


# --- shell completion ------------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "mark"), [("bash", "_launch_completion"), ("zsh", "#compdef launch"), ("fish", "")])
def test_shell_completion_scripts(shell, mark):
    env = {**_ENV, "_LAUNCH_COMPLETE": f"{shell}_source"}
    done = subprocess.run(_launch_command(), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert mark in done.stdout and "_LAUNCH_COMPLETE" in done.stdout


def test_bash_completion_completes_commands_and_options():
    env = {**_ENV, "_LAUNCH_COMPLETE": "bash_complete", "COMP_WORDS": "launch tr", "COMP_CWORD": "1"}
    done = subprocess.run(_launch_command(), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "plain,train" in done.stdout.splitlines()
    env.update(COMP_WORDS="launch train --dry", COMP_CWORD="2")
    done = subprocess.run(_launch_command(), capture_output=True, text=True, env=env, timeout=60)
    assert "plain,--dry-run" in done.stdout.splitlines()


# --- train --dry-run ---------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (hidden ones too) with its mtime, and a file's bytes."""
    entries = {".": (folder.stat().st_mtime_ns, None)}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        entries[str(path.relative_to(folder))] = (stat.st_mtime_ns, path.read_bytes() if path.is_file() else None)
    return entries


def _dry_run(workdir: Path, *args: str):
    return _run("train", "--config", SMOKE, "--workdir", workdir, "--dry-run", *args)


def test_dry_run_of_a_new_workdir_prints_the_plan_and_creates_nothing(tmp_path):
    before = sorted(os.listdir(tmp_path))
    result = _dry_run(tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == before == []
    lines = result.stdout.splitlines()
    assert lines[0] == "Dry run: nothing was written or created."
    assert re.fullmatch(r"Strategy: auto: OneDeviceStrategy on /cpu:0 .*; XLA off; 1 replica\(s\)", lines[1])
    assert lines[2] == "Steps:    16 per epoch (global batch 64) x 3 epoch(s) = 48 steps"
    assert lines[3] == "Data:     synthetic (seed 0): 1024 train / 256 test images, 10 classes, at 32x32"
    assert re.fullmatch(r"Model:    paper_cnn, (\d{3},\d{3}) parameters \(\1 trainable\), \d+\.\d MB float32", lines[4])
    assert lines[5] == f"Workdir:  {tmp_path / 'run'}: new: it would be created, and training would start at step 0"
    assert lines[6].startswith("Files:    config.yaml, dataset.json, metrics.json, checkpoints/ and tensorboard/")


def test_dry_run_of_a_trained_workdir_says_where_it_resumes_and_changes_nothing(tmp_path):
    workdir = tmp_path / "run"
    trained = _run("train", "--config", SMOKE, "--workdir", workdir, "--set", "train.max_steps=2")
    assert trained.exit_code == 0, trained.output
    listing, before = sorted(os.listdir(tmp_path)), _snapshot(tmp_path)
    assert "run/.lock" in before and "run/checkpoints/ckpt-2.index" in before

    resumed = _dry_run(workdir)
    assert resumed.exit_code == 0, resumed.output
    assert f"Workdir:  {workdir}: would resume from its checkpoint at step 2 and train to step 48" in resumed.stdout
    done = _dry_run(workdir, "--set", "train.max_steps=2")
    assert (
        "Steps:    16 per epoch (global batch 64) x 3 epoch(s) = 48 steps, cut to 2 by train.max_steps" in done.stdout
    )
    assert "its checkpoint at step 2 already reaches step 2: nothing to train" in done.stdout
    fresh = _dry_run(workdir, "--fresh")
    assert "--fresh would delete its checkpoints (newest: step 2), TensorBoard events and metrics" in fresh.stdout
    # A checkpoint of another model is refused, as the real run refuses it (before writing).
    mismatch = _dry_run(workdir, "--set", "model.width=8")
    assert mismatch.exit_code == 2 and mismatch.output.count("\n") == 1
    assert "holds a run this config cannot continue" in mismatch.output and "model.width 16 -> 8" in mismatch.output

    with open(workdir / ".lock", "rb") as held:  # as a running trainer holds it (read only: nothing changes)
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = _dry_run(workdir)
    assert busy.exit_code == 0, busy.output
    assert f"Busy:     {workdir} is in use by another trainer" in busy.stdout
    assert "a real run would stop here, exit code 2" in busy.stdout
    assert "would resume from its checkpoint at step 2" in busy.stdout

    assert sorted(os.listdir(tmp_path)) == listing
    assert _snapshot(tmp_path) == before  # every file byte for byte, every mtime, no new entry


def test_dry_run_plans_one_process_and_starts_nothing(tmp_path):
    for flag, message in (
        (("--workers", "2"), "--dry-run checks one process: leave out --workers"),
        (("--tensorboard",), "--dry-run starts nothing: leave out --tensorboard"),
    ):
        result = _dry_run(tmp_path / "run", *flag)
        assert result.exit_code == 2 and result.output.startswith(f"Error: {message}")
        assert result.output.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_broken_link_is_refused_by_the_dry_run_as_by_the_run(tmp_path):
    """It was planned as 'new: it would be created'; the run then failed at its first write
    (File exists), once its data was read. A link loop is the same."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for name in ("dangling", "loop"):
        for extra in ((), ("--dry-run",)):
            result = _run("train", "--config", SMOKE, "--workdir", tmp_path / name, *extra)
            assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
            assert result.output.startswith(f"Error: --workdir {tmp_path / name} is a symbolic link to ")
    assert sorted(os.listdir(tmp_path)) == ["dangling", "loop"]
