"""Workdirs on stores other than local disk: TensorFlow's in-process `ram://` filesystem
stands in for gs:// (which cannot be reached here): every file goes through tf.io.gfile
exactly as it would for GCS. Also the lease that replaces flock on such stores."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from launch.cli import cli
from tests.conftest import REPO, smoke_config
from tests.test_fault_tolerance import _checkpoint_tensors
from trainer.checkpoints import CheckpointStore, checkpoint_steps
from trainer.errors import StoreUnreachableError, WorkdirBusyError, WorkdirLostError
from trainer.lease import LEASE, Lease, LeaseRecord, Ownership, check_free, read_lease, this_machine
from trainer.preemption import EXIT_PREEMPTED
from trainer.training import train

SMOKE = str(REPO / "configs" / "smoke.yaml")
# 64 steps, deterministic: a signal lands somewhere in the middle, and the resumed run
# must end bit-identical to a straight one whatever the step.
RUN = (
    "data.synthetic_train_size=2048",
    "data.batch_size=32",
    "train.epochs=1",
    "train.steps_per_loop=4",
    "checkpoint.every_steps=8",
    "runtime.deterministic=true",
)
TOTAL = 64


def _ram_workdir() -> str:
    return f"ram://runs-{uuid.uuid4().hex[:8]}/run"


def _sigterm_after_first_checkpoint(workdir: str) -> threading.Thread:
    """SIGTERM this process (as a scheduler would) once a checkpoint exists in `workdir`."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while not checkpoint_steps(f"{workdir}/checkpoints") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_full_flow_on_a_remote_store(tmp_path):
    """train -> SIGTERM -> resume -> evaluate -> predict -> export, all on ram://, through the CLI;
    the result equals a straight run on local disk, bit for bit."""
    local = tmp_path / "local"
    train(smoke_config(*RUN), local, echo=lambda _: None)
    workdir = _ram_workdir()
    sets = [word for override in RUN for word in ("--set", override)]

    watcher = _sigterm_after_first_checkpoint(workdir)
    result = _invoke("train", "--config", SMOKE, "--workdir", workdir, *sets)
    watcher.join(timeout=5)
    assert result.exit_code == EXIT_PREEMPTED, result.output
    assert "SIGTERM received" in result.output
    stopped = checkpoint_steps(f"{workdir}/checkpoints")[0]
    assert 8 <= stopped < TOTAL and f"checkpoint saved in {workdir}/checkpoints" in result.output
    assert not tf.io.gfile.exists(f"{workdir}/{LEASE}")  # released on the way out

    result = _invoke("train", "--config", SMOKE, "--workdir", workdir, *sets)
    assert result.exit_code == 0, result.output
    assert f"Resuming from {workdir}/checkpoints/ckpt-{stopped} at step {stopped}" in result.output
    expected = _checkpoint_tensors(str(local / "checkpoints" / f"ckpt-{TOTAL}"))
    actual = _checkpoint_tensors(_local_copy(f"{workdir}/checkpoints", f"ckpt-{TOTAL}", tmp_path / "copy"))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    # TensorBoard continuity: one point per logged step across the restart.
    steps = _logged_steps(f"{workdir}/tensorboard/train", "loss")
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL

    result = _invoke("evaluate", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    saved = json.loads(tf.io.gfile.GFile(f"{workdir}/metrics.json").read())
    local_metrics = json.loads((local / "metrics.json").read_text())
    assert saved["accuracy"] == local_metrics["accuracy"] and saved["step"] == TOTAL

    image = tmp_path / "image.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    result = _invoke("predict", "--workdir", workdir, "--json", str(image))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["path"] == str(image)

    result = _invoke("export", "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert f"{workdir}/export/model.keras" in result.output
    assert sorted(tf.io.gfile.listdir(f"{workdir}/export")) == ["_SUCCESS", "labels.txt", "model.keras", "saved_model"]
    copy = tmp_path / "model.keras"
    tf.io.gfile.copy(f"{workdir}/export/model.keras", str(copy))
    assert keras.saving.load_model(copy).output_shape == (None, 10)
    assert not [name for name in tf.io.gfile.listdir(workdir) if name.startswith(".export")]  # no staging left


def _local_copy(folder: str, prefix: str, target) -> str:
    """Copy one checkpoint off the store (ram:// answers isdir() for any prefix, which
    misleads tf.train.load_checkpoint) and return its local path prefix."""
    target.mkdir()
    for name in tf.io.gfile.listdir(folder):
        if name.startswith(f"{prefix}."):
            tf.io.gfile.copy(f"{folder}/{name}", str(target / name))
    return str(target / prefix)


def _logged_steps(logdir: str, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"tensors": 0})
    events.Reload()
    return [event.step for event in events.Tensors(tag)]


def _foreign_lease(workdir: str, age: float, expires_after: float = 120) -> dict:
    record = {
        "owner": "someone-else",
        "host": "another-host",
        "pid": 4242,
        "heartbeat": time.time() - age,
        "expires_after": expires_after,
    }
    tf.io.gfile.makedirs(workdir)
    # As the trainer writes it (a temp object, then a rename): ram:// does not even truncate
    # a file opened for writing.
    with tf.io.gfile.GFile(f"{workdir}/.foreign.tmp", "w") as handle:
        handle.write(json.dumps(record))
    tf.io.gfile.rename(f"{workdir}/.foreign.tmp", f"{workdir}/{LEASE}", overwrite=True)
    return record


def test_a_live_lease_refuses_a_second_trainer_and_an_expired_one_is_taken_over():
    workdir = _ram_workdir()
    train(smoke_config("train.max_steps=8"), workdir, echo=lambda _: None)
    before = sorted(tf.io.gfile.listdir(f"{workdir}/checkpoints"))
    _foreign_lease(workdir, age=10)
    with pytest.raises(WorkdirBusyError, match=r"in use by another trainer \(pid 4242 on host another-host"):
        train(smoke_config("train.max_steps=16"), workdir, echo=lambda _: None)
    assert sorted(tf.io.gfile.listdir(f"{workdir}/checkpoints")) == before  # nothing was touched
    # `launch evaluate` leaves metrics.json to the trainer holding the lease.
    result = _invoke("evaluate", "--workdir", workdir)
    assert result.exit_code == 0 and "metrics-evaluate.json" in result.output, result.output

    _foreign_lease(workdir, age=200)  # its holder stopped renewing 200 s ago: presumed dead
    lines: list[str] = []
    result = train(smoke_config("train.max_steps=16"), workdir, echo=lines.append)
    assert result.step == 16
    takeovers = [line for line in lines if "taking over the lease" in line]
    assert len(takeovers) == 1 and "pid 4242 on host another-host" in takeovers[0], lines
    assert int(re.search(r"renewed (\d+)s ago", takeovers[0]).group(1)) >= 200
    assert not tf.io.gfile.exists(f"{workdir}/{LEASE}")


def _wait_until(condition, timeout: float = 60) -> None:
    """Poll (bounded) until `condition()` holds: an event, not a moment."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _noticed_takeover(lease: Lease, workdir: str) -> bool:
    """Whether the holder noticed; the stores have no compare-and-swap, so a renewal racing
    with the takeover may overwrite it once: the other side then writes it again."""
    if lease.lost:
        return True
    if read_lease(f"{workdir}/{LEASE}", print).owner != "someone-else":
        _foreign_lease(workdir, age=0)
    return False


def test_a_lease_is_renewed_while_held_and_yields_to_a_takeover():
    workdir = _ram_workdir()
    warnings: list[str] = []
    lease = Lease(workdir, expires_after=0.4, warn=warnings.append)  # renewed every 0.1 s
    with lease.held():
        first = read_lease(f"{workdir}/{LEASE}", print).heartbeat
        _wait_until(lambda: read_lease(f"{workdir}/{LEASE}", print).heartbeat > first)
        record = _foreign_lease(workdir, age=0)  # someone takes it over (we looked dead)
        _wait_until(lambda: _noticed_takeover(lease, workdir))
        assert any("was taken over" in line for line in warnings)
        assert read_lease(f"{workdir}/{LEASE}", print).owner == record["owner"]  # not overwritten
    assert read_lease(f"{workdir}/{LEASE}", print).owner == record["owner"]  # nor deleted on exit


def test_a_trainer_whose_lease_is_taken_over_stops_without_writing_again():
    """The holder failed to renew (a partition) and another trainer took the workdir over:
    the run stops at the next step with one error (exit 75) instead of saving, so the new
    holder's lease and checkpoints are neither overwritten nor deleted."""
    workdir = _ram_workdir()
    ended = threading.Event()

    def take_over_once_running() -> None:
        _wait_until(lambda: tf.io.gfile.exists(f"{workdir}/{LEASE}"))
        while not ended.is_set():  # no compare-and-swap on ram://: a renewal may cross it once
            if read_lease(f"{workdir}/{LEASE}", print).owner != "someone-else":
                _foreign_lease(workdir, age=0)
            time.sleep(0.05)

    rival = threading.Thread(target=take_over_once_running, daemon=True)
    rival.start()
    lines: list[str] = []
    config = smoke_config(
        "data.synthetic_train_size=4096", "train.epochs=50", "train.steps_per_loop=2", "checkpoint.lease_seconds=2"
    )
    started = time.monotonic()
    try:
        with pytest.raises(WorkdirLostError, match=r"stopped before writing anything after step \d+") as lost:
            train(config, workdir, echo=lines.append)
    finally:
        ended.set()
        rival.join(timeout=10)
    assert lost.value.exit_code == EXIT_PREEMPTED
    assert time.monotonic() - started < 120  # stopped within steps of the takeover, not 50 epochs later
    assert any("no longer owns the workdir: it stops after the current step, without saving" in line for line in lines)
    assert read_lease(f"{workdir}/{LEASE}", print).owner == "someone-else"  # neither overwritten nor deleted
    assert checkpoint_steps(f"{workdir}/checkpoints") == []  # the stop's checkpoint was not written


def test_a_lost_hold_refuses_every_later_write_and_calls_back_once():
    """The pieces the run wires together: the hold tells the loop (its stop vote), and
    the checkpoint store and its uploader ask it before writing."""
    held = Ownership("ram://x/run")
    calls: list[str] = []
    held.when_lost(lambda: calls.append("stop"))
    held.require("anything")  # held: no error
    held._mark_lost("taken over (pid 1 on host h)")
    held.when_lost(lambda: calls.append("late"))  # registered after the loss: called at once
    assert calls == ["stop", "late"]
    with pytest.raises(WorkdirLostError, match=r"ram://x/run was taken over \(pid 1 on host h\), so this trainer"):
        held.require("saving the checkpoint of step 8")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    store = CheckpointStore(f"{_ram_workdir()}/checkpoints", model=model, require_held=held.require)
    with pytest.raises(WorkdirLostError, match="before saving the checkpoint of step 3"):
        store.save(step=3, epoch=0)
    assert checkpoint_steps(store.directory) == []


def test_letting_go_of_a_lease_never_raises_and_is_bounded():
    """A store that stops answering as the run ends: the delete gives up with a warning
    (the lease expires by itself) instead of an exception that would hide the run's end."""
    workdir = _ram_workdir()
    warnings: list[str] = []
    lease = Lease(workdir, expires_after=600, warn=warnings.append)

    def unreachable() -> None:
        raise StoreUnreachableError("cannot reach ram://: no network", url=workdir)

    with lease.held():
        lease.release = unreachable  # the store goes away before the end
    assert len(warnings) == 1 and warnings[0].startswith(f"Warning: could not delete the lease of {workdir}")
    assert "it expires 600s after its last renewal" in warnings[0]


def test_a_lease_from_another_machine_with_this_host_name_is_not_presumed_dead():
    """Two containers (or cloned VMs) may share a host name: a pid read from a lease
    written elsewhere means nothing here, so only its expiry frees the workdir."""
    now = time.time()
    mine = LeaseRecord("a", socket.gethostname(), 4_000_000, now, 600, this_machine())
    twin = LeaseRecord("b", socket.gethostname(), 4_000_000, now, 600, "another-boot/pid:[1]")
    older = LeaseRecord("c", socket.gethostname(), 4_000_000, now, 600)  # no machine: an older trainer's
    assert this_machine()  # Linux: a boot id and a pid namespace
    assert not mine.is_live(now)  # this machine, and no process 4000000: gone
    assert twin.is_live(now) and older.is_live(now)


def test_a_lease_deleted_or_damaged_while_held_is_lost_not_written_back():
    """Without compare-and-swap (ram://, s3://, gs:// without the extra): the trainer that
    took the workdir over finished and deleted its lease, or an operator deleted it, or it
    was damaged. Writing ours back would take the workdir from whoever is there now: the
    holder counts it as lost, says so once, and leaves it alone."""
    for damage in ("deleted", "damaged"):
        workdir = _ram_workdir()
        warnings: list[str] = []
        lease = Lease(workdir, expires_after=0.4, warn=warnings.append)  # renewed every 0.1 s
        with lease.held():
            if damage == "deleted":
                tf.io.gfile.remove(f"{workdir}/{LEASE}")
            else:
                with tf.io.gfile.GFile(f"{workdir}/.damage.tmp", "w") as handle:  # ram:// never truncates
                    handle.write("{not json")
                tf.io.gfile.rename(f"{workdir}/.damage.tmp", f"{workdir}/{LEASE}", overwrite=True)
            _wait_until(lambda lease=lease: lease.lost)
            time.sleep(0.3)  # more renewals would have come by now
            with pytest.raises(WorkdirLostError, match="was deleted or replaced by another file"):
                lease.require("saving")
        assert [line for line in warnings if "no longer owns" in line] == [warnings[-1]], warnings
        if damage == "deleted":
            assert not tf.io.gfile.exists(f"{workdir}/{LEASE}")  # not written back
        else:
            assert tf.io.gfile.GFile(f"{workdir}/{LEASE}").read() == "{not json"


def test_a_holder_that_could_not_renew_for_its_expiry_stops_writing():
    """Renewals that fail (no answer, a 403 on the lease object alone) for `expires_after`:
    others may take the workdir over by then and nothing tells this holder, so it counts
    the lease as lost itself: the next save is refused, as after a takeover."""
    workdir = _ram_workdir()
    warnings: list[str] = []
    lease = Lease(workdir, expires_after=600, warn=warnings.append)
    lease.acquire()
    lease.require("saving the checkpoint of step 8")  # renewed just now: held
    lease._renewed_at -= 601  # as if every renewal of the last 601 s had failed
    with pytest.raises(WorkdirLostError, match=r"was not renewed for 601s, its expiry, so this trainer stopped"):
        lease.require("saving the checkpoint of step 9")
    assert lease.lost and "the store did not answer" in warnings[-1]
    lease.release()  # lost: deletes nothing
    assert tf.io.gfile.exists(f"{workdir}/{LEASE}")


def test_an_upload_in_flight_stops_at_the_next_file_once_the_lease_is_lost():
    """The loss noticed while a checkpoint's data is copied: its index (and the state file,
    and the old checkpoints' removal) are not written, so the new holder's ckpt-N, which
    has the same name, is not overwritten."""
    from trainer import staging

    remote = f"{_ram_workdir()}/checkpoints"
    held = Ownership(remote)
    copied: list[str] = []

    def copy_then_lose(source: str, target: str) -> None:
        copied.append(target.rsplit("/", 1)[-1])
        held._mark_lost("taken over (pid 1 on host h)")

    uploads = staging.CheckpointUploads(remote, keep=2, require_held=held.require)
    checkpoint = tf.train.Checkpoint(v=tf.Variable(np.arange(4.0)))
    tf.train.CheckpointManager(checkpoint, uploads.local, max_to_keep=2).save(checkpoint_number=1)
    original = staging.storage.copy_file
    staging.storage.copy_file = copy_then_lose
    try:
        uploads.submit(1)
        with pytest.raises(WorkdirLostError, match="before uploading ckpt-1.index"):
            uploads.wait()
    finally:
        staging.storage.copy_file = original
        uploads.close()
    assert copied == ["ckpt-1.data-00000-of-00001"]  # the data only: no index, no state file
    assert not tf.io.gfile.exists(f"{remote}/checkpoint")


def test_a_damaged_lease_is_warned_about_and_treated_as_free():
    workdir = _ram_workdir()
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(f"{workdir}/{LEASE}", "w") as handle:
        handle.write('{"owner": ')
    warnings: list[str] = []
    check_free(workdir, warnings.append)
    assert len(warnings) == 1 and "is damaged" in warnings[0]


def test_a_sigkilled_holder_on_another_process_blocks_until_gone(tmp_path):
    """The lease on any path (here a local folder, so two processes see it): a live holder
    blocks; SIGKILLed, its lease is taken over at once on the same host (its pid is gone)."""
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from trainer.lease import Lease
                with Lease({workdir!r}, expires_after=600).held():
                    print("held", flush=True)
                    time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            check_free(workdir, print)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert read_lease(f"{workdir}/{LEASE}", print).pid == holder.pid  # a SIGKILL leaves the lease behind...
    warnings: list[str] = []
    check_free(workdir, warnings.append)  # ...but nobody holds it any more
    with Lease(workdir, expires_after=600, warn=warnings.append).held():
        assert read_lease(f"{workdir}/{LEASE}", print).pid == os.getpid()
    assert any("taking over the lease" in line for line in warnings)


def test_staged_checkpoints_reach_the_store_in_a_safe_order_and_failures_are_not_silent(tmp_path):
    """CheckpointUploads: the index after its data, the state file naming the newest, only
    `keep` kept; and an upload that fails is raised at the next wait, not swallowed."""
    from trainer.staging import CheckpointUploads

    remote = f"{_ram_workdir()}/checkpoints"
    variable = tf.Variable(np.arange(4.0))
    uploads = CheckpointUploads(remote, keep=2)
    checkpoint = tf.train.Checkpoint(v=variable)
    manager = tf.train.CheckpointManager(checkpoint, uploads.local, max_to_keep=2)
    for step in (1, 2, 3):
        variable.assign_add(np.ones(4))
        manager.save(checkpoint_number=step)
        uploads.submit(step)
    uploads.wait()
    assert checkpoint_steps(remote) == [3, 2]
    state = tf.io.gfile.GFile(f"{remote}/checkpoint").read()
    assert state.startswith('model_checkpoint_path: "ckpt-3"')
    restored = tf.Variable(np.zeros(4))
    tf.train.Checkpoint(v=restored).restore(_local_copy(remote, "ckpt-3", Path(uploads.local) / "copy"))
    np.testing.assert_array_equal(restored.numpy(), np.arange(4.0) + 3)
    uploads.close()
    assert not os.path.exists(uploads.local)

    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the checkpoint folder should be")  # every upload fails
    broken = CheckpointUploads(str(blocked), keep=2)
    manager = tf.train.CheckpointManager(checkpoint, broken.local, max_to_keep=2)
    manager.save(checkpoint_number=1)
    broken.submit(1)
    with pytest.raises(OSError):
        broken.wait()
    broken.close()


def test_non_chief_scratch_checkpoints_stay_off_the_store(tmp_path):
    """A non-chief worker's throw-away saves go to local disk for a remote workdir (on a
    shared disk they stay in the workdir, where --fresh can find them)."""
    from trainer import storage
    from trainer.workdir import Workdir

    remote = Workdir("gs://bucket/run").worker_temp(1)
    assert not storage.is_url(remote) and remote != Workdir("gs://bucket/run").worker_temp(2)
    assert Workdir(tmp_path).worker_temp(1) == str(tmp_path / ".worker-temp" / "worker-1")


def test_a_workdir_on_a_filesystem_tensorflow_does_not_know_is_one_line():
    from tests.test_safety import assert_one_error

    for command in (["train", "--config", SMOKE], ["evaluate"], ["export"]):
        result = CliRunner().invoke(cli, [*command, "--workdir", "nosuch://bucket/run"])
        assert_one_error(result, "no filesystem for nosuch://", "tensorflow-io")
