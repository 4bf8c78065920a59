"""Hostile and damaged inputs that used to end in a traceback (issue #24, items 13-15 and
the smaller ones): side files of the wrong types, YAML built to break the parser, files in
the trainer's way, ram:// workdirs, leases from a wrong clock, optimizer values out of range.

Every test is in-process and reuses test_safety's trained smoke workdir (copied).
"""

from __future__ import annotations

import fcntl
import json
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import test_safety
from tests.conftest import REPO, smoke_config
from tests.test_safety import SMOKE, assert_one_error, quiet, run_cli, snapshot
from trainer.checkpoints import CheckpointStore
from trainer.config import load_config
from trainer.errors import WorkdirBusyError, WorkdirWriteError
from trainer.lease import LEASE, Lease, check_free, read_lease
from trainer.models import build_for_dataset
from trainer.workdir import Workdir

# test_safety's smoke workdir trained to step 16, made once per run; `trained` is a copy.
trained_once, trained = test_safety.trained_once, test_safety.trained

# --- 13. side files of the wrong types ------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("change", [{"class_names": 5}, {"mean": None}])
def test_a_dataset_json_of_wrong_types_is_rebuilt_by_predict(trained, tmp_path, change):
    expected = json.loads((trained / "dataset.json").read_text())
    _edit_json(trained / "dataset.json", **change)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    result = run_cli("predict", "--workdir", str(trained), str(image))
    assert result.exit_code == 0, result.output
    key = next(iter(change))
    assert f"dataset.json is damaged ({key} must be" in result.output and f"{image}\tclass_" in result.output
    assert json.loads((trained / "dataset.json").read_text()) == expected  # rebuilt identically


_GOOD_INFO = {
    "class_names": ["cat", "dog"],
    "image_shape": [32, 32, 3],
    "mean": [125.3, 123.0, 113.9],
    "std": [63.0, 62.1, 66.7],
    "origin": "cifar10",
}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (json.dumps({**_GOOD_INFO, "class_names": []}), "class_names"),
        (json.dumps({**_GOOD_INFO, "class_names": ["cat", 7]}), "class_names"),
        (json.dumps({**_GOOD_INFO, "class_names": ["cat", "line\nbreak"]}), "class_names"),
        (json.dumps({**_GOOD_INFO, "image_shape": "32"}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "image_shape": [32]}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "image_shape": [32.5, 32, 3]}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "image_shape": [True, 32, 3]}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "image_shape": [-1, -1, 3]}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "image_shape": [10**9, 10**9, 3]}), "image_shape"),
        (json.dumps({**_GOOD_INFO, "mean": [1, 2]}), "mean"),
        (json.dumps({**_GOOD_INFO, "mean": ["a", "b", "c"]}), "mean"),
        (json.dumps({**_GOOD_INFO, "std": [0, 0, 0]}), "std"),
        (json.dumps({**_GOOD_INFO, "std": [float("nan")] * 3}), "std"),
        (json.dumps({**_GOOD_INFO, "origin": 5}), "origin"),
        ("[" * 100_000, "RecursionError"),  # json.loads recursed past the stack
        ('{"class_names": ' + "9" * 5000 + "}", "ValueError"),  # past Python's 4,300-digit limit
    ],
)
def test_every_key_of_dataset_json_is_checked_by_type_and_shape(tmp_path, text, fragment):
    (tmp_path / "dataset.json").write_text(text)
    warnings: list[str] = []
    assert Workdir(tmp_path).read_dataset_info(warnings.append) is None
    assert len(warnings) == 1 and "is damaged" in warnings[0] and fragment in warnings[0], warnings
    assert "rebuilding it from the dataset" in warnings[0] and len(warnings[0]) < 300


def test_a_valid_dataset_json_is_still_read(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(_GOOD_INFO))
    warnings: list[str] = []
    info = Workdir(tmp_path).read_dataset_info(warnings.append)
    assert info is not None and info.class_names == ["cat", "dog"] and warnings == []


def _ram_workdir() -> str:
    return f"ram://hostile-{uuid.uuid4().hex[:8]}/run"


def _write_lease(workdir: str, **changes) -> None:
    record = {
        "owner": "someone-else",
        "host": "another-host",  # so a damaged field, not a dead pid, is what frees the workdir
        "pid": 4242,
        "heartbeat": time.time(),
        "expires_after": 120,
        **changes,
    }
    _write_lease_text(workdir, json.dumps(record))


def _write_lease_text(workdir: str, text: str) -> None:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(f"{workdir}/.lease.tmp", "w") as handle:
        handle.write(text)
    tf.io.gfile.rename(f"{workdir}/.lease.tmp", f"{workdir}/{LEASE}", overwrite=True)


@pytest.mark.parametrize(
    "change",
    [
        {"host": socket.gethostname(), "pid": 99_999_999_999},  # the report: OverflowError in os.kill
        {"host": socket.gethostname(), "pid": 2**31},
        {"pid": 0},  # os.kill(0, 0) signals this process group: the lease looked alive forever
        {"pid": -1},
        {"pid": True},
        {"pid": 1.5},
        {"pid": "4242"},
        {"heartbeat": float("nan")},
        {"heartbeat": float("inf")},
        {"heartbeat": "soon"},
        {"heartbeat": 1e300},
        {"expires_after": -5},
        {"expires_after": float("inf")},
        {"owner": ["x"]},
        {"host": None},
        {"host": "two\nlines"},
    ],
)
def test_a_lease_with_fields_of_the_wrong_type_is_damaged_not_fatal(change):
    workdir = _ram_workdir()
    _write_lease(workdir, **change)
    warnings: list[str] = []
    check_free(workdir, warnings.append)  # what train and evaluate ask first
    assert not Workdir(workdir).is_busy()  # evaluate's question: is metrics.json the trainer's?
    key = next(iter(change)) if len(change) == 1 else "pid"
    assert len(warnings) == 1 and f"is damaged ({key} is not" in warnings[0], warnings
    with Lease(workdir, expires_after=600, warn=warnings.append).held():  # train takes it over
        assert read_lease(f"{workdir}/{LEASE}", quiet).pid > 0


def test_a_lease_holding_a_5000_digit_number_is_damaged_not_fatal():
    workdir = _ram_workdir()
    _write_lease_text(workdir, '{"pid": ' + "9" * 5000 + "}")
    warnings: list[str] = []
    check_free(workdir, warnings.append)
    assert len(warnings) == 1 and "is damaged (ValueError" in warnings[0]


def test_a_lease_from_a_clock_that_runs_ahead_says_so_instead_of_a_countdown():
    workdir = _ram_workdir()
    ahead = 3 * 86_400
    _write_lease(workdir, heartbeat=time.time() + ahead)
    with pytest.raises(WorkdirBusyError) as err:
        check_free(workdir, quiet)
    message = str(err.value)
    for fragment in ("pid 4242 on host another-host", "3 days ahead of this host's clock", "clocks disagree"):
        assert fragment in message, message
    assert "Check the clock" in message and f"delete {workdir}/{LEASE}" in message
    heartbeat = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + ahead))
    assert heartbeat in message and "\n" not in message


def test_a_heartbeat_thousands_of_years_ahead_is_damage_not_a_countdown():
    """The report's lease: "expires in 998204150770s". No clock reads the year 33600."""
    workdir = _ram_workdir()
    _write_lease(workdir, heartbeat=time.time() + 998_204_150_770)
    warnings: list[str] = []
    check_free(workdir, warnings.append)
    assert len(warnings) == 1 and "is damaged (heartbeat is not a time" in warnings[0]
    assert "998204150770" not in warnings[0]


def _store(workdir: Path) -> CheckpointStore:
    config = load_config(workdir / "config.yaml")
    info = Workdir(workdir).read_dataset_info(quiet)
    return CheckpointStore(workdir / "checkpoints", model=build_for_dataset(config.model, info), warn=quiet)


@pytest.mark.parametrize(
    "record",
    [
        {"step": 16.0, "accuracy": 0.5},  # named ckpt-16.0, which does not exist
        {"step": 16, "accuracy": float("nan")},  # never beaten: best/ would stop following evaluations
        {"step": 16, "accuracy": float("inf")},
    ],
)
def test_a_best_json_of_wrong_types_is_rebuilt(trained, record):
    (trained / "checkpoints" / "best" / "best.json").write_text(json.dumps(record))
    assert _store(trained).best_record == {"step": 16, "accuracy": None}


def test_evaluate_best_with_a_float_step_in_best_json_works(trained):
    _edit_json(trained / "checkpoints" / "best" / "best.json", step=16.0)
    result = run_cli("evaluate", "--workdir", str(trained), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    assert "Test accuracy" in result.output


def test_a_lock_file_with_garbage_gives_one_line(trained):
    (trained / ".lock").write_bytes(b"\xff\xfe1\nError: not a pid")
    with open(trained / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a running trainer holds it
        with pytest.raises(WorkdirBusyError) as err:
            Workdir(trained).check_not_busy(quiet)
    assert "pid unknown" in str(err.value) and "\n" not in str(err.value)


# --- 14. hostile YAML -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("seed: " + "9" * 5000 + "\n", "holds a value that cannot be read (Exceeds the limit (4300 digits)"),
        ("data:\n  path: " + "[" * 5000 + "\n", "nests lists or mappings thousands of levels deep"),
        ("{" * 5000, "nests lists or mappings thousands of levels deep"),
        ("seed: 2023-02-30\n", "holds a value that cannot be read (day is out of range"),
        ("seed: 0x" + "f" * 5000 + "\n", "seed must be between 0 and 2147483647, got <an integer of 6021 digits>"),
        ("seed: " + "9" * 4000 + "\n", "seed must be between 0 and 2147483647, got <an integer of 4000 digits>"),
        ("optimizer:\n  learning_rate: " + "9" * 400 + "\n", "optimizer.learning_rate must be a finite number"),
    ],
)
def test_hostile_yaml_is_one_short_line(tmp_path, yaml_text, fragment):
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml_text)
    line = assert_one_error(run_cli("config", "show", "--config", str(path)), fragment)
    assert len(line) < 250, len(line)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=" + "9" * 4000, "seed must be between 0 and 2147483647, got <an integer of 4000 digits>"),
        ("model.width=" + "9" * 300, "model.width must be between 1 and 4096, got <an integer of 300 digits>"),
        (
            "data.train_examples=-" + "9" * 4000,
            "data.train_examples must be >= 0, got <a negative integer of 4000 digits>",
        ),
    ],
)
def test_hostile_set_values_are_one_short_line(override, fragment):
    """README: "values echoed in an error are cut short, whatever the input"."""
    line = assert_one_error(run_cli("config", "show", "--config", SMOKE, "--set", override), fragment)
    assert len(line) < 200, len(line)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=" + "9" * 5000, "seed must be an integer, got '99999"),
        ("seed=" + "[" * 5000, "seed must be an integer, got '[[[["),
        ("optimizer.learning_rate=" + "9" * 5000, "optimizer.learning_rate must be a finite number, got inf"),
    ],
)
def test_the_set_values_of_the_report_that_were_one_line_stay_so(override, fragment):
    """Guards, not fixes: these --set spellings of item 14 were already one short line."""
    line = assert_one_error(run_cli("config", "show", "--config", SMOKE, "--set", override), fragment)
    assert len(line) < 200, len(line)


# --- 15. a file where the trainer keeps a folder (and the reverse) --------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tensorboard", "file"),
        ("checkpoints", "file"),
        ("tensorboard/train", "file"),
        ("checkpoints/best", "file"),
        ("config.yaml", "folder"),
        ("metrics.json", "folder"),
    ],
)
def test_a_file_in_the_trainers_way_is_refused_before_anything_changes(trained, name, kind):
    path = trained / name
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        path.rmdir()
    else:
        path.unlink()
    if kind == "file":
        path.write_text("the user's notes")
    else:
        (path / "mine").mkdir(parents=True)
    before = snapshot(trained)
    result = run_cli("train", "--config", SMOKE, "--workdir", str(trained), "--fresh", "--set", "train.max_steps=24")
    other = "folder" if kind == "file" else "file"
    assert_one_error(
        result, f"cannot write {path}: it is a {kind}, where the trainer keeps a {other}", "move or rename"
    )
    assert snapshot(trained) == before  # --fresh deleted nothing: the check comes first


def test_export_refuses_to_replace_a_file_named_export(trained):
    (trained / "export").write_text("the user's export notes")
    before = snapshot(trained)
    result = run_cli("export", "--workdir", str(trained))
    assert_one_error(result, f"cannot write {trained / 'export'}: it is a file", "move or rename")
    assert snapshot(trained) == before  # not renamed to .export.tmp-old


def test_evaluate_says_when_checkpoints_is_a_file(trained):
    for child in sorted((trained / "checkpoints").rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    (trained / "checkpoints").rmdir()
    (trained / "checkpoints").write_text("not a folder")
    result = run_cli("evaluate", "--workdir", str(trained))
    assert_one_error(result, f"{trained / 'checkpoints'} is a file, where the trainer keeps its checkpoints folder")


def test_the_layout_check_raises_a_workdir_write_error(trained):
    (trained / "tensorboard" / "eval").rename(trained / "eval-moved")
    (trained / "tensorboard" / "eval").write_text("x")
    with pytest.raises(WorkdirWriteError, match="tensorboard/eval: it is a file"):
        Workdir(trained).check_trainable(fresh=False)


# --- smaller items: ram:// workdirs, optimizer ranges ---------------------------------------


def test_a_ram_workdir_is_said_to_vanish_and_no_follow_up_command_is_suggested():
    workdir = _ram_workdir()
    result = run_cli(
        "train", "--config", SMOKE, "--workdir", workdir,
        "--set", "train.max_steps=2", "--set", "data.synthetic_train_size=128", "--set", "data.synthetic_test_size=64",
        "--set", "train.steps_per_loop=2", "--set", "checkpoint.every_steps=0", "--set", "tensorboard.images=false",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first_lines = result.output.splitlines()[:3]
    assert any(
        "in-memory ram:// filesystem" in line and "vanish when this process exits" in line for line in first_lines
    )
    assert f"launch export --workdir {workdir}" not in result.output
    assert "tensorboard --logdir" not in result.output
    assert "in memory (ram://): it vanishes when this process exits" in result.output


def test_a_new_process_on_a_ram_workdir_is_told_why_it_is_empty():
    result = run_cli("evaluate", "--workdir", _ram_workdir())
    line = assert_one_error(result, "no config.yaml", "ram:// is in-memory", "lasts only as long as the process")
    assert "launch train" not in line  # a train in another process would vanish too


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optimizer.momentum=1e300", "optimizer.momentum must be < 1, got 1e+300 (the range is [0, 1))"),
        ("optimizer.momentum=1", "optimizer.momentum must be < 1, got 1.0"),
        ("optimizer.weight_decay=1e300", "optimizer.weight_decay must be < 50 (1/optimizer.learning_rate"),
        ("optimizer.learning_rate=1e300", "optimizer.learning_rate must be between 0 and 1000000000000, got 1e+300"),
        ("model.unfreeze_at_epoch=" + "9" * 30, "model.unfreeze_at_epoch must be between 0 and 100000"),
    ],
)
def test_optimizer_values_out_of_range_are_refused(override, fragment):
    assert_one_error(run_cli("config", "show", "--config", SMOKE, "--set", override), fragment)


def test_every_shipped_config_and_the_valid_edges_still_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    smoke_config("optimizer.momentum=0.999", "optimizer.weight_decay=49.9")
    smoke_config("optimizer.learning_rate=1e12")  # the divergence tests' value
    smoke_config("optimizer.name=adamw", "optimizer.learning_rate=0.001", "optimizer.weight_decay=0.3")
