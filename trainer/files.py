"""Atomic writes and forgiving reads of the workdir's side files.

A kill (SIGKILL, a full disk, a lost VM) can land in the middle of any write. Every file
the trainer writes therefore goes to a temporary file in the same folder, is flushed to
disk, and then replaces the old one with `os.replace`, which is atomic within one
filesystem: a reader, or the next run, sees the old file or the new one, never half of
either. Folders (the export) are written beside the old one and swapped in.

Reading is the other half: a side file that is damaged anyway (written by an older
version, edited by hand, cut short by a full disk) is reported by `read_json` as None
with a warning, and the caller rebuilds it; it never ends a run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.errors import StoreUnreachableError, WorkdirBusyError, WorkdirWriteError
from trainer.say import Say

# How TensorFlow's errors (which are not OSErrors) say that the disk refused a write.
_WRITE_FAILURES = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` atomically (temp file in the same folder, then rename).

    A URL (gs://, ram://) goes through tf.io.gfile: a temp object, then a rename."""
    if "://" in str(path):
        _write_url(str(path), text)
        return
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; side files are as readable as checkpoints
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_url(url: str, text: str) -> None:
    """An object store writes each object whole; the temp object keeps a reader of the
    old name from ever seeing a half-uploaded one on stores that stream writes."""
    folder, name = url.rsplit("/", 1)
    temporary = f"{folder}/.{name}.tmp"
    storage.write_bytes(temporary, text.encode("utf-8"))
    storage.rename(temporary, url)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | os.PathLike, warn: Say, what: str) -> Any | None:
    """The parsed file, or None if it is missing or damaged (then `warn` says so)."""
    if not storage.isfile(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except StoreUnreachableError:
        raise  # the store did not answer: the file may be fine, and rebuilding it would fail too
    # ValueError: undecodable bytes, bad JSON, and integers past Python's 4,300-digit limit;
    # RecursionError: thousands of nested brackets. All are damage, none may end a run.
    except (OSError, ValueError, RecursionError) as err:
        warn(f"Warning: {path} is damaged ({type(err).__name__}: {short(str(err))}); {what}")
        return None


@contextlib.contextmanager
def replacing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh local temporary folder; on success its content replaces `path`."""
    if storage.is_url(path):
        with _replacing_remote_folder(str(path)) as folder:
            yield folder
    else:
        with _replacing_local_folder(path) as folder:
            yield folder


# Written last into a folder that replacing_folder fills, and removed first when it is replaced:
# Hadoop's and Spark's convention for "this folder is whole" on stores without a folder rename.
COMPLETE_MARKER = "_SUCCESS"


@contextlib.contextmanager
def _replacing_remote_folder(url: str) -> Iterator[Path]:
    """On an object store: written locally, uploaded beside `url`, then copied in place.

    Object stores have no folder rename, so the swap is not atomic; a reader knows a whole
    folder by its COMPLETE_MARKER, removed before the old content and written after the new
    (`folder_in_flux`). A kill during the final copy leaves `url` without the marker and the
    whole new content in `.NAME.tmp-new` (which the next call replaces). The old content
    stays, marker and all, until the upload beside it is complete.
    """
    staged = _staged_copy_of(url)
    with tempfile.TemporaryDirectory(prefix="trainer-staging-") as local:
        yield Path(local)
        storage.rmtree(staged)
        storage.copy_tree(local, staged)
    storage.remove(storage.join(url, COMPLETE_MARKER))  # from here on, readers see the folder in flux
    storage.rmtree(url)
    storage.copy_tree(staged, url)
    write_text(storage.join(url, COMPLETE_MARKER), "")
    storage.rmtree(staged)


def _staged_copy_of(url: str) -> str:
    return f"{storage.parent_of(url)}/.{storage.name_of(url)}.tmp-new"


def folder_in_flux(path: str | os.PathLike) -> bool:
    """Whether `path` on an object store is being replaced, or was left half-copied by a
    kill: no COMPLETE_MARKER in it, and the staged copy beside it. (A folder written by an
    earlier version, which had no marker, is whole when nothing is staged beside it; a
    local folder is swapped by a rename and is never in flux.)"""
    if not storage.is_url(path):
        return False
    return not storage.exists(storage.join(path, COMPLETE_MARKER)) and storage.exists(_staged_copy_of(str(path)))


@contextlib.contextmanager
def _replacing_local_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path`.

    If the body fails (or the process dies), `path` keeps its old content; the leftover
    temporary folder is named `.NAME.tmp-*` and removed by the next call. A process killed
    between the two renames below leaves no `path` and the old content in `.NAME.tmp-old`:
    the next call puts it back first, so it is never among the leftovers deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _only_writer(path):
        old = path.parent / f".{path.name}.tmp-old"
        if old.exists() and not path.exists():
            os.replace(old, path)
        for leftover in path.parent.glob(f".{path.name}.tmp-*"):  # a dead writer's: the lock says so
            _remove_leftover(leftover)
        temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            yield temporary
            (temporary / COMPLETE_MARKER).touch()  # the same marker as on object stores, for readers of both
            os.chmod(temporary, 0o755)
            if path.exists():
                _remove_leftover(old)
                os.replace(path, old)
            os.replace(temporary, path)
        except BaseException:  # the body or the swap failed: the new content goes, the old stays
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _remove_leftover(old)


def _remove_leftover(leftover: Path) -> None:
    """A temporary name of ours: a link is unlinked (never followed), a folder removed."""
    if leftover.is_symlink():
        leftover.unlink()
    else:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _only_writer(path: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `path` (flock: the kernel drops it when its holder dies).

    Two writers at once (two `launch export`s) would each delete the other's live
    temporary folder as a leftover and both report success over a broken result; the
    second one is refused instead, before it touches anything.
    """

    def busy(owner: str) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{path} is being written by another process (pid {owner}, e.g. another launch export); "
            "wait for it to finish and run again"
        )

    with pid_flock(path.parent / f".{path.name}.lock", busy):
        yield


@contextlib.contextmanager
def pid_flock(lock_path: str | os.PathLike, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`, which then names our pid; if another process
    holds it, raise `busy(its pid)` at once (never wait). The kernel releases a flock when
    its holder dies, so a killed holder never leaves a stale lock behind."""
    import fcntl  # POSIX only, like the signals the trainer handles

    with open(lock_path, "a+", errors="replace") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(lock_owner(handle)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_owner(handle) -> str:
    """The pid a lock file names; anyone can write the file, so only digits are echoed."""
    handle.seek(0)
    owner = handle.read(32).strip()
    return owner if digits(owner) else "unknown"


def number_in(value: Any, low: float, high: float) -> bool:
    """A JSON number within [low, high]. Side files are untrusted: `true` is no number,
    and NaN, Infinity and 5,000-digit integers (which json.loads accepts) are out of range."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def integer_in(value: Any, low: int, high: int) -> bool:
    """A JSON integer (not a float, not a bool) within [low, high]."""
    return isinstance(value, int) and number_in(value, low, high)


def digits(text: str) -> bool:
    """Only ASCII digits 0-9 (at least one). `str.isdigit` also takes '²' (which int()
    refuses: a traceback) and full-width digits (which int() reads): untrusted text such as
    a port, a step or a pid is checked with this."""
    return text.isascii() and text.isdigit()


def is_port(text: str) -> bool:
    """A TCP port as written in "host:port": ASCII digits whose value (its first 6, so a
    5,000-digit one never reaches int()) is 1-65535."""
    return digits(text) and 1 <= int(text[:6]) <= 65535


def short(text: str, limit: int = 160) -> str:
    """The first line of `text`, cut to `limit` characters: safe to echo in one line."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_write_error(err: BaseException, where: str | os.PathLike) -> WorkdirWriteError:
    """A write that failed (read-only, full disk, no permission) as one user-facing line,
    naming the file that failed when the error knows it, with the fix for that cause."""
    path = getattr(err, "filename", None) or where
    known = [reason for reason in _WRITE_FAILURES if reason in str(err)]
    reason = getattr(err, "strerror", None) or (known[0] if known else short(str(err))) or type(err).__name__
    return WorkdirWriteError(f"cannot write {path}: {reason}; {_write_fix(err, reason)}")


# The advice for each cause: "free some space" helps a full disk, not a read-only one.
_FIXES = {
    errno.ENOSPC: "free some space, or choose a --workdir on another disk",
    errno.EDQUOT: "free some space (the disk quota is full), or choose a --workdir on another disk",
    errno.EROFS: "choose a writable --workdir (this filesystem is read-only)",
    errno.EACCES: "choose a writable --workdir, or fix its permissions",
    errno.EPERM: "choose a writable --workdir, or fix its permissions",
    errno.ENOTDIR: "a part of that path is a file, not a folder: move it, or choose another --workdir",
    errno.ENAMETOOLONG: "choose a shorter --workdir path",
}
_FIX_BY_REASON = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


def _write_fix(err: BaseException, reason: str) -> str:
    """The fix for `err`'s errno (TensorFlow's errors carry none: their words are matched)."""
    code = getattr(err, "errno", None) or _FIX_BY_REASON.get(reason)
    return _FIXES.get(code, "check that --workdir can be written (disk space, permissions), or choose another one")


def is_write_failure(err: BaseException) -> bool:
    """An OSError, or a TensorFlow error whose cause is the disk (full, read-only, denied).

    Not a store that cannot be reached: "free some space" would send the user the wrong way,
    and that error already says what to do."""
    if isinstance(err, StoreUnreachableError):
        return False
    if isinstance(err, OSError):
        return True
    return any(reason in str(err) for reason in _WRITE_FAILURES)
