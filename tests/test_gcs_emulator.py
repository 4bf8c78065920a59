"""The gs:// flow through TensorFlow's own GCS client (#27 item 1): fake-gcs-server behind
mitmproxy (tests/gcs_emulator.py), with faults injected by the proxy.

test_cloud.py proves the flow on `ram://`, which shares tf.io.gfile but none of GCS's
code; here every read and write is an HTTPS request of TensorFlow's GCS filesystem
(libcurl, its retries, resumable uploads, its stat and block caches) to a server that
speaks GCS's JSON API. TensorFlow reads its GCS settings once per process, so every
command runs in a subprocess with the emulator's variables; the test process itself
looks at the bucket through fake-gcs-server's API, past the proxy and its faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, smoke_config
from tests.gcs_emulator import EmulatorUnavailable, GcsEmulator
from tests.test_cloud import RUN, SMOKE, TOTAL
from tests.test_fault_tolerance import _checkpoint_tensors
from tests.test_remote_errors import _trained_looking_workdir
from tests.test_streaming import write_mixed_folder
from trainer import storage
from trainer.checkpoint_files import checkpoint_steps
from trainer.checkpoints import CheckpointStore
from trainer.lease import LEASE
from trainer.preemption import EXIT_PREEMPTED
from trainer.staging import CheckpointUploads
from trainer.training import train

# test_cloud's flow (SMOKE, RUN, TOTAL): 64 deterministic steps, a checkpoint every 8; the
# SIGTERM lands somewhere in the middle, and the resumed run must end bit-identical.
# TensorFlow retries a failed request up to 10 times, waiting up to a second (its jitter)
# between tries; these shorten the rest of the wait. Read once per process.
QUICK_RETRIES = {"GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "10000", "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "50000"}


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """fake-gcs-server behind mitmdump for the whole session (per xdist worker): the
    GcsEmulator, whose `env` a subprocess needs and whose `make_bucket` gives a test an
    empty bucket. Both servers' process groups are killed at the end."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs-emulator"))
    try:
        emulator.start()
    except EmulatorUnavailable as err:
        emulator.stop()
        if "not installed" in str(err):
            pytest.skip(f"GCS emulator: {err}")
        pytest.fail(f"GCS emulator: {err}")
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """RUN straight through on local disk, in this process: what every resumed gs:// run must equal."""
    local = tmp_path_factory.mktemp("straight") / "run"
    train(smoke_config(*RUN), local, echo=lambda _: None)
    return local


def _sets(overrides) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


def _start(gcs: GcsEmulator, cwd: Path, *args: str, **extra_env: str) -> subprocess.Popen:
    """`python -m launch ARGS` with the emulator's environment, output piped as text."""
    env = gcs.subprocess_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra_env)
    for name in ("TF_CONFIG", "TRAINER_STOP_AT_STEP"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "launch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _launch(gcs: GcsEmulator, cwd: Path, *args: str, code: int = 0, **extra_env: str) -> tuple[str, str]:
    """Run `launch ARGS` to its end; it must exit `code`. Its (stdout, stderr)."""
    with _killed_if_left(_start(gcs, cwd, *args, **extra_env)) as process:
        out, err = process.communicate(timeout=400)
    assert process.returncode == code, f"exit {process.returncode} (emulator logs: {gcs.root})\n{out}\n{err}"
    return out, err


@contextlib.contextmanager
def _killed_if_left(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`process`, killed if the block leaves it running (a failed check, a timeout)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _sigterm_after_first_checkpoint(gcs: GcsEmulator, process: subprocess.Popen, bucket: str, folder: str) -> None:
    """SIGTERM `process` (as a scheduler would) once the store holds a checkpoint state file."""
    deadline = time.monotonic() + 300
    while f"{folder}/checkpoints/checkpoint" not in gcs.objects(bucket, f"{folder}/checkpoints/"):
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before its first checkpoint:\n{out}\n{err}")
        assert time.monotonic() < deadline, "no checkpoint in the store"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)


def _train_interrupted_then_resumed(gcs: GcsEmulator, cwd: Path, bucket: str, **extra_env: str) -> str:
    """RUN on gs://BUCKET/run: SIGTERM once a checkpoint is in the store (exit 75), then
    the same command to the end (exit 0). What both runs printed."""
    train_args = ("train", "--config", SMOKE, "--workdir", f"gs://{bucket}/run", *_sets(RUN))
    with _killed_if_left(_start(gcs, cwd, *train_args, **extra_env)) as process:
        _sigterm_after_first_checkpoint(gcs, process, bucket, "run")
        out, err = process.communicate(timeout=400)
    assert process.returncode == EXIT_PREEMPTED, f"exit {process.returncode}\n{out}\n{err}"
    assert "SIGTERM received" in out + err and f"checkpoint saved in gs://{bucket}/run/checkpoints" in out + err
    printed = out + err

    out, err = _launch(gcs, cwd, *train_args, **extra_env)
    resumed = re.search(rf"Resuming from gs://{bucket}/run/checkpoints/ckpt-(\d+) at step (\d+)", out)
    assert resumed and resumed.group(1) == resumed.group(2), out
    assert 8 <= int(resumed.group(1)) < TOTAL, out
    return printed + out + err


def _assert_same_weights(gcs: GcsEmulator, bucket: str, straight: Path, copy: Path) -> None:
    """The store's final checkpoint equals the straight local run's, tensor for tensor, bit for bit."""
    copy.mkdir()
    prefix = f"run/checkpoints/ckpt-{TOTAL}."
    for name in gcs.objects(bucket, prefix):
        (copy / name.rsplit("/", 1)[1]).write_bytes(gcs.download(bucket, name))
    expected = _checkpoint_tensors(str(straight / "checkpoints" / f"ckpt-{TOTAL}"))
    actual = _checkpoint_tensors(str(copy / f"ckpt-{TOTAL}"))
    assert expected.keys() == actual.keys() and any("optimizer" in name for name in expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def _image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    return image


@pytest.mark.slow  # 36 s alone, 69 s under make test's load: kept out of the 10-minute suite (#23)
def test_full_flow_on_gs_through_tensorflows_gcs_client(store, straight_run, tmp_path):
    """train -> SIGTERM -> resume on gs://bkt/run, then evaluate, predict and export on it:
    the final weights equal a straight local run's, bit for bit."""
    bucket = store.make_bucket("bkt").removeprefix("gs://")
    seen = len(store.requests_seen())
    _train_interrupted_then_resumed(store, tmp_path, bucket)
    _assert_same_weights(store, bucket, straight_run, tmp_path / "copy")
    assert f"run/{LEASE}" not in store.objects(bucket, "run/")  # released on the way out
    # Each of the two runs took the lease with a generation precondition (trainer/gcs_lease.py):
    # created only if absent (a multipart upload: TensorFlow's own are media uploads), deleted
    # only if still its own.
    guarded = [line for line in store.requests_seen()[seen:] if "ifGenerationMatch=" in line]
    assert sum("uploadType=multipart&ifGenerationMatch=0 " in line for line in guarded) == 2, guarded
    released = f"DELETE https://www.googleapis.com/storage/v1/b/{bucket}/o/run%2F{LEASE}?"
    assert sum(line.startswith(released) for line in guarded) == 2, guarded

    out, _ = _launch(store, tmp_path, "evaluate", "--workdir", f"gs://{bucket}/run")
    local = json.loads((straight_run / "metrics.json").read_text())
    saved = json.loads(store.download(bucket, "run/metrics.json"))
    assert saved["accuracy"] == local["accuracy"] and saved["step"] == TOTAL, out

    image = _image(tmp_path)
    out, _ = _launch(store, tmp_path, "predict", "--workdir", f"gs://{bucket}/run", "--json", str(image))
    assert json.loads(out.splitlines()[-1])["path"] == str(image)

    out, _ = _launch(store, tmp_path, "export", "--workdir", f"gs://{bucket}/run")
    assert f"gs://{bucket}/run/export/model.keras" in out
    exported = store.objects(bucket, "run/export/")
    assert {"run/export/model.keras", "run/export/labels.txt", "run/export/saved_model/saved_model.pb"} <= set(exported)
    assert not [name for name in store.objects(bucket, "run/.export")]  # no staging left
    assert sorted(os.listdir(tmp_path)) == ["copy", "image.png"]  # nothing written locally


# How a store stops serving: a 403 to everything (it answers and refuses), every connection
# dropped (no answer, until TensorFlow's retries end), or no proxy at all (the way to it gone).
OUTAGES = {
    "denied": "Error: the store refused access to {workdir}/config.yaml (HTTP 403: denied by the GCS emulator); ",
    "dropped": "Error: cannot reach {workdir}/config.yaml (Empty reply from server, after 2 tries); ",
    "proxy-gone": "Error: cannot reach {workdir}/config.yaml (Failed to connect to 127.0.0.1 port ",
}


def _assert_one_error_line_each(gcs: GcsEmulator, cwd: Path, workdir: str, outage: str) -> None:
    """evaluate, predict and export on `workdir` while the store suffers `outage`: one
    `Error:` line each, naming the URL and what to check, exit 2, no traceback, and nothing
    written locally."""
    env = {"GCS_RETRY_CONFIG_MAX_RETRIES": "2", **QUICK_RETRIES}
    if outage == "denied":
        gcs.deny_everything()
    elif outage == "dropped":
        gcs.set_faults(1.0, ("drop",))
    else:
        closed = f"http://127.0.0.1:{_closed_port()}"
        env.update(HTTPS_PROXY=closed, https_proxy=closed)
    image = _image(cwd / "image")
    before = sorted(cwd.rglob("*"))
    try:
        for command in ("evaluate", "predict", "export"):
            args = (command, "--workdir", workdir, *([str(image)] if command == "predict" else []))
            out, err = _launch(gcs, cwd, *args, code=2, **env)
            assert out == "" and "Traceback" not in err, (command, err)
            (line,) = err.splitlines()
            assert line.startswith(OUTAGES[outage].format(workdir=workdir)), (command, line)
            assert line.endswith(("then run the same command again", "their access to the bucket")), line
    finally:
        gcs.set_faults(0.0)
    assert sorted(cwd.rglob("*")) == before


def test_a_store_that_refuses_access_is_one_error_line(store, tmp_path):
    """A gs:// workdir (config.yaml and dataset.json in the bucket) whose store answers 403
    to everything: evaluate, predict and export each end in one `Error:` line, exit 2.
    It was a PermissionError's traceback (exit 1) before #27. The store that does not
    answer at all, on a trained workdir: the faulty-store test (slow)."""
    bucket = store.make_bucket("denied").removeprefix("gs://")
    _trained_looking_workdir(tmp_path / "workdir")
    for name in ("config.yaml", "dataset.json"):
        store.upload(bucket, f"run/{name}", (tmp_path / "workdir" / name).read_bytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _assert_one_error_line_each(store, cwd, f"gs://{bucket}/run", "denied")


@pytest.mark.slow
def test_data_on_gs_trains_from_a_folder_and_from_converted_shards(store, tmp_path):
    """An image folder uploaded to the bucket trains (data.source=folder); `launch data
    convert --to gs://` writes shards that train the same run (data.source=tfrecord)."""
    bucket = store.make_bucket("data").removeprefix("gs://")
    photos = Path(write_mixed_folder(str(tmp_path / "photos"), per_class=8))
    for path in sorted(photos.rglob("*")):
        if path.is_file():
            store.upload(bucket, f"photos/{path.relative_to(photos)}", path.read_bytes())
    data = ("data.image_size=24", "data.batch_size=8", "model.width=8", "train.epochs=1", "runtime.deterministic=true")

    def trained(source: str, path: str, workdir: str) -> str:
        sets = _sets((*data, f"data.source={source}", f"data.path={path}"))
        out, _ = _launch(store, tmp_path, "train", "--config", SMOKE, "--workdir", str(tmp_path / workdir), *sets)
        (evaluation,) = re.findall(r"Eval at step \d+: accuracy [\d.]+%, loss [\d.]+ \(\d+ images", out)
        return evaluation

    from_folder = trained("folder", f"gs://{bucket}/photos", "folder-run")
    assert "(24 images" in from_folder

    out, _ = _launch(
        store, tmp_path, "data", "convert", "--from", f"gs://{bucket}/photos", "--to", f"gs://{bucket}/shards"
    )
    shards = store.objects(bucket, "shards/")
    assert {"shards/labels.txt", "shards/shards.json"} <= set(shards), (shards, out)
    assert any(name.endswith(".tfrecord") for name in shards), shards
    # The same images, cached in memory in the same order: the same run (test_streaming proves it locally).
    assert trained("tfrecord", f"gs://{bucket}/shards", "tfrecord-run") == from_folder


@pytest.mark.slow
def test_a_run_on_a_faulty_store_finishes_resumes_and_matches(store, straight_run, tmp_path):
    """30% of requests answered with a 503 or a dropped connection (seeded): TensorFlow's
    retries carry the run through SIGTERM and resume, and the weights equal a straight run's."""
    bucket = store.make_bucket("faulty").removeprefix("gs://")
    store.set_faults(0.3, ("503", "drop"), seed=27)
    before, started = store.stats(), time.monotonic()
    printed = _train_interrupted_then_resumed(store, tmp_path, bucket, **QUICK_RETRIES)
    after, elapsed = store.stats(), time.monotonic() - started
    store.set_faults(0.0)
    requests = after["requests"] - before.get("requests", 0)
    faults = {kind: after[kind] - before.get(kind, 0) for kind in ("503", "drop")}
    warnings = [line for line in printed.splitlines() if line.startswith("Warning")]
    print(f"\nfaulty store: {requests} requests, {faults} injected, {elapsed:.0f} s for SIGTERM + resume")
    print("\n".join(["the trainer's warnings:", *warnings]))
    assert faults["503"] > 10 and faults["drop"] > 10, (faults, requests)
    _assert_same_weights(store, bucket, straight_run, tmp_path / "copy")
    # Then the store stops answering, and refuses: one line each for evaluate, predict, export.
    for outage in OUTAGES:
        cwd = tmp_path / f"cwd-{outage}"
        cwd.mkdir()
        _assert_one_error_line_each(store, cwd, f"gs://{bucket}/run", outage)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_staged_checkpoints_outrun_by_training_are_uploaded_before_they_are_deleted(monkeypatch):
    """Found by the faulty-store run: a store slower than the saves let the local staging
    manager (max_to_keep=keep) delete a checkpoint still waiting for its upload, and the
    run ended in "cannot write .../ckpt-8.index: No such file or directory". Now a save
    waits until fewer than `keep` uploads are pending: the workdir is never more than
    keep-1 checkpoints behind, and every upload finds its files."""
    copy_file = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda source, target: (time.sleep(0.05), copy_file(source, target)))
    remote = f"ram://slow-store-{uuid.uuid4().hex[:8]}/checkpoints"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    store = CheckpointStore(remote, model=model, keep=2, uploads=CheckpointUploads(remote, keep=2))
    try:
        for step in range(1, 9):  # each save far quicker than an upload (3 files, 0.05 s each)
            store.save(step, epoch=0)
        store.wait_for_uploads()
    finally:
        store.close()
    assert checkpoint_steps(remote) == [8, 7]
