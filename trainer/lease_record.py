"""What a lease file says, and what a reader concludes from it (trainer.lease writes it).

Readers that only check (`launch evaluate`, the dry run, a trainer before it takes the
workdir) need no lease of their own: `check_free` refuses while another trainer's lease
is live. A lease file is untrusted input: every field is validated, and a damaged one is
warned about and counts as no lease.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import files, storage
from trainer.errors import WorkdirBusyError
from trainer.say import Say

LEASE = ".lease.json"
Clock = Callable[[], float]
# How far ahead of this host's clock a heartbeat may be before the clocks count as disagreeing.
_CLOCK_TOLERANCE = 10.0


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    heartbeat: float
    expires_after: float
    # This machine's identity beyond its host name (this_machine()); "" in older leases.
    machine: str = ""

    def age(self, now: float) -> float:
        return now - self.heartbeat

    def is_live(self, now: float) -> bool:
        """Renewed recently enough, and not left on this host by a process that is gone."""
        return self.age(now) < self.expires_after and not self._holder_is_gone_from_this_host()

    def _holder_is_gone_from_this_host(self) -> bool:
        """Whether the writer ran on this machine and its process is gone. A lease from
        another machine with the same host name (containers, cloned VMs) is never read so:
        its pid means nothing here, and it may well be alive."""
        if self.host != socket.gethostname() or self.machine != this_machine():
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


@functools.cache
def this_machine() -> str:
    """This kernel's boot and this process's pid namespace: what makes a pid mean one
    process. Two containers (or cloned VMs) may share a host name, never both of these."""
    parts = []
    for read in (
        lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        lambda: os.readlink("/proc/self/ns/pid"),
    ):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return "/".join(parts) if any(parts) else ""


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
    machine = raw.get("machine", "")
    return LeaseRecord(
        raw["owner"],
        raw["host"],
        raw["pid"],
        float(raw["heartbeat"]),
        float(raw["expires_after"]),
        machine if _one_line(machine) else "",
    )


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
