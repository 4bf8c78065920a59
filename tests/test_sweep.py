"""Issue #24's sweep: outputs, downloads, a TPU's metadata server and pipes in the place of
files, each one Error line (or a deadline), never a traceback or a wait without end.

Waits are bounded on the old code too: a server that never answers closes after
`_SILENCE_S`, and a pipe opened by old code is given a writer after `_SILENCE_S`, so a
regression fails (too slow, or the wrong line) instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import pytest

from tests import test_safety
from tests.test_hostile_data import image_folder
from tests.test_safety import SMOKE, assert_one_error, run_cli
from trainer import cluster, files, storage
from trainer.backbones import BACKBONES, _application, build_backbone_model, load_weights_file
from trainer.checkpoint_files import checkpoint_steps
from trainer.checkpoints import _parse_step
from trainer.cluster import tf_config_workers
from trainer.config import DataConfig
from trainer.data.convert import convert_folder
from trainer.data.sources.cifar10 import _download_cifar10
from trainer.data.sources.folder import read_image_folder
from trainer.errors import CheckpointError, ConfigError, DataError, RuntimeSetupError
from trainer.files import describe_write_error
from trainer.loop.controller import STOP_AT_STEP_VARIABLE, _stop_at_step

trained_once = test_safety.trained_once
pytestmark = pytest.mark.timeout(180)  # a safety net: each test bounds its own waits (see above)
_SILENCE_S = 20


def quiet(_line: str) -> None:
    pass


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (each closed after _SILENCE_S)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    closer = threading.Timer(float(_SILENCE_S), lambda: [c.close() for c in held])
    closer.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        closer.cancel()
        for connection in held:
            connection.close()
        listener.close()


# Opens the pipe read-write (which never blocks) and closes it, every 0.5 s from
# _SILENCE_S on, while it exists: a reader blocked in open() gets a writer, then EOF. A
# separate process, because TensorFlow and h5py hold the GIL while they wait in open().
_UNBLOCKER = 'sleep "$1"; i=0; while [ -p "$2" ] && [ $i -lt 600 ]; do : 3<>"$2"; sleep 0.5; i=$((i+1)); done'


@pytest.fixture
def fifo() -> Iterator[Callable[[Path], Path]]:
    """Makes named pipes that old code, blocked on them, is freed from (see _UNBLOCKER)."""
    helpers: list[subprocess.Popen] = []

    def make(path: Path) -> Path:
        os.mkfifo(path)
        helpers.append(subprocess.Popen(["sh", "-c", _UNBLOCKER, "sh", str(_SILENCE_S), str(path)]))
        return path

    yield make
    for helper in helpers:
        helper.kill()
        helper.wait()


# --- H7: launch data show --out -------------------------------------------------------------


def test_data_show_refuses_an_out_it_cannot_write_before_loading_data(tmp_path, fifo):
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path / "afile" / "grid.png": "is a file, not a folder",
        tmp_path / "grid.txt": ".txt is not an image format",
        tmp_path / "grid": "no extension is not an image format",
        tmp_path / ("x" * 300 + ".png"): "longer than 255 bytes",
        fifo(tmp_path / "pipe"): "no extension is not an image format",
        fifo(tmp_path / "pipe.png"): "is a pipe (FIFO), not a regular file",
    }
    for out, fragment in cases.items():
        result = run_cli("data", "show", "--config", SMOKE, "--count", "2", "--out", str(out))
        assert "--out" in assert_one_error(result, fragment)
    written = run_cli("data", "show", "--config", SMOKE, "--count", "2", "--out", str(tmp_path / "new" / "g.png"))
    assert written.exit_code == 0, written.output
    assert os.listdir(tmp_path / "new") == ["g.png"]  # through a temporary file, none left over


# --- H8: launch data convert --to -------------------------------------------------------------


def test_convert_to_a_name_too_long_or_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    root = image_folder(tmp_path / "photos")
    long_name = run_cli("data", "convert", "--from", str(root), "--to", str(tmp_path / ("x" * 300)))
    assert_one_error(long_name, "--to", "300 bytes is longer than this filesystem allows", "nothing was written")
    (tmp_path / "afile").write_text("x")
    dataset = read_image_folder(str(root), DataConfig(source="folder", path=str(root)), 0, quiet)
    with pytest.raises(DataError, match=r"--to .*afile/out: cannot make that folder"):
        convert_folder(dataset, str(tmp_path / "afile" / "out"))  # past the checks: TensorFlow's makedirs


# --- H9: a TPU by name, the metadata server silent -------------------------------------------


def test_a_silent_metadata_server_for_a_named_tpu_ends_at_the_deadline(monkeypatch):
    with silent_server() as port:
        monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{port}")
        started = time.monotonic()
        result = run_cli("devices", "--set", "runtime.tpu=mytpu", "--set", "runtime.connect_timeout_s=2")
        assert time.monotonic() - started < 15
    assert_one_error(result, "gave up after 2 s waiting for the metadata server", f"127.0.0.1:{port}", "'mytpu'")


# --- H10: downloads --------------------------------------------------------------------------


@pytest.fixture
def silent_proxy(monkeypatch, tmp_path) -> Iterator[None]:
    """https_proxy at a server that never answers, an empty Keras cache, a 1 s stall limit."""
    monkeypatch.setattr(storage, "DOWNLOAD_STALL_S", 1.0)
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path / "keras"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    for name in ("no_proxy", "NO_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with silent_server() as port:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        yield


def test_a_cifar10_download_that_stalls_is_one_line_with_the_offline_hint(silent_proxy):
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        _download_cifar10()
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "https://www.cs.toronto.edu/" in message and "CIFAR10_DIR" in message and "by hand" in message


def test_an_imagenet_weights_download_that_stalls_says_where_to_put_the_file(silent_proxy):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="copy that file from a machine that has one to"):
        _application(BACKBONES["mobilenet_v3_small"], (32, 32, 3), imagenet=True)
    assert time.monotonic() - started < 15


# --- H11: pipes where files are read --------------------------------------------------------


@pytest.fixture
def trained(trained_once, tmp_path) -> Path:
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def test_predict_on_a_pipe_is_one_line(trained, tmp_path, fifo):
    result = run_cli("predict", "--workdir", str(trained), str(fifo(tmp_path / "photo.png")))
    assert_one_error(result, "photo.png is not a regular file (a pipe (FIFO))")


def test_a_pipe_among_the_checkpoints_is_left_out_or_refused(trained, tmp_path, fifo):
    image = tmp_path / "x.png"
    assert run_cli("data", "show", "--config", SMOKE, "--count", "1", "--out", str(image)).exit_code == 0
    fifo(trained / "checkpoints" / "ckpt-99.index")
    result = run_cli("predict", "--workdir", str(trained), str(image))
    assert result.exit_code == 0 and "ckpt-99" not in result.output, result.output  # step 16, no warning
    (trained / "checkpoints" / "checkpoint").unlink()
    fifo(trained / "checkpoints" / "checkpoint")
    refused = run_cli("predict", "--workdir", str(trained), str(image))
    assert_one_error(refused, "checkpoints/checkpoint is not a regular file (a pipe (FIFO))")


def test_weights_given_as_a_pipe_are_one_line(tmp_path, fifo):
    model = build_backbone_model("mobilenet_v3_small", input_shape=(32, 32, 3), num_classes=2)
    with pytest.raises(ConfigError, match=r"w\.h5 is not a regular file \(a pipe \(FIFO\)\)"):
        load_weights_file(model, str(fifo(tmp_path / "w.h5")))


# --- the minor items -------------------------------------------------------------------------


def test_write_errors_advise_by_cause_and_name_the_file():
    read_only = str(describe_write_error(OSError(errno.EROFS, "Read-only file system", "/run/.lock"), "/run"))
    assert "/run/.lock" in read_only and "writable --workdir" in read_only and "free some space" not in read_only
    full = str(describe_write_error(OSError(errno.ENOSPC, "No space left on device"), "/run"))
    assert "free some space" in full
    assert "shorter" in str(describe_write_error(OSError(errno.ENAMETOOLONG, "File name too long"), "/run"))
    assert "is a file" in str(describe_write_error(OSError(errno.ENOTDIR, "Not a directory"), "/run"))


def test_a_5000_digit_checkpoint_is_a_short_line():
    with pytest.raises(CheckpointError) as caught:
        _parse_step("9" * 5000)
    assert len(str(caught.value)) < 200 and "5000 characters" in str(caught.value)
    assert _parse_step("16") == 16


@pytest.mark.parametrize("text", ["\u00b2", "\uff11\uff12", "\u0663"])  # superscript two, full-width 12, Arabic-Indic 3
def test_digits_that_are_not_ascii_are_no_step_port_or_pid(text, tmp_path, monkeypatch):
    """str.isdigit takes them; int() then raised ValueError (a traceback) or read '１２' as
    12: a step, a port (TF_CONFIG, the rendezvous, SLURM_STEP_RESV_PORTS) and a --from
    step are ASCII digits only."""
    assert text.isdigit() and not files.digits(text)
    with pytest.raises(CheckpointError, match="must be latest, best or a step number"):
        _parse_step(text)
    with pytest.raises(RuntimeSetupError, match="is not a port range"):
        cluster._port_base({"SLURM_STEP_RESV_PORTS": f"{text}-{text}"})
    tf_config = {"cluster": {"worker": [f"a:{text}", "b:2"]}, "task": {"type": "worker", "index": 0}}
    with pytest.raises(RuntimeSetupError):
        tf_config_workers({"TF_CONFIG": json.dumps(tf_config)})
    assert files.digits("0123") and not files.digits("")
    (tmp_path / f"ckpt-{text}.index").write_text("")  # no step: a phantom "ckpt-99" was warned about at every resume
    (tmp_path / "ckpt-7.index").write_text("")
    assert checkpoint_steps(str(tmp_path)) == [7]
    monkeypatch.setenv(STOP_AT_STEP_VARIABLE, text)  # the test seam: ignored, not a traceback
    assert _stop_at_step() == -1
    monkeypatch.setenv(STOP_AT_STEP_VARIABLE, "9" * 5000)
    assert _stop_at_step() == -1


def test_an_empty_workdir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "--config", SMOKE, "--workdir", "", "--set", "train.max_steps=1")
    assert_one_error(result, "--workdir is empty")
    assert not (tmp_path / "runs").exists()


def test_a_config_that_is_a_pipe_or_a_device_is_not_called_missing(tmp_path, fifo):
    for path in ("/dev/null", str(fifo(tmp_path / "c.yaml"))):
        assert_one_error(run_cli("config", "show", "--config", path), f"{path} is not a regular file")


# --- H11, TFRecord folders: labels.txt, shards.json or a shard that is a pipe ----------------


def test_a_pipe_in_a_tfrecord_folder_is_one_line_or_recounted(tmp_path, fifo):
    from tests.test_hostile_data import good_records, show, write_shards

    shards = write_shards(tmp_path / "shards", good_records(), good_records(4))
    fifo(shards / "shards.json")  # a damaged side file: warned about, the records are counted
    result = show(tmp_path, "tfrecord", shards)
    assert result.exit_code == 0 and "shards.json is damaged" in result.output, result.output
    (shards / "labels.txt").unlink()
    fifo(shards / "labels.txt")
    assert_one_error(show(tmp_path, "tfrecord", shards), "labels.txt is a pipe (FIFO), not a regular file")
    (shards / "labels.txt").unlink()
    (shards / "labels.txt").write_text("a\nb\n")
    (shards / "train-00000-of-00001.tfrecord").unlink()
    fifo(shards / "train-00000-of-00001.tfrecord")
    assert_one_error(show(tmp_path, "tfrecord", shards), "train-00000-of-00001.tfrecord is a pipe (FIFO)")
