"""One trainer per workdir on stores without file locks (gs://, s3://, ram://): a lease.

A local workdir uses `flock`, which the kernel releases when its holder dies. An object
store has nothing like it, so the trainer keeps a lease object, WORKDIR/.lease.json:

    {"owner": "<uuid of this run>", "host": "...", "pid": 123, "heartbeat": <unix time>,
     "expires_after": 120}

The holder rewrites `heartbeat` every `expires_after / 4` seconds from a background
thread and deletes the lease when it ends (SIGTERM and errors included). A trainer that
finds a live lease is refused with one line; one that finds a lease not renewed for
`expires_after` seconds (its holder was SIGKILLed, or its VM vanished) takes it over
with a warning. A lease written on this host by a process that is gone is taken over at
once. The expiry time travels in the lease, so readers (`launch evaluate`) need no config.

On gs:// with google-cloud-storage (the `gcs` extra), every write of the lease is a
compare-and-swap on the object's generation (trainer.gcs_lease): acquiring creates it only
if absent, or replaces the expired lease only if it is still the one read; renewing
replaces only our own last version; releasing deletes only that. Of two trainers started
at the same moment exactly one wins, the other is refused with the usual one line; a
holder whose lease was taken over learns it at its next renewal, stops renewing and says
so; a write whose answer was lost is read back, not mistaken for a rival's.

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
from dataclasses import asdict, dataclass
from typing import Any

from trainer import files, gcs_lease, storage
from trainer.errors import TrainerError, WorkdirBusyError
from trainer.say import Say

LEASE = ".lease.json"
Clock = Callable[[], float]
# How far ahead of this host's clock a heartbeat may be before the clocks count as disagreeing.
_CLOCK_TOLERANCE = 10.0
# gs:// with generations: how long acquiring or releasing may retry a store that does not
# answer, and how many times the lease may change under an acquire before it gives up.
_STORE_DEADLINE_S = 30.0
_ACQUIRE_ROUNDS = 3


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    heartbeat: float
    expires_after: float

    def age(self, now: float) -> float:
        return now - self.heartbeat

    def is_live(self, now: float) -> bool:
        """Renewed recently enough, and not left on this host by a process that is gone."""
        return self.age(now) < self.expires_after and not self._holder_is_gone_from_this_host()

    def _holder_is_gone_from_this_host(self) -> bool:
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return True  # this process did not write it (its owner id is another): a predecessor's pid
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def is_ahead(self, now: float) -> bool:
        """Renewed "in the future": the two hosts' clocks disagree by more than a little."""
        return self.age(now) < -_CLOCK_TOLERANCE

    def describe(self, now: float) -> str:
        renewed = (
            f"heartbeat {duration(-self.age(now))} ahead of this host's clock"
            if self.is_ahead(now)
            else f"lease renewed {duration(self.age(now))} ago"
        )
        expiry = duration(self.expires_after)
        return f"pid {self.pid} on host {self.host}, {renewed}, expiring {expiry} after its last renewal"


def read_lease(path: str, warn: Say) -> LeaseRecord | None:
    """The lease at `path`, or None when there is none; a damaged one is warned about and
    counts as none (it is rewritten by the next holder)."""
    raw = files.read_json(path, warn, "treating the workdir as free")
    return None if raw is None else lease_of(raw, path, warn)


def lease_of(raw: Any, path: str, warn: Say) -> LeaseRecord | None:
    """A parsed lease file as a record; a damaged one is warned about and counts as none."""
    problem = _lease_problem(raw)
    if problem:
        warn(f"Warning: {path} is damaged ({problem}); treating the workdir as free")
        return None
    return LeaseRecord(raw["owner"], raw["host"], raw["pid"], float(raw["heartbeat"]), float(raw["expires_after"]))


_MAX_PID = 2**31 - 1  # pid_t
_LAST_HEARTBEAT = 253_402_300_799  # 9999-12-31 23:59:59 UTC: later is no clock reading, only damage
_LONGEST_EXPIRY = 10**7


def _one_line(value: Any) -> bool:
    """A short one-line string: it is echoed in an error line."""
    return isinstance(value, str) and len(value) <= 255 and value.splitlines() == [value]


# Each field of a lease and what a trainer could have written there. A pid outside pid_t
# made os.kill raise OverflowError, and pid 0 or -1 would signal a whole process group.
_LEASE_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "owner": ("a run id", _one_line),
    "host": ("a host name", _one_line),
    "pid": ("a process id", lambda value: files.integer_in(value, 1, _MAX_PID)),
    "heartbeat": ("a time before the year 10000", lambda value: files.number_in(value, 0, _LAST_HEARTBEAT)),
    "expires_after": ("a number of seconds", lambda value: files.number_in(value, 1e-3, _LONGEST_EXPIRY)),
}


def _lease_problem(raw: Any) -> str | None:
    """Which field of a parsed lease is not what a trainer writes, or None."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    for key, (meaning, valid) in _LEASE_FIELDS.items():
        if key not in raw:
            return f"no {key}"
        if not valid(raw[key]):
            return f"{key} is not {meaning}: {files.short(json.dumps(raw[key]), 40)}"
    return None


def busy_error(root: str, record: LeaseRecord, now: float) -> WorkdirBusyError:
    if record.is_ahead(now):
        return _clock_skew_error(root, record, now)
    wait = max(record.expires_after - record.age(now), 0)
    return WorkdirBusyError(
        f"{root} is in use by another trainer ({record.describe(now)}); wait for it to finish, stop it, or pick "
        f"another --workdir (if that trainer is dead, its lease expires in {duration(wait)})"
    )


def _clock_skew_error(root: str, record: LeaseRecord, now: float) -> WorkdirBusyError:
    """A heartbeat from the future: the holder's clock (or this one) is wrong, and waiting
    for "expiry" could take years. Say so, and how to get out, instead of a countdown."""
    wait = record.expires_after - record.age(now)
    return WorkdirBusyError(
        f"{root} is held by pid {record.pid} on host {record.host}, whose last heartbeat ({_utc(record.heartbeat)}) "
        f"is {duration(-record.age(now))} ahead of this host's clock ({_utc(now)}): the two clocks disagree. "
        f"Check the clock of this host and of {record.host}; the lease counts as live for {duration(wait)} more. "
        f"If no trainer runs on {record.host}, delete {root}/{LEASE}, or pick another --workdir"
    )


def duration(seconds: float) -> str:
    """Seconds as a person reads them, capped: a damaged clock must not print 998204150770s."""
    if seconds < 100_000:
        return f"{max(seconds, 0):.0f}s"
    if seconds < 365 * 86_400:
        return f"{seconds / 86_400:.0f} days"
    return "more than a year"


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def check_free(root: str, warn: Say, clock: Clock = time.time) -> None:
    """Refuse, without writing anything, while another trainer's lease is live."""
    record = read_lease(storage.join(root, LEASE), warn)
    if record is not None and record.is_live(clock()):
        raise busy_error(root, record, clock())


class Lease:
    """This trainer's claim on a workdir: `with Lease(...).held(): ...`."""

    def __init__(self, root: str, expires_after: float, warn: Say = print, clock: Clock = time.time) -> None:
        self.root = root
        self.path = storage.join(root, LEASE)
        self.expires_after = expires_after
        self.warn = warn
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        # gs:// with the `gcs` extra: the object under generation preconditions, and the
        # generation of our last write (chosen in acquire, which warns if it falls back).
        self._guarded: gcs_lease.GuardedObject | None = None
        self._generation = 0

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self.clock(), self.expires_after)

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
        if self.lost:
            return
        if self._guarded is not None:
            self._renew_guarded(self._guarded)
            return
        record = read_lease(self.path, lambda _: None)
        if record is not None and record.owner != self.owner:
            self._lose(record)
            return
        self._write()

    def _renew_guarded(self, guarded: gcs_lease.GuardedObject) -> None:
        """Replace our last version only: if anything else is there now, the lease was lost.
        Retried for at most a quarter of the expiry (then the next renewal tries again)."""
        deadline = max(1.0, min(20.0, self.expires_after / 4))
        written = guarded.write_if(self._text().encode(), self._generation, self._is_ours, deadline, self._stop)
        if written.won:
            self._generation = written.version.generation
        else:
            self._lose(self._decoded(written.version.data, lambda _: None))

    def _lose(self, record: LeaseRecord | None) -> None:
        self.lost = True
        holder = f"taken over ({record.describe(self.clock())})" if record else "deleted or replaced by another file"
        self.warn(f"Warning: the lease of {self.root} was {holder}; this trainer no longer owns the workdir: stop it")

    def release(self) -> None:
        if self._guarded is not None:
            if not self.lost and self._generation:
                self._guarded.delete_if(self._generation, _STORE_DEADLINE_S)
            return
        record = read_lease(self.path, lambda _: None)
        if record is not None and record.owner == self.owner:
            storage.remove(self.path)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.expires_after / 4):
            try:
                self.renew()
            # A store that failed once may answer next time; WorkdirWriteError and the like:
            # an answer that is no refusal of the lease (a bucket setting), said the same way.
            except (OSError, TrainerError) as err:
                if not self._stop.is_set():
                    self.warn(f"Warning: could not renew the lease of {self.root} ({files.short(str(err))})")

    @contextmanager
    def held(self) -> Iterator[Lease]:
        self.acquire()
        thread = threading.Thread(target=self._renew_until_stopped, name="lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=30)
            self.release()
