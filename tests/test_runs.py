"""Runs that never collide (#28 item 1): the folder a config lands in without --workdir, the
config history a resume with changed settings keeps, and `--from` (a new run from another
run's weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import REPO, made_once, smoke_config
from tests.test_safety import assert_one_error
from trainer.checkpoint_files import checkpoint_steps
from trainer.config import load_config, save_config
from trainer.errors import WorkdirBusyError
from trainer.runs import WorkdirChoice, check_still_free, default_workdir, training_differences
from trainer.training import train
from trainer.workdir import Workdir

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _iterations(workdir, step: int) -> int:
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / f"ckpt-{step}"))
    return int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


# --- which folder: pure, on folders made by hand ----------------------------------------------


def test_what_is_trained_leaves_out_where_it_runs_how_it_is_kept_and_where_it_stops():
    plain = smoke_config()
    elsewhere = smoke_config(
        "runtime.cpu_replicas=2", "checkpoint.every_steps=1", "tensorboard.profile_steps=2:3", "train.max_steps=4"
    )
    assert training_differences(plain, elsewhere) == []
    # Where early stopping stops is where it stops too: "raise train.early_stopping_patience
    # to train on" resumes the run that stopped, not a new one in runs/NAME-2.
    patient = smoke_config("train.early_stopping_patience=2", "train.early_stopping_min_delta=0.01")
    assert training_differences(smoke_config("train.early_stopping_patience=1"), patient) == []
    assert training_differences(plain, smoke_config("optimizer.learning_rate=0.01", "train.epochs=5")) == [
        ("optimizer.learning_rate", "0.02", "0.01"),
        ("train.epochs", "3", "5"),
    ]


def _holding(folder, *overrides: str):
    folder.mkdir(parents=True)
    save_config(smoke_config(*overrides), folder / "config.yaml")


def test_the_default_folder_is_the_first_free_one_or_the_one_holding_this_config(tmp_path):
    base = str(tmp_path / "smoke")
    assert default_workdir(smoke_config(), base).workdir == base  # nothing there yet
    _holding(tmp_path / "smoke", "data.batch_size=32")
    _holding(tmp_path / "smoke-2", "model.width=8")
    choice = default_workdir(smoke_config(), base)
    assert choice.workdir == f"{base}-3"
    assert choice.note == (
        f"{base} holds a run of another config (data.batch_size 32 -> 64); {base}-2 is taken too: training in {base}-3"
    )
    # The run of this config, resumed where it is (other devices and a longer cut count as the same run).
    choice = default_workdir(smoke_config("model.width=8", "runtime.cpu_replicas=2", "train.max_steps=9"), base)
    assert choice.workdir == f"{base}-2"
    assert choice.note == (
        f"{base} holds a run of another config (data.batch_size 32 -> 64, model.width 16 -> 8): training in {base}-2"
    )
    assert default_workdir(smoke_config("data.batch_size=32"), base) == WorkdirChoice(base)
    # --from starts a new run: a free folder, whatever the others hold.
    assert default_workdir(smoke_config("data.batch_size=32"), base, new_run=True).workdir == f"{base}-3"
    # A run started from other weights is that run's alone.
    (tmp_path / "smoke" / "started_from.json").write_text("{}")
    assert default_workdir(smoke_config("data.batch_size=32"), base).workdir == f"{base}-3"


def test_the_default_folder_passes_over_what_no_run_could_use(tmp_path):
    """A file, a broken link, a link loop and a folder of someone else's files are not free:
    choosing them would end in an error (or a dry run saying 'new') instead of the next folder."""
    base = str(tmp_path / "smoke")
    _holding(tmp_path / "smoke", "data.batch_size=32")
    (tmp_path / "smoke-2").write_text("a file")
    (tmp_path / "smoke-3").symlink_to(tmp_path / "nowhere")
    (tmp_path / "smoke-4").symlink_to(tmp_path / "smoke-4")
    (tmp_path / "smoke-5").mkdir()
    (tmp_path / "smoke-5" / "notes.txt").write_text("mine")
    (tmp_path / "smoke-6").mkdir()  # empty: free
    choice = default_workdir(smoke_config(), base)
    assert choice.workdir == f"{base}-6"
    assert f"{base}-2, {base}-3, {base}-4 and 1 more are taken too" in choice.note


def test_a_chosen_folder_another_launch_trained_in_meanwhile_is_refused_once_held(tmp_path):
    """Two launches at once may both choose the same free folder; the one that holds it
    second finds the other's run there and stops, writing nothing, instead of resuming it."""
    base = str(tmp_path / "smoke")
    first, second = smoke_config("train.max_steps=2", "data.batch_size=32"), smoke_config("train.max_steps=2")
    assert default_workdir(first, base).workdir == default_workdir(second, base).workdir == base
    train(first, base, echo=lambda _: None, chosen_workdir=True)

    def written():  # the lock file aside: holding the workdir writes the holder's pid there
        paths = (tmp_path / "smoke").rglob("*")
        return sorted((path.name, path.stat().st_mtime_ns) for path in paths if path.name != ".lock")

    before = written()
    with pytest.raises(WorkdirBusyError, match="another launch took it since: it now holds a run of another config"):
        train(second, base, echo=lambda _: None, chosen_workdir=True)
    with pytest.raises(WorkdirBusyError, match="another launch took it since: it now holds a run "):
        check_still_free(Workdir(base), first, new_run=True)  # a --from run never resumes one
    assert written() == before
    check_still_free(Workdir(base), first)  # its own run: resumed


# --- through launch train ----------------------------------------------------------------------


def test_runs_of_one_config_with_other_settings_never_resume_each_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default workdir is runs/<config name>, relative
    first = _run("train", "--config", SMOKE, "--set", "train.max_steps=2")
    assert first.exit_code == 0, first.output
    assert "holds a run" not in first.output and "Resuming" not in first.output
    other = _run("train", "--config", SMOKE, "--set", "train.max_steps=2", "--set", "data.batch_size=32")
    assert other.exit_code == 0, other.output
    assert other.output.splitlines()[0] == (
        "runs/smoke holds a run of another config (data.batch_size 64 -> 32): training in runs/smoke-2"
    )
    assert "Resuming" not in other.output
    assert load_config(tmp_path / "runs" / "smoke-2" / "config.yaml").data.batch_size == 32
    assert load_config(tmp_path / "runs" / "smoke" / "config.yaml").data.batch_size == 64
    # The same config again resumes its own folder, each of them.
    again = _run("train", "--config", SMOKE, "--set", "train.max_steps=2")
    assert again.exit_code == 0, again.output
    assert "holds a run" not in again.output
    assert "Resuming from runs/smoke/checkpoints/ckpt-2 at step 2" in again.output and "nothing to do" in again.output
    other_again = _run("train", "--config", SMOKE, "--set", "train.max_steps=2", "--set", "data.batch_size=32")
    assert other_again.exit_code == 0, other_again.output
    assert "training in runs/smoke-2" in other_again.output
    assert "Resuming from runs/smoke-2/checkpoints/ckpt-2 at step 2" in other_again.output
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["smoke", "smoke-2"]


def test_a_resume_with_a_new_learning_rate_says_so_and_keeps_the_earlier_config(tmp_path):
    train(smoke_config("train.max_steps=2"), tmp_path, echo=lambda _: None)
    lines: list[str] = []
    train(smoke_config("train.max_steps=4", "optimizer.learning_rate=0.01"), tmp_path, echo=lines.append)
    kept = tmp_path / "config-2.yaml"
    assert (
        "Resuming with changed settings: optimizer.learning_rate 0.02 -> 0.01, train.max_steps 2 -> 4 "
        f"(the config up to step 2 is kept in {kept})"
    ) in lines
    assert load_config(kept).optimizer.learning_rate == 0.02
    assert load_config(tmp_path / "config.yaml").optimizer.learning_rate == 0.01
    lines.clear()  # the same settings again: nothing changed, nothing kept
    train(smoke_config("train.max_steps=4", "optimizer.learning_rate=0.01"), tmp_path, echo=lines.append)
    assert not any("changed settings" in line for line in lines)
    assert sorted(path.name for path in tmp_path.glob("config*.yaml")) == ["config-2.yaml", "config.yaml"]
    # --fresh starts over: the history of the run it replaces goes with its checkpoints.
    train(smoke_config("train.max_steps=2"), tmp_path, fresh=True, echo=lambda _: None)
    assert sorted(path.name for path in tmp_path.glob("config*.yaml")) == ["config.yaml"]


# --- --from ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A smoke run trained to step 4, only read by the tests (made once per test run)."""

    def make(folder):
        result = _run("train", "--config", SMOKE, "--workdir", folder / "source", "--set", "train.max_steps=4")
        assert result.exit_code == 0, result.output

    return made_once(tmp_path_factory, "runs-from-source", make) / "source"


def test_from_starts_a_new_run_with_the_other_runs_weights_and_its_own_optimizer(tmp_path, source):
    from trainer.inference import load_trained_model

    target = tmp_path / "target"
    # Another seed (another random start) and a learning rate too small to move the weights.
    settings = ("--set", "seed=1", "--set", "optimizer.learning_rate=1e-9", "--set", "train.max_steps=2")
    result = _run("train", "--config", SMOKE, "--workdir", target, "--from", source, *settings)
    assert result.exit_code == 0, result.output
    assert f"Starting from the weights of {source} at step 4" in result.output
    assert "Resuming" not in result.output
    assert checkpoint_steps(target / "checkpoints") == [2]  # from step 0
    assert _iterations(source, 4) == 4 and _iterations(target, 2) == 2  # its own optimizer
    trained, _, _ = load_trained_model(source)
    started, _, _ = load_trained_model(target)
    for before, after in zip(trained.weights, started.weights, strict=True):
        np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6, err_msg=before.path)
    assert json.loads((target / "started_from.json").read_text()) == {
        "workdir": str(source),
        "checkpoint": "latest",
        "step": 4,
    }
    # The plan of such a run says it too, and writes nothing.
    plan = _run("train", "--config", SMOKE, "--workdir", tmp_path / "planned", "--from", f"{source}:4", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert f"Weights:  the weights of {source} at step 4 (a new run: step 0, its own optimizer)" in plan.output
    assert not (tmp_path / "planned").exists()


def test_from_the_best_checkpoint_takes_its_weights(tmp_path, source):
    """The best checkpoint is written by Checkpoint.write (no save counter): it restores too."""
    best = json.loads((source / "checkpoints" / "best" / "best.json").read_text())["step"]
    plan = _run("train", "--config", SMOKE, "--workdir", tmp_path / "planned", "--from", f"{source}:best", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert f"Weights:  the weights of {source} at step {best} (a new run" in plan.output
    assert not (tmp_path / "planned").exists()
    narrow = _run(
        "train", "--config", SMOKE, "--workdir", tmp_path / "n", "--from", f"{source}:best", "--set", "model.width=8"
    )
    assert_one_error(narrow, f"--from {source}: its checkpoint at step {best}", "(model.width 16 -> 8)")


def test_from_a_run_of_another_width_is_one_line_naming_both_workdirs(tmp_path, source):
    target = tmp_path / "narrow"
    result = _run("train", "--config", SMOKE, "--workdir", target, "--from", source, "--set", "model.width=8")
    assert_one_error(result, f"--from {source}: its checkpoint at step 4", f"for {target}", "(model.width 16 -> 8)")
    assert not target.exists()


def test_from_into_a_workdir_holding_a_run_is_refused(tmp_path, source):
    target = tmp_path / "trained"
    assert _run("train", "--config", SMOKE, "--workdir", target, "--set", "train.max_steps=2").exit_code == 0
    before = sorted(path.name for path in target.rglob("*"))
    result = _run("train", "--config", SMOKE, "--workdir", target, "--from", source)
    assert_one_error(result, f"{target} holds a run to resume (checkpoint at step 2)", "use --fresh", "--workdir")
    assert sorted(path.name for path in target.rglob("*")) == before
    assert_one_error(_run("train", "--config", SMOKE, "--workdir", source, "--from", source), "is the workdir this run")
    missing = _run("train", "--config", SMOKE, "--workdir", tmp_path / "new", "--from", f"{source}:3")
    assert_one_error(missing, f"--from {source}:3: no such checkpoint", "(steps available: 4)")
    # A step no checkpoint can have: one short line, not the 5,000 digits echoed as a folder's name, thrice.
    huge = _run("train", "--config", SMOKE, "--workdir", tmp_path / "new", "--from", f"{source}:{'9' * 5000}")
    assert len(assert_one_error(huge, "a step of 5,000 digits is no checkpoint's")) < 300
    assert not (tmp_path / "new").exists()
