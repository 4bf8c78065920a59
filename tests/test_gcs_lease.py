"""The lease of a gs:// workdir as a compare-and-swap on the object's generation
(trainer/gcs_lease.py, issue #27 item 2), proven on the GCS emulator (tests/gcs_emulator.py:
fake-gcs-server behind mitmproxy, whose faults google-cloud-storage meets as TensorFlow does).

- two processes race for the same lease at the same instants, many rounds: exactly one
  wins each, on a fresh workdir and on one whose holder died (an expired lease);
- a holder whose lease was taken over learns it at its next renewal and deletes nothing;
- a write whose answer was lost (the store acted, the reply was cut off) is read back:
  the holder keeps its lease, and racing under such faults still has one winner;
- without google-cloud-storage the tf.io.gfile lease is used, with one warning naming the
  `gcs` extra and the race it leaves open.

The racers use the lease API (no TensorFlow, no training), so a round costs two or three
requests. The end-to-end check that `launch train` on gs:// uses this lease is in
tests/test_gcs_emulator.py (the full flow, slow).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.gcs_emulator import EmulatorUnavailable, GcsEmulator
from trainer import gcs_lease, lease
from trainer.errors import StoreDeniedError, StoreUnreachableError, WorkdirBusyError
from trainer.lease import LEASE, Lease, LeaseRecord

REPO = Path(__file__).resolve().parents[1]  # not tests.conftest's: the racers must not import TensorFlow
EXPIRED = {"owner": "dead-trainer", "host": "elsewhere", "pid": 4242, "heartbeat": 1_000.0, "expires_after": 120}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator for this module, with its variables in this process's environment
    (google-cloud-storage reads STORAGE_EMULATOR_HOST when a client is made)."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs-lease-emulator"))
    try:
        emulator.start()
    except EmulatorUnavailable as err:
        emulator.stop()
        if "not installed" in str(err):
            pytest.skip(f"GCS emulator: {err}")  # no dev extra; CI installs it
        pytest.fail(f"GCS emulator: {err}")
    saved = {name: os.environ.get(name) for name in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        emulator.stop()


def _stored(gcs: GcsEmulator, bucket: str, folder: str) -> dict:
    return json.loads(gcs.download(bucket, f"{folder}/{LEASE}"))


# ---------------------------------------------------------------------------- the race


def race_main(bucket: str, prefix: str, start: float, rounds: int, period: float, barrier: str) -> None:
    """One contender (run in its own process): at `start + k * period`, take the lease of
    gs://BUCKET/PREFIX/round-k; one JSON line per round: who it is and whether it won.
    Then it waits (at the `barrier` folder) for the other: a winner that exited before the
    loser had read its lease would be a holder gone from this host, whose lease is taken
    over at once, by design."""
    for k in range(rounds):
        time.sleep(max(0.0, start + k * period - time.time()))
        contender = Lease(f"gs://{bucket}/{prefix}/round-{k}", expires_after=600, warn=lambda _: None)
        try:
            contender.acquire()
            outcome = "won"
        except WorkdirBusyError:
            outcome = "busy"
        except OSError as err:  # the store never answered in time: neither won nor refused
            outcome = f"error: {err}"
        print(json.dumps({"round": k, "owner": contender.owner, "outcome": outcome}), flush=True)
    Path(barrier, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)


def _race(gcs: GcsEmulator, bucket: str, prefix: str, rounds: int, period: float) -> list[list[dict]]:
    """Two contender processes on the same rounds: each round's two outcomes."""
    start = time.time() + 2.0  # both are started (python + google-cloud-storage imported) by then
    barrier = gcs.root / f"barrier-{bucket}-{prefix}"
    barrier.mkdir()
    arguments = f"{bucket!r}, {prefix!r}, {start!r}, {rounds}, {period}, {str(barrier)!r}"
    code = f"from tests.test_gcs_lease import race_main; race_main({arguments})"
    env = gcs.subprocess_env(PYTHONPATH=str(REPO))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    try:
        answers = [racer.communicate(timeout=60 + rounds * period * 4) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    lines = []
    for racer, (out, err) in zip(racers, answers):
        assert racer.returncode == 0, err
        lines.append([json.loads(line) for line in out.splitlines()])
    assert [len(each) for each in lines] == [rounds, rounds], lines
    return [[lines[0][k], lines[1][k]] for k in range(rounds)]


def _assert_one_winner_each(gcs: GcsEmulator, bucket: str, prefix: str, outcomes: list[list[dict]]) -> None:
    for k, pair in enumerate(outcomes):
        assert sorted(each["outcome"] for each in pair) == ["busy", "won"], (k, pair)
        (winner,) = [each["owner"] for each in pair if each["outcome"] == "won"]
        assert _stored(gcs, bucket, f"{prefix}/round-{k}")["owner"] == winner, k  # and the store agrees


def _refused_writes(gcs: GcsEmulator, since: int) -> int:
    """Conditional writes the store answered 412: a race decided by the precondition."""
    return sum(" 412" in line and "ifGenerationMatch" in line for line in gcs.requests_seen()[since:])


def test_two_processes_racing_for_a_fresh_or_an_expired_lease_never_both_win(store):
    """20 rounds on a fresh workdir, then 10 whose lease's holder died long ago: at the same
    instant two processes take the lease. Exactly one wins each round, the other is refused
    (WorkdirBusyError), and the lease holds the winner's owner id. With tf.io.gfile both
    could win: each saw no lease, each wrote its own."""
    fresh, expired = 20, 10
    bucket = store.make_bucket("race").removeprefix("gs://")
    for k in range(fresh, fresh + expired):
        store.upload(bucket, f"run/round-{k}/{LEASE}", json.dumps(EXPIRED).encode())
    seen = len(store.requests_seen())
    outcomes = _race(store, bucket, "run", fresh + expired, period=0.3)
    _assert_one_winner_each(store, bucket, "run", outcomes)
    decided = _refused_writes(store, seen)
    print(f"\n{fresh + expired} races, one winner each; {decided} decided by the store's precondition")
    assert decided >= 1  # the racers did meet at the store (not one after the other)


def test_racing_while_answers_are_lost_or_refused_still_has_one_winner(store):
    """The same race while a fifth of the requests fail (503, a dropped connection, or a
    lost answer: the store wrote, the reply was cut off): still exactly one winner a round,
    and no holder mistakes its own landed write for a rival's."""
    bucket = store.make_bucket("faulty-race").removeprefix("gs://")
    before = store.stats()
    store.set_faults(0.2, ("503", "drop", "lost"), seed=27)
    outcomes = _race(store, bucket, "run", 8, period=0.6)
    store.set_faults(0.0)
    _assert_one_winner_each(store, bucket, "run", outcomes)
    faults = {kind: store.stats()[kind] - before.get(kind, 0) for kind in ("503", "drop", "lost")}
    print(f"\n8 races under faults {faults}: one winner each")
    assert sum(faults.values()) >= 3, faults


def test_racing_when_every_answer_to_a_write_is_lost_still_has_one_winner(store):
    """Every conditional write lands (or is refused) and its answer is cut off: the winner
    reads back its own lease and keeps it, the loser reads back the winner's and is refused."""
    bucket = store.make_bucket("lost-race").removeprefix("gs://")
    seen = len(store.requests_seen())
    store.fault_next("lost", "POST", "ifGenerationMatch", count=12)  # both writes of 6 rounds at most
    outcomes = _race(store, bucket, "run", 6, period=0.5)
    store.set_faults(0.0)
    _assert_one_winner_each(store, bucket, "run", outcomes)
    lost = [line for line in store.requests_seen()[seen:] if line.startswith("POST ") and line.endswith("(lost)")]
    print(f"\n6 races, {len(lost)} answers to writes lost: one winner each")
    assert len(lost) >= 6, lost  # each round's winning write among them


@pytest.mark.slow
def test_a_hundred_races_never_have_two_winners(store):
    """The long variant: 100 rounds at the same instant, then 50 more under faults."""
    bucket = store.make_bucket("long-race").removeprefix("gs://")
    seen = len(store.requests_seen())
    _assert_one_winner_each(store, bucket, "clean", _race(store, bucket, "clean", 100, period=0.3))
    decided = _refused_writes(store, seen)
    before = store.stats()
    store.set_faults(0.2, ("503", "drop", "lost"), seed=5)
    outcomes = _race(store, bucket, "faulty", 50, period=0.6)
    store.set_faults(0.0)
    _assert_one_winner_each(store, bucket, "faulty", outcomes)
    faults = {kind: store.stats()[kind] - before.get(kind, 0) for kind in ("503", "drop", "lost")}
    print(f"\n100 races ({decided} decided by the precondition), then 50 under faults {faults}: one winner each")


# ---------------------------------------------------------------------------- one holder


def _wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_holder_whose_lease_was_taken_over_learns_it_at_its_next_renewal(store):
    """A holds the lease, renewing every 0.5 s; B takes it over (A's pid is this process's,
    which the lease reads as a predecessor's that is gone). A's next renewal fails its
    precondition: A says so once, stops renewing, and deletes nothing on its way out."""
    bucket = store.make_bucket("takeover").removeprefix("gs://")
    said_a, said_b = [], []
    holder = Lease(f"gs://{bucket}/run", expires_after=2, warn=said_a.append)
    with holder.held():
        first = _stored(store, bucket, "run")["heartbeat"]
        _wait_until(lambda: _stored(store, bucket, "run")["heartbeat"] > first)  # renewed
        rival = Lease(f"gs://{bucket}/run", expires_after=600, warn=said_b.append)
        rival.acquire()
        _wait_until(lambda: holder.lost)
        time.sleep(1.2)  # two more renewals would have come by now
    (line,) = said_a
    assert line.startswith(f"Warning: the lease of gs://{bucket}/run was taken over (pid {os.getpid()} on host ")
    assert line.endswith("this trainer no longer owns the workdir: it stops after the current step, without saving")
    assert "taking over the lease" in said_b[0]
    assert _stored(store, bucket, "run")["owner"] == rival.owner  # neither overwritten nor deleted
    rival.release()
    assert store.objects(bucket) == []


def test_lost_answers_do_not_make_a_holder_doubt_its_own_lease(store):
    """The store acts and the reply is cut off, once each for the create, a renewal and the
    delete: the write is read back and recognised as ours (the retry would have been
    answered 412, "someone else"); the generation it landed at is the one renewed next."""
    bucket = store.make_bucket("lost").removeprefix("gs://")
    said = []
    holder = Lease(f"gs://{bucket}/run", expires_after=600, warn=said.append)
    seen = len(store.requests_seen())
    store.fault_next("lost", "POST", "ifGenerationMatch=0")
    holder.acquire()
    assert _stored(store, bucket, "run")["owner"] == holder.owner
    store.fault_next("lost", "POST", "ifGenerationMatch")
    holder.renew()
    store.set_faults(0.0)
    holder.renew()  # at the generation the lost write landed at: a wrong one would be a 412
    assert not holder.lost and said == []
    store.fault_next("lost", "DELETE", LEASE)
    holder.release()
    store.set_faults(0.0)
    assert store.objects(bucket) == []
    log = store.requests_seen()[seen:]
    assert sum(line.endswith("(lost)") for line in log) == 3, log
    assert not [line for line in log if " 412" in line], log  # no blind retry: read back first


class _FakeBlob:
    """A blob of _FakeStore: generation-checked writes, with scripted connection losses."""

    def __init__(self, store: _FakeStore) -> None:
        self.store, self.generation = store, None

    def download_as_bytes(self, timeout: float, retry: None) -> bytes:
        if self.store.data is None:
            raise _not_found()
        self.generation = self.store.generation
        return self.store.data

    def upload_from_string(self, data: bytes, content_type: str, if_generation_match: int, timeout, retry) -> None:
        self.store.land_delayed()
        if self.store.script:
            step = self.store.script.pop(0)
            if step == "delay":  # sent, stuck on the way: it lands just before the next write
                self.store.delayed = (data, if_generation_match)
                raise ConnectionError("connection reset")
        self.store.write(data, if_generation_match)
        self.generation = self.store.generation


def _not_found() -> Exception:
    from google.api_core import exceptions

    return exceptions.NotFound("no such object")


class _FakeStore:
    def __init__(self, data: bytes | None, script: list[str]) -> None:
        self.data, self.generation, self.script = data, 1 if data else 0, script
        self.delayed: tuple[bytes, int] | None = None

    def write(self, data: bytes, expected: int) -> None:
        from google.api_core import exceptions

        if expected != self.generation:
            raise exceptions.PreconditionFailed("generation mismatch")
        self.data, self.generation = data, self.generation + 1

    def land_delayed(self) -> None:
        if self.delayed is not None:
            delayed, self.delayed = self.delayed, None
            self.write(*delayed)

    def bucket(self, name: str) -> _FakeStore:
        return self

    def blob(self, name: str) -> _FakeBlob:
        return _FakeBlob(self)


def test_a_write_that_lands_after_its_retry_was_sent_is_still_ours():
    """The rarest lost answer: the first write is stuck on the way and lands only after the
    read-back showed nothing; its resend is answered 412. Read back again, the object holds
    our content: ours, at the generation it landed at. A rival's content is a loss."""
    client = _FakeStore(None, ["delay"])
    guarded = gcs_lease.GuardedObject("gs://bkt/run/.lease.json", client=client)
    written = guarded.write_if(b"mine", 0, lambda data: data == b"mine", deadline_s=10)
    assert written == gcs_lease.Written(True, gcs_lease.Version(b"mine", 1))
    rival = _FakeStore(b"theirs", [])
    lost = gcs_lease.GuardedObject("gs://bkt/run/.lease.json", client=rival).write_if(
        b"mine", 0, lambda data: data == b"mine", deadline_s=10
    )
    assert lost == gcs_lease.Written(False, gcs_lease.Version(b"theirs", 1))


def test_a_store_that_refuses_or_never_answers_is_one_typed_error(store):
    """A 403 is StoreDeniedError at once, in trainer.storage's words; no answer at all is
    StoreUnreachableError at the operation's deadline, naming the URL and the reason."""
    bucket = store.make_bucket("refusing").removeprefix("gs://")
    store.deny_everything()
    with pytest.raises(StoreDeniedError, match=r"refused access to gs://refusing/run/\.lease\.json \(HTTP 403: denied"):
        Lease(f"gs://{bucket}/run", expires_after=600).acquire()
    store.set_faults(1.0, ("drop",))
    started = time.monotonic()
    with pytest.raises(
        StoreUnreachableError, match=r"cannot reach gs://refusing/run/\.lease\.json \(.*, after \d+ tries"
    ):
        gcs_lease.GuardedObject(f"gs://{bucket}/run/{LEASE}").read(deadline_s=1.5)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------- the fallback


def test_without_google_cloud_storage_the_gfile_lease_is_used_with_one_warning(monkeypatch):
    """google-cloud-storage missing: gs:// falls back to the tf.io.gfile lease (its read is
    stubbed here: a live lease, so acquire refuses without a store), and says once per
    process what that leaves open and which extra closes it. Other stores: no warning."""
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # `import` raises ImportError
    monkeypatch.setattr(gcs_lease, "_warned", set())
    live = LeaseRecord("someone", socket.gethostname(), 1, time.time(), 600)
    monkeypatch.setattr(lease, "read_lease", lambda path, warn: live)
    said = []
    for _ in range(2):
        with pytest.raises(WorkdirBusyError, match="is in use by another trainer"):
            Lease("gs://bkt/run", expires_after=600, warn=said.append).acquire()
    assert gcs_lease.guarded_object("ram://run/.lease.json", said.append) is None
    assert len(said) == 1, said
    assert "google-cloud-storage is not installed" in said[0] and "[gcs]" in said[0], said
    assert "two trainers started within the same second can both believe they hold the workdir" in said[0]


def test_with_google_cloud_storage_only_gs_gets_the_guarded_lease(monkeypatch):
    monkeypatch.setattr(gcs_lease, "_warned", set())
    said = []
    assert isinstance(gcs_lease.guarded_object("gs://bkt/run/.lease.json", said.append), gcs_lease.GuardedObject)
    assert gcs_lease.guarded_object("s3://bkt/run/.lease.json", said.append) is None
    assert said == []


def test_the_heartbeat_thread_is_not_left_behind(store):
    """held() on gs:// stops its renewals and releases on the way out."""
    bucket = store.make_bucket("heartbeat").removeprefix("gs://")
    with Lease(f"gs://{bucket}/run", expires_after=0.4).held():
        assert any(thread.name == "lease-heartbeat" for thread in threading.enumerate())
    assert not any(thread.name == "lease-heartbeat" for thread in threading.enumerate())
    assert store.objects(bucket) == []


def test_a_renewal_that_landed_unheard_is_still_deleted_on_release_and_a_rivals_never_is(store):
    """Letting go while a renewal is in flight: the renewal may land after the holder last
    heard of its generation. Release recognises its own content at a newer generation and
    deletes it (no lease left behind for 10 minutes), but never a rival's; and a renewal
    that meets a rival while letting go is no "lease lost" warning."""
    bucket = store.make_bucket("release").removeprefix("gs://")
    said: list[str] = []
    holder = Lease(f"gs://{bucket}/run", expires_after=600, warn=said.append)
    holder.acquire()
    known = holder._generation
    holder._guarded.write_if(holder._text().encode(), known, holder._is_ours, 10)  # landed, its answer unseen
    holder.release()  # still at the older generation in the holder's mind
    assert store.objects(bucket) == []

    holder.acquire()
    rival = json.dumps({**EXPIRED, "owner": "rival", "heartbeat": time.time()}).encode()
    holder._guarded.write_if(rival, holder._generation, lambda data: data == rival, 10)
    holder._stop.set()  # letting go: a renewal in flight now meets the rival
    with contextlib.suppress(StoreUnreachableError):  # cancelled: the heartbeat thread drops it
        holder._renew_guarded(holder._guarded)
    assert not holder.lost and said == []
    holder.release()
    assert _stored(store, bucket, "run")["owner"] == "rival"  # not deleted: not ours
