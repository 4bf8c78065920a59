"""Nothing lost, nothing let in: the workdir's data-loss guards and untrusted-input handling.

Each test names the issue item it covers (#12: 1-15). Data-loss tests snapshot every
pre-existing file and assert it is still there byte for byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import REPO, made_once, smoke_config
from trainer import files, storage
from trainer.backbones import load_weights_file
from trainer.checkpoints import CheckpointStore, checkpoint_steps
from trainer.config import load_config
from trainer.data.image_file import read_image
from trainer.data.sources.cifar10 import read_cifar10_pickles
from trainer.errors import ConfigError, DataError, WorkdirBusyError, WorkdirNotOursError
from trainer.launcher import reserved_ports
from trainer.training import train
from trainer.visualize import MAX_DRAWN_CLASSES, confusion_matrix_image
from trainer.workdir import MARKER, Workdir

SMOKE = str(REPO / "configs" / "smoke.yaml")


def quiet(_line: str) -> None:
    pass


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (dot-files included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def assert_one_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one `Error:` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory) -> Path:
    """Made once per test run and only copied (see `trained`)."""

    def make(folder: Path) -> None:
        train(smoke_config("train.max_steps=16", "checkpoint.every_steps=8"), folder / "run", echo=quiet)

    return made_once(tmp_path_factory, "safety-run-to-16", make) / "run"


@pytest.fixture
def trained(trained_once, tmp_path) -> Path:
    """A copy of a smoke workdir trained to step 16 (checkpoints at 8 and 16, a best one)."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def _foreign_folder(root: Path) -> Path:
    """A folder that is not ours, holding what #12 item 1's report held."""
    (root / "checkpoints" / "my_pytorch_run").mkdir(parents=True)
    (root / "checkpoints" / "my_pytorch_run" / "model.pt").write_bytes(b"torch weights")
    (root / "tensorboard" / "other_project").mkdir(parents=True)
    (root / "tensorboard" / "other_project" / "events.out.tfevents.1.host").write_bytes(b"their curves")
    (root / "metrics.json").write_text('{"theirs": 1}')
    (root / "Documents").mkdir()
    (root / "Documents" / "thesis.tex").write_text("chapter 1")
    return root


# --- 1. --fresh and folders that are not ours ---------------------------------------------


@pytest.mark.parametrize("data_path", ["typo", None])
def test_fresh_refuses_a_folder_the_trainer_did_not_create(tmp_path, data_path):
    home = _foreign_folder(tmp_path / "home")
    before = snapshot(home)
    args = ["train", "--config", SMOKE, "--workdir", str(home), "--fresh"]
    if data_path:
        args += ["--set", "data.source=folder", "--set", f"data.path={tmp_path / data_path}"]
    line = assert_one_error(run_cli(*args), "not a workdir of launch train", MARKER, "--fresh deletes only")
    assert "Documents" in line
    assert snapshot(home) == before and not (home / ".lock").exists()


def test_training_into_a_foreign_folder_is_refused_too(tmp_path):
    home = _foreign_folder(tmp_path / "home")
    before = snapshot(home)
    assert_one_error(run_cli("train", "--config", SMOKE, "--workdir", str(home)), "would write config.yaml")
    assert snapshot(home) == before


def test_fresh_removes_only_what_the_trainer_created(trained):
    (trained / "notes.txt").write_text("my notes")
    (trained / "checkpoints" / "my_run").mkdir()
    (trained / "checkpoints" / "my_run" / "model.pt").write_bytes(b"mine")
    (trained / "tensorboard" / "other_project").mkdir()
    (trained / "tensorboard" / "other_project" / "f.txt").write_text("theirs")
    (trained / "export").mkdir()
    (trained / "export" / "model.keras").write_bytes(b"an export")
    theirs = {k: v for k, v in snapshot(trained).items() if k.startswith(("notes", "export", "checkpoints/my_run"))}
    theirs["tensorboard/other_project/f.txt"] = b"theirs"
    lines: list[str] = []
    train(smoke_config("train.max_steps=8"), trained, fresh=True, echo=lines.append)
    after = snapshot(trained)
    for name, content in theirs.items():
        assert after[name] == content, name
    assert checkpoint_steps(trained / "checkpoints") == [8]  # the old 8 and 16 are gone, a new 8 is there
    assert any(line.startswith("--fresh: removed") for line in lines)
    assert not any("Resuming" in line for line in lines)


def test_fresh_validates_the_data_before_deleting_anything(trained, tmp_path):
    before = snapshot(trained)
    result = run_cli(
        "train", "--config", SMOKE, "--workdir", str(trained), "--fresh",
        "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'typo'}",
    )  # fmt: skip
    assert_one_error(result, "typo is not a folder")
    assert snapshot(trained) == before


def test_unmarked_workdir_of_an_earlier_version_is_adopted(trained):
    (trained / MARKER).unlink()  # workdirs written before the marker existed
    lines: list[str] = []
    train(smoke_config("train.max_steps=24", "checkpoint.every_steps=8"), trained, echo=lines.append)
    assert any("Resuming from" in line for line in lines)
    assert (trained / MARKER).is_file()


@pytest.mark.parametrize("spelling", ["file URL", "file://localhost URL", "symlink", "relative path"])
def test_every_spelling_of_a_busy_workdir_meets_its_lock(trained, tmp_path, monkeypatch, spelling):
    """#24 item 1: `--fresh` through `file:///abs/run` deleted a running trainer's checkpoints
    (a URL took a lease, the path a flock, and neither saw the other)."""
    (tmp_path / "link").symlink_to(trained)
    monkeypatch.chdir(tmp_path)
    other = {
        "file URL": f"file://{trained}",
        "file://localhost URL": f"file://localhost{trained}/",
        "symlink": str(tmp_path / "link"),
        "relative path": os.path.relpath(trained, tmp_path),
    }[spelling]
    with open(trained / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as the running trainer holds it
        before = snapshot(trained)
        with pytest.raises(WorkdirBusyError, match="in use by another trainer"):
            train(smoke_config("train.max_steps=8"), other, fresh=True, echo=quiet)
    assert snapshot(trained) == before  # nothing deleted, nothing written


@pytest.mark.parametrize(
    ("workdir", "fragment"),
    [
        ("gs:/bucket/run", "write gs://bucket/run"),
        ("foo://", "names no bucket or folder after 'foo://'"),
        ("1x://bucket/run", "'1x' is not a URL scheme"),
        ("file://run", "a file:// URL names an absolute path"),
    ],
)
def test_a_workdir_spelled_like_a_broken_url_is_one_line_and_creates_nothing(tmp_path, monkeypatch, workdir, fragment):
    """#24 item 3: these trained into local folders named `gs:` and `foo:`."""
    monkeypatch.chdir(tmp_path)
    for command in (["train", "--config", SMOKE], ["evaluate"]):
        assert_one_error(run_cli(*command, "--workdir", workdir), fragment)
    assert list(tmp_path.iterdir()) == []


# --- 2. a changed config is refused, not treated as corruption -----------------------------


def test_a_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path):
    workdir = tmp_path / "run"
    base = ("train.max_steps=16", "checkpoint.every_steps=8", "checkpoint.keep=2")
    train(smoke_config(*base, "model.width=16"), workdir, echo=quiet)
    before = snapshot(workdir)
    result = run_cli("train", "--config", SMOKE, "--workdir", str(workdir), "--set", "model.width=8")
    line = assert_one_error(result, "cannot continue", "model.width 16 -> 8", "--fresh", "another --workdir")
    assert "unreadable" not in result.output and "ckpt-16" in line
    assert snapshot(workdir) == before  # no rotation, no config.yaml rewrite, best/ untouched
    result = run_cli("evaluate", "--workdir", str(workdir), "--checkpoint", "best")
    assert result.exit_code == 0, result.output


def test_a_mismatched_checkpoint_in_evaluate_is_one_line(trained):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["model"]["width"] = 8  # as if config.yaml had been edited by hand
    (trained / "config.yaml").write_text(yaml.safe_dump(config))
    assert_one_error(run_cli("evaluate", "--workdir", str(trained)), "does not fit this model")


# --- 3. atomic side files; damaged ones are rebuilt ----------------------------------------


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "best.json"
    files.write_json(target, {"step": 8})

    def crash(_descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        files.write_json(target, {"step": 16})
    assert json.loads(target.read_text()) == {"step": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # no temporary file left


def test_best_json_never_names_a_deleted_checkpoint(trained, monkeypatch):
    """A kill between the new best checkpoint and best.json: the old pair still matches."""
    store = _store_for(trained)
    old = json.loads((trained / "checkpoints" / "best" / "best.json").read_text())

    def killed(path, value):
        raise KeyboardInterrupt  # the moment between the two writes

    monkeypatch.setattr(files, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save_best(99, 9, 0.99)
    record = json.loads((trained / "checkpoints" / "best" / "best.json").read_text())
    assert record == old and record["step"] in checkpoint_steps(trained / "checkpoints" / "best")


def _store_for(workdir: Path) -> CheckpointStore:
    from trainer.inference import load_trained_model

    model, _, _ = load_trained_model(workdir)
    return CheckpointStore(workdir / "checkpoints", model=model, warn=quiet)


def test_a_damaged_best_json_is_rebuilt_and_the_run_resumes(trained):
    best = trained / "checkpoints" / "best" / "best.json"
    record = json.loads(best.read_text())
    best.write_text(best.read_text()[:7])  # what a kill mid-write used to leave
    lines: list[str] = []
    result = train(smoke_config("train.max_steps=24", "checkpoint.every_steps=8"), trained, echo=lines.append)
    assert result.step == 24
    assert any("best.json is damaged" in line for line in lines)
    assert any("best.json rebuilt" in line and "from TensorBoard" in line for line in lines)
    rebuilt = json.loads(best.read_text())
    assert rebuilt["step"] in checkpoint_steps(best.parent)
    assert rebuilt["step"] != record["step"] or rebuilt["accuracy"] == pytest.approx(record["accuracy"])


def test_an_empty_dataset_json_does_not_break_predict(trained, tmp_path):
    expected = json.loads((trained / "dataset.json").read_text())
    (trained / "dataset.json").write_text("")
    image = tmp_path / "x.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    result = run_cli("predict", "--workdir", str(trained), str(image))
    assert result.exit_code == 0, result.output
    assert "dataset.json is damaged" in result.output and f"{image}\tclass_" in result.output
    assert json.loads((trained / "dataset.json").read_text()) == expected  # rebuilt identically


def test_an_interrupted_export_keeps_the_previous_one(trained, monkeypatch):
    assert run_cli("export", "--workdir", str(trained)).exit_code == 0
    before = snapshot(trained / "export")

    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_text", full_disk)
    result = run_cli("export", "--workdir", str(trained))
    assert_one_error(result, "cannot write", "No space left on device", "previous export is kept")
    assert snapshot(trained / "export") == before
    # No temporary folder left; only the export's lock file (trainer.files._only_writer) stays.
    assert [p.name for p in trained.iterdir() if p.name.startswith(".export")] == [".export.lock"]


# --- 4. a truncated TensorBoard event file -------------------------------------------------


def test_a_truncated_event_file_is_kept_up_to_its_last_whole_record(trained):
    events = next((trained / "tensorboard" / "train").glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes()[:-7])  # SIGKILL during a flush
    lines: list[str] = []
    result = train(smoke_config("train.max_steps=24", "checkpoint.every_steps=8"), trained, echo=lines.append)
    assert result.step == 24
    assert sum("ends in a damaged record" in line for line in lines) == 1
    from tests.test_fault_tolerance import _scalars

    steps = [step for step, _ in _scalars(trained / "tensorboard" / "train")["loss"]]
    assert steps[-1] == 24 and steps == sorted(set(steps))


# --- 5. config.yaml is written only once the run starts ------------------------------------


def test_a_rejected_run_does_not_rewrite_config_yaml(trained):
    before = snapshot(trained)
    result = run_cli("train", "--config", SMOKE, "--workdir", str(trained), "--set", "data.batch_size=100000")
    assert_one_error(result, "data.batch_size=100000 is larger than")
    assert snapshot(trained) == before


# --- 6. evaluate beside a running trainer --------------------------------------------------


def test_evaluate_of_a_busy_workdir_leaves_metrics_json_to_the_trainer(trained):
    before = (trained / "metrics.json").read_bytes()
    with open(trained / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a running trainer holds it
        result = run_cli("evaluate", "--workdir", str(trained))
    assert result.exit_code == 0, result.output
    assert "metrics.json is its file: wrote" in result.output
    assert (trained / "metrics.json").read_bytes() == before
    assert json.loads((trained / "metrics-evaluate.json").read_text())["step"] == 16


# --- 7. read-only workdir, full disk -------------------------------------------------------


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.fixture
def small_disk(tmp_path):
    mounts: list[Path] = []

    def make(name: str, size: str) -> Path:
        _tmpfs(tmp_path / name, size)
        mounts.append(tmp_path / name)
        return tmp_path / name

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_read_only_workdir_gives_one_line_and_evaluate_still_prints(small_disk, trained):
    disk = small_disk("ro", "64m")
    subprocess.run(["cp", "-a", str(trained), str(disk / "run")], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_cli("evaluate", "--workdir", str(disk / "run"))
    assert "Test accuracy" in result.output  # the numbers are shown before the save fails
    assert_one_error(result, f"cannot write {disk / 'run' / 'metrics.json'}", "Read-only file system")
    result = run_cli("train", "--config", SMOKE, "--workdir", str(disk / "new"))
    assert_one_error(result, f"cannot write {disk / 'new'}", "Read-only file system")


def test_full_disk_gives_one_line(small_disk):
    disk = small_disk("full", "200k")  # room for the side files, not for a checkpoint
    result = run_cli("train", "--config", SMOKE, "--workdir", str(disk / "run"), "--set", "train.max_steps=8")
    assert_one_error(result, "cannot write", "No space left on device")


# --- 8. pickles are untrusted --------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_pickle_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=3))
    result = run_cli(
        "data", "show", "--config", SMOKE, "--out", str(tmp_path / "g.png"),
        "--set", "data.source=cifar10", "--set", f"data.path={folder}",
    )  # fmt: skip
    assert_one_error(result, "cannot read CIFAR-10 batch", "posix.system", "refused")
    assert not marker.exists()


def test_genuine_cifar_pickles_still_load(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": b"training batch",
            b"labels": rng.integers(0, 10, 4).tolist(),
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"filenames": [b"a.png"] * 4,
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=3))
    dataset = read_cifar10_pickles(tmp_path)
    assert dataset.train.images.shape == (20, 32, 32, 3) and len(dataset.test) == 4


def test_the_keras_3_cache_folder_is_found(tmp_path, monkeypatch):
    target = tmp_path / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    target.mkdir(parents=True)
    test_genuine_cifar_pickles_still_load(target)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    from trainer.data import load_dataset

    dataset = load_dataset(smoke_config("data.source=cifar10").data, 0)
    assert len(dataset.train) == 20 and str(target) in dataset.origin


# --- 9. worker ports ------------------------------------------------------------------------


def test_reserved_ports_cannot_be_taken_by_another_program():
    with reserved_ports(2) as ports:
        for port in ports:
            other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with pytest.raises(OSError):
                other.bind(("0.0.0.0", port))
            other.close()
    free = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    free.bind(("0.0.0.0", ports[0]))  # released once the run is over
    free.close()


# --- 10. YAML alias bombs -------------------------------------------------------------------


def test_a_yaml_alias_bomb_gives_a_short_error(tmp_path):
    levels = ["a: &a [x,x,x,x,x,x,x,x,x,x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(7)]
    bomb = "data:\n  path:\n    " + "\n    ".join(f"- {level.split(': ', 1)[1]}" for level in levels) + "\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert len(bomb) < 600
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(str(err.value)) < 300 and "data.path must be a string" in str(err.value)


# --- 11. TensorBoard dies with the trainer --------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_tensorboard_stops_when_the_trainer_is_killed(tmp_path):
    args = [sys.executable, "-m", "launch", "train", "--config", SMOKE, "--workdir", str(tmp_path / "run")]
    args += ["--tensorboard", "--set", "train.epochs=1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = trainer.stdout.readline()
        assert line.startswith("TensorBoard: http://localhost:"), line
        children = Path(f"/proc/{trainer.pid}/task/{trainer.pid}/children").read_text().split()
        assert len(children) == 1
        board = int(children[0])
        assert "tensorboard" in Path(f"/proc/{board}/cmdline").read_text()
    finally:
        trainer.kill()
        trainer.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{board}").exists() and _state(board) != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{board}").exists() or _state(board) == "Z", "TensorBoard outlived its trainer"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# --- 12. bad input that used to end in a traceback -----------------------------------------


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels in a few dozen bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("size", [20000, 12000])
def test_predict_refuses_huge_images_before_decoding(trained, tmp_path, size):
    image = tmp_path / "huge.png"
    _png_header(image, size, size)
    result = run_cli("predict", "--workdir", str(trained), str(image))
    assert_one_error(result, f"{image} is", "over the 64 MP limit")


def test_a_folder_of_tiny_images_is_one_error_line(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "tiny" / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "tiny" / split / name / "x.png")
    result = run_cli(
        "train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
        "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'tiny'}", "--set", "data.batch_size=2",
    )  # fmt: skip
    assert_one_error(result, "images of 1x1 pixels are too small for model.name=paper_cnn")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=-1", "seed must be >= 0, got -1"),
        ("seed=10000000000000000000000", "seed must be between 0 and 2147483647"),
        ("seed=1e22", "seed must be an integer, got '1e22'"),
        ("model.width=100000000", "model.width must be between 1 and 4096, got 100000000"),
        ("optimizer.learning_rate=nan", "optimizer.learning_rate must be a finite number, got nan"),
        ("optimizer.momentum=inf", "optimizer.momentum must be a finite number, got inf"),
        ("checkpoint.every_minutes=-inf", "checkpoint.every_minutes must be a finite number"),
        ("optimizer.warmup_epochs=NaN", "optimizer.warmup_epochs must be a finite number"),
    ],
)
def test_out_of_range_values_are_refused(override, fragment):
    assert_one_error(run_cli("config", "show", "--config", SMOKE, "--set", override), fragment)


@pytest.mark.parametrize("key", ["optimizer.weight_decay", "optimizer.label_smoothing", "checkpoint.every_minutes"])
def test_non_finite_floats_in_yaml_are_refused(tmp_path, key):
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: .nan\n")
    with pytest.raises(ConfigError, match=f"{key} must be a finite number, got nan"):
        load_config(path)


def test_malformed_tf_config_is_one_line(monkeypatch):
    for value in ("[1]", '{"cluster": {"worker": "localhost:1"}}', '{"cluster": {"worker": ["a:1"]}, "task": 3}'):
        monkeypatch.setenv("TF_CONFIG", value)
        assert_one_error(run_cli("devices"), "TF_CONFIG")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  path: caf\xe9\n".encode("latin-1"))
    assert_one_error(run_cli("config", "show", "--config", str(path)), "is not UTF-8 text")


# --- 14. silent wrong results ---------------------------------------------------------------


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(read_image(path)[0, :, 0], [0, 128, 255])


def test_class_folders_with_line_breaks_are_refused(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog\nhouse"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name / "x.png")
    from trainer.config import DataConfig
    from trainer.data.sources.folder import read_image_folder

    with pytest.raises(DataError, match=r"class folder 'dog\\nhouse' .* line break"):
        read_image_folder(str(tmp_path), DataConfig(source="folder", path=str(tmp_path)), 0)


def test_predict_refuses_paths_that_would_break_its_lines_unless_json(trained, tmp_path):
    image = tmp_path / "two\nlines.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    assert_one_error(run_cli("predict", "--workdir", str(trained), str(image)), "use --json")
    result = run_cli("predict", "--workdir", str(trained), "--json", str(image))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["path"] == str(image)


# --- 15. bounded evaluation memory ----------------------------------------------------------


def test_the_confusion_matrix_image_stays_bounded_with_many_classes():
    classes = 400
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 10, classes))
    worst = [3, 150, 399]
    for i in worst:
        matrix[i, (i + 1) % classes] = 50  # the most confused classes
    image = confusion_matrix_image(matrix.tolist(), [f"c{i}" for i in range(classes)])
    assert image.size[0] * image.size[1] * 3 < 8 * 2**20  # 600 MiB before
    assert image.size[0] == 84 + MAX_DRAWN_CLASSES * 36
    small = confusion_matrix_image(np.eye(10, dtype=int).tolist(), [str(i) for i in range(10)])
    assert small.size == (84 + 10 * 36, 84 + 10 * 36)


def test_workdir_check_is_read_only(tmp_path):
    folder = _foreign_folder(tmp_path / "x")
    before = snapshot(folder)
    with pytest.raises(WorkdirNotOursError):
        Workdir(folder).check_trainable(fresh=True)
    assert snapshot(folder) == before


def test_an_export_killed_between_its_two_renames_is_put_back(tmp_path):
    export = tmp_path / "export"
    (tmp_path / ".export.tmp-old").mkdir()  # what a kill between the renames leaves
    (tmp_path / ".export.tmp-old" / "model.keras").write_bytes(b"the previous export")
    (tmp_path / ".export.tmp-abc").mkdir()  # and the complete new one, never swapped in
    with pytest.raises(RuntimeError), files.replacing_folder(export):
        raise RuntimeError("this export fails too")
    assert (export / "model.keras").read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "export"]  # the lock file stays


def test_a_leftover_link_is_unlinked_not_followed_and_a_failed_swap_leaves_no_temporary(tmp_path, monkeypatch):
    """A `.export.tmp-*` that is a link (an earlier version swapped a linked export/ there) is
    removed as a link: its target keeps its files. A rename that fails in the swap removes
    the new temporary folder and keeps the previous export."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("not ours")
    work = tmp_path / "w"
    work.mkdir()
    (work / ".export.tmp-old").symlink_to(elsewhere)
    export = work / "export"
    with files.replacing_folder(export) as folder:
        (folder / "model.keras").write_bytes(b"first")
    assert (elsewhere / "precious.txt").read_text() == "not ours"
    assert sorted(p.name for p in work.iterdir()) == [".export.lock", "export"]
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", _failing_into(os.replace, export))
        with pytest.raises(OSError), files.replacing_folder(export) as folder:
            (folder / "model.keras").write_bytes(b"second")
    assert not [p.name for p in work.iterdir() if p.name.startswith(".export.tmp-") and p.name != ".export.tmp-old"]
    with files.replacing_folder(export) as folder:  # the next call puts the previous export back first
        assert (export / "model.keras").read_bytes() == b"first"
    assert sorted(p.name for p in work.iterdir()) == [".export.lock", "export"]


def test_a_folder_replaced_on_an_object_store_is_known_whole_only_by_its_marker(monkeypatch):
    """Object stores have no folder rename: the marker goes first and comes back last, so a
    reader (model.weights=...export/model.keras) refuses a half-copied export, and a folder
    of an earlier version (no marker, nothing staged) still counts as whole."""
    url = f"ram://marker-{os.getpid()}-{time.monotonic_ns()}/run/export"
    with files.replacing_folder(url) as folder:
        (folder / "model.keras").write_bytes(b"first")
    assert storage.exists(f"{url}/{files.COMPLETE_MARKER}") and not files.folder_in_flux(url)
    with monkeypatch.context() as patch:
        patch.setattr(storage, "copy_tree", _failing_into(storage.copy_tree, url))  # the final copy into place
        with pytest.raises(OSError), files.replacing_folder(url) as folder:
            (folder / "model.keras").write_bytes(b"second")
    assert files.folder_in_flux(url)
    with pytest.raises(ConfigError, match="its folder is being exported, or an export of it was interrupted"):
        load_weights_file(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), f"{url}/model.keras")
    with files.replacing_folder(url) as folder:  # the next export makes it whole again
        (folder / "model.keras").write_bytes(b"third")
    assert not files.folder_in_flux(url) and storage.read_text(f"{url}/model.keras") == "third"
    older = url.replace("/export", "/older")  # written before the marker existed: whole
    storage.write_bytes(f"{older}/model.keras", b"old")
    assert not files.folder_in_flux(older)
    assert not files.folder_in_flux("/a/local/folder")  # swapped by a rename: never in flux


def _failing_into(move, target):
    """`move(source, target)` (a rename, a copy) that fails as a full or broken disk would
    when it moves something into `target`, and works otherwise."""

    def failing(source, destination):
        if str(destination) == str(target):
            raise OSError(5, "Input/output error")
        move(source, destination)

    return failing
