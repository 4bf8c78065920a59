"""Paths on any filesystem TensorFlow knows: local disk, `gs://`, `s3://`, HDFS, `ram://`.

Every read and write of a workdir goes through these functions. Paths are strings:
`pathlib.Path("gs://bucket/run")` collapses the `//`. A local path is served by the
standard library (so a config can be read before TensorFlow is imported, and errors are
the usual OSErrors); a URL by `tf.io.gfile`, whose errors are turned into OSErrors of the
matching kind (missing, denied, full, or StoreUnreachableError: no answer at all), so
callers handle one family of errors.

What the stores guarantee differs, and the callers rely on no more than this:
- local disk: `rename` is atomic, and folders can be renamed;
- object stores (GCS, S3) and `ram://`: one object is written whole or not at all, and
  `rename` is a copy then a delete (atomic per object on GCS); there are no real folders,
  so a folder cannot be renamed (on `ram://` such a rename silently loses the files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from trainer.errors import ConfigError, StoreDeniedError, StoreUnreachableError


def is_url(path: str | os.PathLike) -> bool:
    """A path with a scheme (gs://, s3://, hdfs://, ram://): served by tf.io.gfile."""
    return "://" in str(path)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def workdir_spelling(path: str | os.PathLike) -> str:
    """The one spelling of a workdir: `file://` URLs become local paths, a URL loses its
    trailing slashes, and a scheme typo is refused before anything is written.

    Why: the lock is chosen by spelling (flock for local paths, a lease for URLs), so
    `file:///abs/run` must be the local path it names, or a second trainer (or `--fresh`)
    would not see the first one's flock. `gs:/bucket/run` (one slash) or `foo://` would
    otherwise train into a local folder named `gs:` or `foo:`, which vanishes with a VM.
    Relative and symlinked spellings of a local path need nothing: flock locks the file
    itself, whatever path reaches it.
    """
    text = str(path)
    if text.startswith("file://"):
        return _local_path_of_file_url(text)
    if is_url(text):
        scheme, rest = text.split("://", 1)
        if not _SCHEME.fullmatch(f"{scheme}:"):
            raise ConfigError(f"workdir {text!r}: {scheme!r} is not a URL scheme (gs://, s3://, ...)")
        if not rest.strip("/"):
            raise ConfigError(f"workdir {text!r} names no bucket or folder after '{scheme}://'")
        return text.rstrip("/")
    first, _, rest = text.partition("/")
    if _SCHEME.fullmatch(first):
        raise ConfigError(
            f"workdir {text!r} looks like a URL with a slash missing: write {first}//{rest.lstrip('/')} "
            f"(for a local folder named {first!r}, write ./{text})"
        )
    return text


def _local_path_of_file_url(url: str) -> str:
    """file:///abs/path and file://localhost/abs/path (percent-escapes decoded)."""
    rest = url[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise ConfigError(f"workdir {url!r}: a file:// URL names an absolute path on this machine (file:///abs/path)")
    return unquote(rest)


def join(base: str | os.PathLike, *names: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return os.path.join(base, *names)


def name_of(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent_of(path: str | os.PathLike) -> str:
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def _gfile():
    import tensorflow as tf  # only URLs need it; `launch --help` and config checks stay light

    return tf.io.gfile


# How TensorFlow says that a request never reached the store (rather than that the store
# said no): libcurl's own failures, "libcurl code 6 meaning 'Could not resolve hostname'",
# raised at once as FailedPrecondition; or, for those its GCS client retries (a refused or
# timed-out connection, a 503), "All 10 retry attempts failed. The last failure: ..." as
# Aborted, about three minutes later (GCS_RETRY_CONFIG_MAX_RETRIES sets the tries).
_TRANSPORT_FAILURE = re.compile(r"libcurl code \d+|All \d+ retry attempts failed")
_CURL_DETAILS = re.compile(r"error details: ([^\n]+)")
_TRIES = re.compile(r"All (\d+) retry attempts failed\. (?:The last failure: )?")


def unreachable(err: BaseException, path: str) -> StoreUnreachableError | None:
    """`err`, a TensorFlow error met while reading or writing `path`, as a
    StoreUnreachableError if it says that the store could not be reached; else None.

    Only for errors of a filesystem call: elsewhere (collectives, a cluster's peers)
    Unavailable means a peer, not a store."""
    import tensorflow as tf

    if not isinstance(err, tf.errors.OpError):
        return None
    message = err.message or ""
    transient = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)
    if not isinstance(err, transient) and not _TRANSPORT_FAILURE.search(message):
        return None
    reason = _transport_reason(message) or type(err).__name__
    return StoreUnreachableError(
        f"cannot reach {path} ({reason}); check this machine's network connection (and HTTPS_PROXY, if it "
        "needs a proxy), then run the same command again",
        url=path,
        reason=reason,
    )


def _transport_reason(message: str) -> str:
    """'Could not resolve host: www.googleapis.com', with ', after 10 tries' when retried."""
    tries = _TRIES.search(message)
    details = _CURL_DETAILS.search(message)
    last = _TRIES.sub("", message).strip()  # a 503, retried: its own first line
    reason = (details.group(1) if details else last.splitlines()[0] if last else "").strip()
    return reason[:200] + (f", after {tries.group(1)} tries" if tries else "")


_HTTP_STATUS = re.compile(r"HTTP response code (\d+)")
_STORE_MESSAGE = re.compile(r'"message":\s*"([^"]{1,200})')


def denied(err, path: str) -> PermissionError:
    """A refusal (HTTP 401/403) as a PermissionError: from a store, a StoreDeniedError,
    one line naming the URL, the store's words and what to check.

    Why: a store that answers "no" is not a bug, and its traceback (exit 1) told the user
    nothing; nor is it damage or a missing file."""
    if not is_url(path) or path.startswith("file://"):
        return PermissionError(errno.EACCES, "Permission denied", path)
    message = err.message or ""
    status, said = _HTTP_STATUS.search(message), _STORE_MESSAGE.search(message)
    parts = [f"HTTP {status.group(1)}" if status else "", said.group(1) if said else ""]
    reason = ": ".join(part for part in parts if part) or type(err).__name__
    return StoreDeniedError(
        f"the store refused access to {path} ({reason}); check the credentials this machine uses "
        "(GOOGLE_APPLICATION_CREDENTIALS, or the VM's service account) and their access to the bucket",
        url=path,
        reason=reason,
    )


def _unknown_scheme(path: str) -> ConfigError:
    scheme = path.split("://", 1)[0]
    return ConfigError(
        f"{path}: TensorFlow has no filesystem for {scheme}:// (gs:// is built in; s3:// and hdfs:// need "
        "the tensorflow-io plugin); check the spelling, or use a local folder"
    )


@contextlib.contextmanager
def _as_os_errors(path: str) -> Iterator[None]:
    """tf.errors.* as the OSError a local filesystem would raise (FileNotFoundError, ...);
    a store that cannot be reached as StoreUnreachableError (an OSError too)."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.UnimplementedError as err:  # a scheme this TensorFlow has no filesystem for
        raise _unknown_scheme(path) from err
    except tf.errors.NotFoundError as err:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from err
    except (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError) as err:
        raise denied(err, path) from err
    except tf.errors.ResourceExhaustedError as err:
        raise OSError(errno.ENOSPC, "No space left on device", path) from err
    except tf.errors.OpError as err:
        raise unreachable(err, path) or OSError(
            errno.EIO, (err.message or type(err).__name__).strip().splitlines()[0][:200], path
        ) from err


def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _as_os_errors(str(path)):
        return _gfile().exists(str(path))


def isdir(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with _as_os_errors(str(path)):
        if _gfile().isdir(str(path)):
            return True
    # tf.io.gfile.isdir answers False for every failure, an unreachable store or an unknown
    # scheme included (then a workdir would look new and a data folder missing): exists()
    # raises those, and answers the rest.
    exists(path)
    return False


def isfile(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    return exists(path) and not isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in a folder (no trailing slashes); [] when it does not exist."""
    if not isdir(path):
        return []
    if not is_url(path):
        return os.listdir(path)
    with _as_os_errors(str(path)):
        return [name.rstrip("/") for name in _gfile().listdir(str(path))]


def makedirs(path: str | os.PathLike) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    with _as_os_errors(str(path)):
        _gfile().makedirs(str(path))


def remove(path: str | os.PathLike) -> None:
    """Delete one file; a missing one is fine (someone else finished the job)."""
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with contextlib.suppress(FileNotFoundError), _as_os_errors(str(path)):
        _gfile().remove(str(path))


def rmtree(path: str | os.PathLike) -> None:
    """Delete a folder and everything in it; a missing one is fine."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    if isdir(path):
        with _as_os_errors(str(path)):
            _gfile().rmtree(str(path))


def remove_if_empty(folder: str | os.PathLike) -> None:
    """Delete a folder only if nothing is in it (what someone else put there stays)."""
    if not is_url(folder):
        with contextlib.suppress(OSError):  # missing, or holds something
            os.rmdir(folder)
        return
    if isdir(folder) and not listdir(folder):
        rmtree(folder)


def read_text(path: str | os.PathLike) -> str:
    if not is_url(path):
        kind = special_kind(path)
        if kind:  # open() would wait for a writer forever
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", str(path))
        return Path(path).read_text(encoding="utf-8")
    with _as_os_errors(str(path)), _gfile().GFile(str(path), "rb") as handle:
        return handle.read().decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write one file or object whole (not atomic by itself: see trainer.files)."""
    if not is_url(path):
        Path(path).write_bytes(data)
        return
    with _as_os_errors(path), _gfile().GFile(path, "wb") as handle:
        handle.write(data)


def rename(source: str, target: str) -> None:
    """Replace `target` by the file `source` (atomic locally; copy + delete on object stores)."""
    if not is_url(source):
        os.replace(source, target)
        return
    with _as_os_errors(source):
        _gfile().rename(source, target, overwrite=True)


def copy_file(source: str | os.PathLike, target: str) -> None:
    """Copy one file between any two filesystems (server-side within GCS), replacing `target`."""
    if not is_url(source) and not is_url(target):
        shutil.copyfile(source, target)
        return
    with _as_os_errors(target):
        _gfile().copy(str(source), target, overwrite=True)


def copy_tree(source: str | os.PathLike, target: str) -> None:
    """Copy a folder and everything in it between any two filesystems, file by file."""
    makedirs(target)
    for name in listdir(source):
        if isdir(join(source, name)):
            copy_tree(join(source, name), join(target, name))
        else:
            copy_file(join(source, name), join(target, name))


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (tf.io.gfile's wildcards: `*`, `?`, `[...]`), on any filesystem."""
    with _as_os_errors(parent_of(pattern)):
        return _gfile().glob(pattern)


def size(path: str | os.PathLike) -> int:
    """A file's length in bytes."""
    if not is_url(path):
        return os.path.getsize(path)
    with _as_os_errors(str(path)):
        return _gfile().stat(str(path)).length


def walk_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder`, at any depth, sorted."""
    found = []
    for name in listdir(folder):
        path = join(folder, name)
        found += walk_files(path) if isdir(path) else [path]
    return sorted(found)


def special_kind(path: str | os.PathLike) -> str | None:
    """What a local `path` is when it is neither a regular file nor a folder ("a pipe
    (FIFO)", "a device", "a socket"); None for a file, a folder, a missing path or a URL.

    Why: open() on a FIFO blocks until a writer comes, forever; a device may never end.
    A path a user names is checked with this first (os.stat does not block), so it is
    refused in one line instead of hanging the command."""
    if is_url(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # missing or unreadable: the open() that follows says so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


# How long a download may receive nothing (connecting included) before it is given up.
# Per read, not for the whole file: a slow download that keeps arriving is never cut.
DOWNLOAD_STALL_S = 60.0


@contextlib.contextmanager
def download_deadline() -> Iterator[None]:
    """Every socket opened inside gives up after DOWNLOAD_STALL_S s of silence.

    Why: Keras' get_file opens its URL with no timeout, so a proxy or server that accepts
    and never answers kept a command at "Downloading data from ..." forever. The process
    default is restored after (it is global: only short, single-purpose calls go inside)."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_STALL_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)
