"""One trainer per workdir on stores without file locks (gs://, s3://, ram://): a lease.

A local workdir uses `flock`, which the kernel releases when its holder dies. An object
store has nothing like it, so the trainer keeps a lease object, WORKDIR/.lease.json:

    {"owner": "<uuid of this run>", "host": "...", "pid": 123, "heartbeat": <unix time>,
     "expires_after": 120}

The holder rewrites `heartbeat` every `expires_after / 4` seconds from a background
thread and deletes the lease when it ends (SIGTERM and errors included). A trainer that
finds a live lease is refused with one line; one that finds a lease not renewed for
`expires_after` seconds (its holder was SIGKILLed, or its VM vanished) takes it over
with a warning. A lease written on this machine by a process that is gone is taken over
at once ("this machine": the same host name, boot and process namespace, so two containers
or VMs that share a host name never read each other's pids). The expiry time travels in the
lease, so readers (`launch evaluate`) need no config.

A holder that learns at a renewal that its lease was taken over (it could not renew for
`expires_after`: a network partition, a frozen VM) has lost the workdir: `Ownership`
tells the run, which stops at the next step without saving (WorkdirLostError, exit 75),
and every later write (a checkpoint, an upload) asks `require()` first and is refused.

On gs:// with google-cloud-storage (the `gcs` extra), every write of the lease is a
compare-and-swap on the object's generation (trainer.gcs_lease): acquiring creates it only
if absent, or replaces the expired lease only if it is still the one read; renewing
replaces only our own last version; releasing deletes only that. Of two trainers started
at the same moment exactly one wins, the other is refused with the usual one line; a
holder whose lease was taken over learns it at its next renewal, stops renewing and says
so; a write whose answer was lost is read back, not mistaken for a rival's.

Letting go is bounded (a spot VM's grace period is about 30 s): the heartbeat thread is
cancelled and waited for `_JOIN_S`, the delete retried for `_RELEASE_DEADLINE_S`; a delete
that fails is a warning (the lease expires by itself), never an error that would hide how
the run ended. On gs:// a renewal still in flight when the lease is deleted cannot
resurrect it: it is conditional on the generation the delete removed. Without
compare-and-swap a renewal checks that letting go has not begun just before it writes (a
window of one write remains).

The holder also counts its lease as lost when it finds it deleted or damaged at a renewal
(writing it back would take the workdir from whoever is there now), or when no renewal
landed for `expires_after` (others may have taken it over by then, unannounced).

Elsewhere (s3://, ram://, and gs:// without the package, which warns once) the lease goes
through tf.io.gfile, which offers no compare-and-swap: two trainers started within the
same second can both believe they won; the lease is re-read after writing to catch most
of these, and a holder that finds someone else's lease at renewal stops renewing and says
so. Either way the clocks of the hosts must roughly agree (seconds, not minutes), since
the heartbeat is compared with the reader's clock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

from trainer import files, gcs_lease, storage
from trainer.errors import TrainerError, WorkdirBusyError, WorkdirLostError
from trainer.lease_record import (
    LEASE,
    Clock,
    LeaseRecord,
    busy_error,
    check_free,
    duration,
    lease_of,
    read_lease,
    this_machine,
)
from trainer.say import Say

__all__ = ["LEASE", "Lease", "LeaseRecord", "Ownership", "check_free", "read_lease", "this_machine"]

# gs:// with generations: how long acquiring may retry a store that does not answer, and
# how many times the lease may change under an acquire before it gives up.
_STORE_DEADLINE_S = 30.0
_ACQUIRE_ROUNDS = 3
# Letting go, within a spot VM's ~30 s grace period together with the last checkpoint.
_JOIN_S = 10.0
_RELEASE_DEADLINE_S = 10.0


def _elapsed() -> float:
    """Seconds on a clock that counts a suspended or frozen VM's pause (CLOCK_BOOTTIME where
    there is one) and never jumps with NTP: how long since the lease was last renewed."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class Ownership:
    """A trainer's hold on its workdir, as the run sees it: `require()` before each write.

    A file lock (local disks) is never lost while its process lives: this base class. A
    lease (object stores) can be, when another trainer takes it over: `Lease` marks it
    lost, calls what `when_lost` registered (the run's stop vote), and from then on
    `require` raises WorkdirLostError instead of letting the write overwrite the new
    holder's work.
    """

    def __init__(self, root: str = "") -> None:
        self.root = root
        self._lost = threading.Event()
        self._why = ""
        self._callbacks: list[Callable[[], object]] = []

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def when_lost(self, callback: Callable[[], object]) -> None:
        """Call `callback` (from the heartbeat thread) once the hold is lost; at once if it is."""
        self._callbacks.append(callback)
        if self.lost:
            callback()

    def require(self, doing: str) -> None:
        """Raise WorkdirLostError if the hold was lost: `doing` (a checkpoint's save, say) must not happen."""
        if self.lost:
            raise WorkdirLostError(
                f"the lease of {self.root} was {self._why}, so this trainer stopped before {doing}: writing now "
                "would overwrite the work of the trainer that holds the workdir. Make sure only one trainer runs "
                "there; once it is free, the same command resumes from its last checkpoint"
            )

    def _mark_lost(self, why: str) -> None:
        self._why = why
        self._lost.set()
        for callback in self._callbacks:
            callback()


class Lease(Ownership):
    """This trainer's claim on a workdir: `with Lease(...).held(): ...`."""

    def __init__(self, root: str, expires_after: float, warn: Say = print, clock: Clock = time.time) -> None:
        super().__init__(root)
        self.path = storage.join(root, LEASE)
        self.expires_after = expires_after
        self.warn = warn
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        # gs:// with the `gcs` extra: the object under generation preconditions, and the
        # generation of our last write (chosen in acquire, which warns if it falls back).
        self._guarded: gcs_lease.GuardedObject | None = None
        self._generation = 0
        self._renewed_at: float | None = None  # _elapsed() at the last write that landed

    def _record(self) -> LeaseRecord:
        return LeaseRecord(
            self.owner, socket.gethostname(), os.getpid(), self.clock(), self.expires_after, this_machine()
        )

    def _text(self) -> str:
        return json.dumps(asdict(self._record()), indent=2) + "\n"

    def _write(self) -> None:
        files.write_text(self.path, self._text())

    def acquire(self) -> None:
        self._guarded = gcs_lease.guarded_object(self.path, self.warn)
        if self._guarded is not None:
            self._acquire_guarded(self._guarded)
            return
        self._refuse_if_live(read_lease(self.path, self.warn))
        storage.makedirs(self.root)
        self._write()
        written = read_lease(self.path, self.warn)
        if written is None:
            raise WorkdirBusyError(f"{self.root}: the lease just written cannot be read back; try again")
        if written.owner != self.owner:  # another trainer wrote it at the same moment, and won
            raise busy_error(self.root, written, self.clock())
        self._renewed_at = _elapsed()

    def _refuse_if_live(self, record: LeaseRecord | None) -> None:
        """Refuse while someone else's lease is live; warn when taking over a dead one's."""
        now = self.clock()
        if record is None or record.owner == self.owner:
            return
        if record.is_live(now):
            raise busy_error(self.root, record, now)
        self.warn(
            f"Warning: taking over the lease of {self.root} from a trainer presumed dead ({record.describe(now)})"
        )

    def _acquire_guarded(self, guarded: gcs_lease.GuardedObject) -> None:
        """Create the lease if absent, or replace the dead one just read if it is still that
        one: of trainers racing, exactly one write goes through; a loser sees the winner."""
        for _ in range(_ACQUIRE_ROUNDS):
            current = guarded.read(_STORE_DEADLINE_S)
            self._refuse_if_live(self._decoded(current.data, self.warn))
            written = guarded.write_if(self._text().encode(), current.generation, self._is_ours, _STORE_DEADLINE_S)
            if written.won:
                self._generation = written.version.generation
                self._renewed_at = _elapsed()
                return
            rival = self._decoded(written.version.data, lambda _: None)
            if rival is not None and rival.is_live(self.clock()):
                raise busy_error(self.root, rival, self.clock())
        raise WorkdirBusyError(
            f"{self.root}: the lease changed {_ACQUIRE_ROUNDS} times while this trainer tried to take it (other "
            "trainers are starting on this workdir); wait for them, or pick another --workdir"
        )

    def _decoded(self, data: bytes | None, warn: Say) -> LeaseRecord | None:
        """The lease in `data` (None: no object); damage is warned about and counts as none."""
        if data is None:
            return None
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as err:
            warn(
                f"Warning: {self.path} is damaged ({type(err).__name__}: {files.short(str(err))}); treating the "
                "workdir as free"
            )
            return None
        return lease_of(raw, self.path, warn)

    def _is_ours(self, data: bytes) -> bool:
        record = self._decoded(data, lambda _: None)
        return record is not None and record.owner == self.owner

    def renew(self) -> None:
        """Rewrite the heartbeat, unless someone else holds the lease now (then say so once)."""
        if self.lost or self._stop.is_set():
            return
        if self._guarded is not None:
            self._renew_guarded(self._guarded)
            return
        record = read_lease(self.path, lambda _: None)
        if record is None or record.owner != self.owner:
            # Gone or unreadable: someone deleted it (a trainer that took over and ended, an
            # operator); writing ours back would take the workdir from whoever is there.
            self._lose(record)
            return
        if self._stop.is_set():  # letting go began while we read: a write now would outlive the delete
            return
        self._write()
        self._renewed_at = _elapsed()

    def _renew_guarded(self, guarded: gcs_lease.GuardedObject) -> None:
        """Replace our last version only: if anything else is there now, the lease was lost.
        Retried for at most a quarter of the expiry (then the next renewal tries again)."""
        deadline = max(1.0, min(20.0, self.expires_after / 4))
        written = guarded.write_if(self._text().encode(), self._generation, self._is_ours, deadline, self._stop)
        if written.won:
            self._generation = written.version.generation
            self._renewed_at = _elapsed()
        else:
            self._lose(self._decoded(written.version.data, lambda _: None))

    def _lose(self, record: LeaseRecord | None) -> None:
        """Someone else's lease is there now: say so once and stop the run. Not while letting
        go: the lease is being deleted by us, and a renewal that crossed the delete saw that."""
        if self._stop.is_set():
            return
        holder = f"taken over ({record.describe(self.clock())})" if record else "deleted or replaced by another file"
        self.warn(
            f"Warning: the lease of {self.root} was {holder}; this trainer no longer owns the workdir: it stops "
            "after the current step, without saving"
        )
        self._mark_lost(holder)

    def release(self) -> None:
        """Delete the lease if it is still ours (bounded by _RELEASE_DEADLINE_S)."""
        if self.lost:
            return
        if self._guarded is not None:
            if self._generation:
                self._guarded.delete_if(self._generation, _RELEASE_DEADLINE_S, self._is_ours)
            return
        record = read_lease(self.path, lambda _: None)
        if record is not None and record.owner == self.owner:
            storage.remove(self.path)

    def require(self, doing: str) -> None:
        """Also lost once no renewal landed for `expires_after` (the store did not answer the
        heartbeat, or this VM was frozen): by then another trainer may have taken it over,
        and nothing tells this one, so it stops writing as if it had been told."""
        self._expire_if_stale()
        super().require(doing)

    def _expire_if_stale(self) -> None:
        if self.lost or self._renewed_at is None or self._stop.is_set():
            return
        silent = _elapsed() - self._renewed_at
        if silent < self.expires_after:
            return
        self.warn(
            f"Warning: the lease of {self.root} was not renewed for {duration(silent)} (the store did not answer), "
            "so another trainer may have taken the workdir over; this trainer no longer owns it: it stops after "
            "the current step, without saving"
        )
        self._mark_lost(f"not renewed for {duration(silent)}, its expiry")

    def _release_or_warn(self) -> None:
        """Release within _RELEASE_DEADLINE_S (in a thread: tf.io.gfile's own retries take
        minutes); a store that does not answer is a warning (the lease expires by itself),
        never an exception out of `held`'s `finally`, where it would hide how the run ended."""
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                self.release()
                outcome.append(None)
            except (OSError, TrainerError) as err:
                outcome.append(err)

        thread = threading.Thread(target=attempt, name="lease-release", daemon=True)
        thread.start()
        thread.join(_RELEASE_DEADLINE_S + 1)
        if outcome == [None]:
            return
        why = files.short(str(outcome[0])) if outcome else f"no answer within {_RELEASE_DEADLINE_S:.0f} s"
        self.warn(
            f"Warning: could not delete the lease of {self.root} ({why}); it expires "
            f"{duration(self.expires_after)} after its last renewal, and the next trainer takes it over then"
        )

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.expires_after / 4) and not self.lost:
            try:
                self.renew()
            # A store that failed once may answer next time; WorkdirWriteError and the like:
            # an answer that is no refusal of the lease (a bucket setting), said the same way.
            except (OSError, TrainerError) as err:
                if not self._stop.is_set():
                    self.warn(f"Warning: could not renew the lease of {self.root} ({files.short(str(err))})")
                    self._expire_if_stale()  # the run's stop vote, before it writes again

    @contextmanager
    def held(self) -> Iterator[Lease]:
        self.acquire()
        thread = threading.Thread(target=self._renew_until_stopped, name="lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()  # also cancels a renewal in flight (its retries)
            thread.join(timeout=_JOIN_S)
            self._release_or_warn()
