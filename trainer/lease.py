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

Limits, stated in the README: the stores offer no compare-and-swap through tf.io.gfile,
so two trainers started within the same second can both believe they won; the lease
is re-read after writing to catch most of these, and a holder that finds someone else's
lease at renewal stops renewing and says so. Clocks of the hosts must roughly agree
(seconds, not minutes), since the heartbeat is compared with the reader's clock.
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

from trainer import files, storage
from trainer.errors import WorkdirBusyError

LEASE = ".lease.json"
Clock = Callable[[], float]


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

    def describe(self, now: float) -> str:
        return (
            f"pid {self.pid} on host {self.host}, lease renewed {max(self.age(now), 0):.0f}s ago, "
            f"expiring {self.expires_after:.0f}s after its last renewal"
        )


def read_lease(path: str, warn: files.Warn) -> LeaseRecord | None:
    """The lease at `path`, or None when there is none; a damaged one is warned about and
    counts as none (it is rewritten by the next holder)."""
    raw = files.read_json(path, warn, "treating the workdir as free")
    if raw is None:
        return None
    try:
        return LeaseRecord(
            owner=str(raw["owner"]),
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            heartbeat=float(raw["heartbeat"]),
            expires_after=float(raw["expires_after"]),
        )
    except (TypeError, KeyError, ValueError):
        warn(f"Warning: {path} is damaged (unexpected content); treating the workdir as free")
        return None


def busy_error(root: str, record: LeaseRecord, now: float) -> WorkdirBusyError:
    wait = max(record.expires_after - record.age(now), 0)
    return WorkdirBusyError(
        f"{root} is in use by another trainer ({record.describe(now)}); wait for it to finish, stop it, or pick "
        f"another --workdir (if that trainer is dead, its lease expires in {wait:.0f}s)"
    )


def check_free(root: str, warn: files.Warn, clock: Clock = time.time) -> None:
    """Refuse, without writing anything, while another trainer's lease is live."""
    record = read_lease(storage.join(root, LEASE), warn)
    if record is not None and record.is_live(clock()):
        raise busy_error(root, record, clock())


class Lease:
    """This trainer's claim on a workdir: `with Lease(...).held(): ...`."""

    def __init__(self, root: str, expires_after: float, warn: files.Warn = print, clock: Clock = time.time) -> None:
        self.root = root
        self.path = storage.join(root, LEASE)
        self.expires_after = expires_after
        self.warn = warn
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self.clock(), self.expires_after)

    def _write(self) -> None:
        files.write_text(self.path, json.dumps(asdict(self._record()), indent=2) + "\n")

    def acquire(self) -> None:
        now = self.clock()
        record = read_lease(self.path, self.warn)
        if record is not None and record.owner != self.owner:
            if record.is_live(now):
                raise busy_error(self.root, record, now)
            self.warn(
                f"Warning: taking over the lease of {self.root} from a trainer presumed dead ({record.describe(now)})"
            )
        storage.makedirs(self.root)
        self._write()
        written = read_lease(self.path, self.warn)
        if written is None:
            raise WorkdirBusyError(f"{self.root}: the lease just written cannot be read back; try again")
        if written.owner != self.owner:  # another trainer wrote it at the same moment, and won
            raise busy_error(self.root, written, self.clock())

    def renew(self) -> None:
        """Rewrite the heartbeat, unless someone else holds the lease now (then say so once)."""
        if self.lost:
            return
        record = read_lease(self.path, lambda _: None)
        if record is not None and record.owner != self.owner:
            self.lost = True
            self.warn(
                f"Warning: the lease of {self.root} was taken over ({record.describe(self.clock())}); this trainer "
                "no longer owns the workdir: stop it"
            )
            return
        self._write()

    def release(self) -> None:
        record = read_lease(self.path, lambda _: None)
        if record is not None and record.owner == self.owner:
            storage.remove(self.path)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.expires_after / 4):
            try:
                self.renew()
            except OSError as err:  # a store that failed once may answer next time
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
