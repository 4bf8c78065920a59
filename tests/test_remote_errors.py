"""#24 item 8: a store that cannot be reached, or a scheme TensorFlow does not know, is one
`Error:` line (exit 2) that names the URL and what to do, on every path that reads or
writes a remote location before anything starts, and nothing is created locally.

Every test here routes HTTP(S) through a proxy that cannot exist (`.invalid` never
resolves, RFC 6761), so libcurl fails at once with "Could not resolve proxy", online or
offline, without a request leaving the machine; no credentials are looked up (a found
one would be fetched first, and the GCE metadata check retries for seconds). The CLI runs
in-process (CliRunner), except for the one test that needs TensorFlow's GCS retry
settings, which it reads once per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import REPO, smoke_config

SMOKE = str(REPO / "configs" / "smoke.yaml")
PROXY = "no-such-proxy.invalid"
BUCKET = "gs://no-such-bucket"
UNREACHABLE = f"(Could not resolve proxy: {PROXY}); check this machine's network connection"
UNKNOWN_SCHEME = "TensorFlow has no filesystem for gss://"


# Set aside: a way around the proxy, or credentials (which would be fetched first).
_UNSET = ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "GOOGLE_APPLICATION_CREDENTIALS")


def _no_store(proxy: str, gcloud_config: Path) -> dict[str, str]:
    """Variables that send every request to the store through `proxy` (with _UNSET unset),
    and skip TensorFlow's probe of the GCE metadata server, which retries for seconds."""
    proxies = {name: proxy for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
    return {**proxies, "NO_GCE_CHECK": "true", "CLOUDSDK_CONFIG": str(gcloud_config)}


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty current folder (nothing may appear in it) and no way to reach the store."""
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in _no_store(f"http://{PROXY}:3128", tmp_path / "gcloud").items():
        monkeypatch.setenv(name, value)
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _one_error(*args: object) -> str:
    """The one `Error:` line of a command that must exit 2 without a traceback."""
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(errors) == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    return errors[0]


def _image_folder(root: Path) -> None:
    for split in ("train", "test"):
        for label, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(root / split / label / "0.png")


def _trained_looking_workdir(root: Path) -> None:
    """config.yaml and dataset.json: all that evaluate reads before the data."""
    from trainer.config import to_yaml

    root.mkdir()
    (root / "config.yaml").write_text(to_yaml(smoke_config()))
    info = {"class_names": list("abcdefghij"), "image_shape": [32, 32, 3], "mean": [0.0] * 3, "std": [1.0] * 3}
    (root / "dataset.json").write_text(json.dumps({**info, "origin": "synthetic"}))


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in root.rglob("*")}


def _data(source: str, path: str) -> list[str]:
    return ["--set", f"data.source={source}", "--set", f"data.path={path}"]


_TRAIN = ["train", "--config", SMOKE, "--workdir", "run"]
_SHOW = ["data", "show", "--config", SMOKE, "--out", "grid.png"]
_CONVERT = ["data", "convert", "--from", "{images}", "--to"]
# Each case of #24 item 8: the command, and how its one `Error:` line starts. `{images}`
# (train/ and test/ of two classes), `{file}` and `{workdir}` are made in tmp_path.
CASES = {
    "evaluate-workdir": (["evaluate", "--workdir", f"{BUCKET}/run"], f"cannot reach {BUCKET}/run/config.yaml"),
    "export-workdir": (["export", "--workdir", f"{BUCKET}/run"], f"cannot reach {BUCKET}/run/config.yaml"),
    "predict-workdir": (["predict", "--workdir", f"{BUCKET}/run", "x.jpg"], f"cannot reach {BUCKET}/run/config.yaml"),
    "train-config": (["train", "--config", f"{BUCKET}/c.yaml"], f"cannot reach {BUCKET}/c.yaml"),
    # Said as such, not as a full disk ("free some space"), which it is not.
    "train-workdir": (["train", "--config", SMOKE, "--workdir", f"{BUCKET}/run"], f"cannot reach {BUCKET}/run"),
    "convert-to-store": ([*_CONVERT, f"{BUCKET}/shards"], f"cannot reach {BUCKET}/shards"),
    "convert-to-unknown-scheme": ([*_CONVERT, "gss://b/x"], f"gss://b/x: {UNKNOWN_SCHEME}"),
    "convert-to-a-file": ([*_CONVERT, "{file}"], "--to {file} is a file, not a folder; choose a new folder"),
    "convert-below-a-file": ([*_CONVERT, "{file}/shards"], "--to {file}/shards: {file} is a file, not a folder"),
    "train-tfrecord-on-store": ([*_TRAIN, *_data("tfrecord", f"{BUCKET}/d")], f"cannot reach {BUCKET}/d/labels.txt"),
    "train-tfrecord-unknown-scheme": (
        [*_TRAIN, *_data("tfrecord", "gss://b/d")],
        f"gss://b/d/labels.txt: {UNKNOWN_SCHEME}",
    ),
    "train-folder-on-store": ([*_TRAIN, *_data("folder", f"{BUCKET}/d")], f"cannot reach {BUCKET}/d"),
    "train-folder-unknown-scheme": ([*_TRAIN, *_data("folder", "gss://b/d")], f"gss://b/d: {UNKNOWN_SCHEME}"),
    "show-tfrecord-on-store": ([*_SHOW, *_data("tfrecord", f"{BUCKET}/d")], f"cannot reach {BUCKET}/d/labels.txt"),
    "show-folder-on-store": ([*_SHOW, *_data("folder", f"{BUCKET}/d")], f"cannot reach {BUCKET}/d"),
    # A trained workdir whose data moved to a bucket.
    "evaluate-data-on-store": (
        ["evaluate", "--workdir", "{workdir}", *_data("folder", f"{BUCKET}/d")],
        f"cannot reach {BUCKET}/d",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_remote_location_that_cannot_be_used_is_one_line_and_changes_nothing(cwd, tmp_path, case):
    """Exit 2, one `Error:` line naming the URL, the reason and what to do; nothing is
    created or changed locally (no workdir, no runs/, no grid, no shards folder)."""
    _image_folder(tmp_path / "images")
    (tmp_path / "file").write_text("mine")
    _trained_looking_workdir(tmp_path / "workdir")
    places = {name: tmp_path / name for name in ("images", "file", "workdir")}
    args, start = CASES[case]
    before = _tree(tmp_path)
    error = _one_error(*(arg.format(**places) for arg in args))
    assert error.startswith(f"Error: {start.format(**places)}"), error
    if start.startswith("cannot reach"):
        assert UNREACHABLE in error and error.endswith("then run the same command again"), error
    assert _tree(tmp_path) == before


def test_an_unreachable_store_is_not_damage_and_not_a_full_disk(cwd, monkeypatch):
    """What the store raises: an OSError (the lease and staged uploads retry those), a
    TrainerError (one line), never called a damaged file (which would be rebuilt) or a full disk."""
    from trainer import files, storage
    from trainer.errors import StoreUnreachableError, TrainerError

    with pytest.raises(StoreUnreachableError) as raised:
        storage.exists(f"{BUCKET}/run")
    err = raised.value
    assert isinstance(err, OSError) and isinstance(err, TrainerError) and err.exit_code == 2
    assert err.url == f"{BUCKET}/run" and err.strerror == f"Could not resolve proxy: {PROXY}"
    assert not files.is_write_failure(err)
    # tf.io.gfile.isdir answers False for an unreachable store: storage.isdir does not.
    with pytest.raises(StoreUnreachableError):
        storage.isdir(f"{BUCKET}/run")
    with pytest.raises(StoreUnreachableError):
        storage.listdir(f"{BUCKET}/run")
    # A store that answered "it exists" and then stopped answering: no "damaged" warning.
    monkeypatch.setattr(storage, "isfile", lambda _path: True)
    warnings: list[str] = []
    with pytest.raises(StoreUnreachableError):
        files.read_json(f"{BUCKET}/run/dataset.json", warnings.append, "rebuilding it")
    assert warnings == []


def test_the_errors_tensorflow_gives_for_no_answer_are_recognized():
    """The texts of TensorFlow's GCS client: unresolvable hosts fail at once; a refused
    connection is retried and reported as Aborted; Unavailable and DeadlineExceeded are
    no answer by their class; a store's own refusal is not."""
    import tensorflow as tf

    from trainer import storage

    curl = "Error executing an HTTP request: libcurl code 7 meaning 'Could not connect to server', error details: "
    retried = tf.errors.AbortedError(
        None, None, f"All 10 retry attempts failed. The last failure: {curl}Failed to connect to x port 1\n\t when ..."
    )
    assert storage.unreachable(retried, "gs://b/x").strerror == "Failed to connect to x port 1, after 10 tries"
    busy = "All 3 retry attempts failed. The last failure: Error executing an HTTP request: HTTP response code 503"
    assert storage.unreachable(tf.errors.AbortedError(None, None, busy), "gs://b/x").strerror == (
        "Error executing an HTTP request: HTTP response code 503, after 3 tries"
    )
    assert storage.unreachable(tf.errors.UnavailableError(None, None, "503"), "gs://b/x").strerror == "503"
    assert storage.unreachable(tf.errors.DeadlineExceededError(None, None, ""), "gs://b/x") is not None
    assert storage.unreachable(tf.errors.FailedPreconditionError(None, None, "object is a folder"), "gs://b") is None
    assert storage.unreachable(tf.errors.AbortedError(None, None, "a write raced another"), "gs://b") is None
    assert storage.unreachable(ValueError("libcurl code 6"), "gs://b") is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_connection_is_one_line_once_the_retries_end(tmp_path):
    """A connection refused (DNS works, the network does not) is what TensorFlow retries:
    10 times over about 3 minutes by default; GCS_RETRY_CONFIG_* (read once per process,
    hence a subprocess) makes it 2 quick tries here. The end is the same one line, and the
    only one: a gs:// config is read by TensorFlow, imported as quietly as for any command."""
    env = {name: value for name, value in os.environ.items() if name not in (*_UNSET, "TF_CPP_MIN_LOG_LEVEL")}
    env.update(_no_store(f"http://127.0.0.1:{_closed_port()}", tmp_path / "gcloud"))
    env.update(GCS_RETRY_CONFIG_MAX_RETRIES="2", GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="1000")
    env.update(GCS_RETRY_CONFIG_MAX_DELAY_TIME_US="2000", PYTHONPATH=str(REPO))  # this checkout's launch
    done = subprocess.run(
        [sys.executable, "-m", "launch", "train", "--config", f"{BUCKET}/c.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    (error,) = done.stderr.splitlines()
    assert error.startswith(f"Error: cannot reach {BUCKET}/c.yaml (Failed to connect to 127.0.0.1 port"), error
    assert "Could not connect to server, after 2 tries); check this machine's network connection" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no runs/c
