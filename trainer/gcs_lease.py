"""Compare-and-swap on one GCS object, for the lease of a gs:// workdir (trainer.lease).

tf.io.gfile can only overwrite an object, so two trainers that both read "no lease" in the
same second both wrote theirs and both believed they had won. GCS itself can do better:
each write of an object gives it a new generation (a number), and a write or a delete can
be made conditional on it (`ifGenerationMatch`; 0 means "only if there is none"): of two
writes conditional on the same generation, the store lets exactly one through and answers
the other 412. google-cloud-storage (the `gcs` extra) sends those preconditions;
`GuardedObject` wraps them for the lease:

    read()                          -> Version(data, generation)      (generation 0: none)
    write_if(data, expected, ours)  -> Written(won, version)          (the winner's version)
    delete_if(generation)           -> whether it is gone

Without the package (or for other stores) `guarded_object` answers None, once warning
about what that leaves open on gs://, and the lease falls back to tf.io.gfile.

Retries. Every request has a timeout and every operation a deadline (StoreUnreachableError
after it). Reads are retried freely. A conditional write is safe to send again: if the
first one landed, the copy fails its precondition instead of writing twice. What is not
safe is to believe the answer to that copy. When the store acted but its answer was lost
(the connection broke after the write), the retry is answered 412, "someone else", and
that someone was us. So after any write whose fate is unknown (a broken connection, a
timeout, a 5xx) or that failed its precondition, the object is read back before anything
is concluded: a generation other than the expected one whose content `ours` recognises
(the lease's owner id, unique to this run: no one else writes it) is our own write; one
with other content is the rival that won; an unchanged generation means our write did not
land, and it is sent again.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.errors import StoreDeniedError, StoreUnreachableError, WorkdirWriteError
from trainer.say import Say

EXTRA = "gcs"
# One request's deadline (connect and read); an operation's own deadline is the caller's.
REQUEST_TIMEOUT_S = 10.0
_FIRST_PAUSE_S = 0.1
_LONGEST_PAUSE_S = 2.0
# What a store answers when it may succeed if asked again (GCS's own retry guidance).
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_warned: set[str] = set()


@dataclass(frozen=True)
class Version:
    """An object's content and generation as read or written; generation 0: no object."""

    data: bytes | None
    generation: int


@dataclass(frozen=True)
class Written:
    """A conditional write's outcome: `won`, with our version; or not, with the rival's."""

    won: bool
    version: Version


def guarded_object(url: str, warn: Say) -> GuardedObject | None:
    """The object at `url` with generation preconditions, or None where there are none:
    not gs://, or google-cloud-storage missing (then warned about once per process, since
    the tf.io.gfile lease it falls back to leaves a race open)."""
    if not url.startswith("gs://"):
        return None
    try:
        import google.cloud.storage  # noqa: F401 (optional: the `gcs` extra)
    except ImportError:
        if EXTRA not in _warned:
            _warned.add(EXTRA)
            warn(
                f"Warning: google-cloud-storage is not installed, so the lease of {url} is written through "
                "tf.io.gfile, which has no compare-and-swap: two trainers started within the same second can both "
                f"believe they hold the workdir. Install the `{EXTRA}` extra (pip install 'tf-dist-trainer[{EXTRA}]') "
                "to close that race"
            )
        return None
    return GuardedObject(url)


class GuardedObject:
    """One object on GCS, written and deleted only under a generation precondition."""

    def __init__(self, url: str, client: Any = None, request_timeout: float = REQUEST_TIMEOUT_S) -> None:
        bucket, _, name = url.removeprefix("gs://").partition("/")
        if not bucket or not name:
            raise WorkdirWriteError(f"{url} names no object in a bucket; use gs://BUCKET/FOLDER")
        self.url = url
        self.request_timeout = request_timeout
        self._bucket, self._name = bucket, name
        self._client = client  # made at the first request: finding credentials may ask the network

    def read(self, deadline_s: float, cancel: threading.Event | None = None) -> Version:
        """The object now (Version(None, 0) if there is none), retried until `deadline_s`."""
        attempts = _Attempts(self.url, deadline_s, cancel)
        while True:
            try:
                return self._read_once(attempts.timeout(self.request_timeout))
            except Exception as err:  # the library's many types, sorted by _retry_or_raise
                self._retry_or_raise(err, attempts)

    def write_if(
        self,
        data: bytes,
        expected: int,
        ours: Callable[[bytes], bool],
        deadline_s: float,
        cancel: threading.Event | None = None,
    ) -> Written:
        """Write `data` if the object is still at generation `expected` (0: absent). `ours`
        recognises our own content, to tell a write of ours whose answer was lost from a
        rival's (the module's docstring)."""
        attempts = _Attempts(self.url, deadline_s, cancel)
        unsure = False  # a write of ours may have landed unheard: read before concluding
        while True:
            try:
                if unsure:
                    settled = _settled(self._read_once(attempts.timeout(self.request_timeout)), expected, ours)
                    if settled is not None:
                        return settled
                generation = self._upload(data, expected, attempts.timeout(self.request_timeout))
                return Written(True, Version(data, generation))
            except Exception as err:  # the library's many types, sorted by _retry_or_raise
                unsure = True
                if _status(err) != 412:  # a 412 is an answer: read back at once, no pause
                    self._retry_or_raise(err, attempts)
                attempts.check()

    def delete_if(self, generation: int, deadline_s: float, ours: Callable[[bytes], bool] | None = None) -> bool:
        """Delete the object if it is still at `generation`, or holds what `ours` recognises
        (a write of ours that landed unheard: a renewal cancelled mid-flight); whether it is
        gone (False: it is someone else's now). A delete answered 404 after a lost answer
        is one that landed; one answered 412 lost a race with a write: read again."""
        attempts = _Attempts(self.url, deadline_s, None)
        while True:
            try:
                current = self._read_once(attempts.timeout(self.request_timeout))
                if current.generation == 0:
                    return True
                if current.generation != generation and not _is(ours, current.data):
                    return False
                timeout = attempts.timeout(self.request_timeout)
                self._blob().delete(if_generation_match=current.generation, timeout=timeout, retry=None)
                return True
            except Exception as err:  # the library's many types, sorted by _retry_or_raise
                if _status(err) == 404:
                    return True
                if _status(err) != 412:
                    self._retry_or_raise(err, attempts)
                attempts.check()

    # -- one request each, no retries of the library's own (ours are above)

    def _read_once(self, timeout: float) -> Version:
        blob = self._blob()
        try:
            data = blob.download_as_bytes(timeout=timeout, retry=None)
        except Exception as err:
            if _status(err) == 404:
                return Version(None, 0)
            raise
        return Version(data, int(blob.generation))

    def _upload(self, data: bytes, expected: int, timeout: float) -> int:
        blob = self._blob()
        blob.upload_from_string(
            data, content_type="application/json", if_generation_match=expected, timeout=timeout, retry=None
        )
        return int(blob.generation)

    def _blob(self) -> Any:
        if self._client is None:
            self._client = _new_client(self.url)
        return self._client.bucket(self._bucket).blob(self._name)

    def _retry_or_raise(self, err: Exception, attempts: _Attempts) -> None:
        """Pause before the next try if `err` may pass; else raise it as one of ours."""
        if not _transient(err):
            ours = _as_store_error(err, self.url)
            if ours is err:
                raise err
            raise ours from err
        attempts.pause(err)


def _is(ours: Callable[[bytes], bool] | None, data: bytes | None) -> bool:
    return ours is not None and data is not None and ours(data)


def _settled(current: Version, expected: int, ours: Callable[[bytes], bool]) -> Written | None:
    """What a read-back says of a write of uncertain fate: None if the object is unchanged
    (our write did not land: send it again), else who wrote it."""
    if current.generation == expected:
        return None
    return Written(current.data is not None and ours(current.data), current)


class _Attempts:
    """An operation's deadline, and the pauses between its tries (doubling, with jitter)."""

    def __init__(self, url: str, deadline_s: float, cancel: threading.Event | None) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.end = time.monotonic() + deadline_s
        self.cancel = cancel
        self.tries = 0
        self.next_pause = _FIRST_PAUSE_S

    def timeout(self, longest: float) -> float:
        """A request's timeout: `longest`, or what is left of the deadline (at least 0.5 s)."""
        return max(0.5, min(longest, self.end - time.monotonic()))

    def check(self) -> None:
        if time.monotonic() >= self.end:
            raise self._gave_up("the object kept changing")
        if self.cancel is not None and self.cancel.is_set():
            raise self._gave_up("the object changed; stopped retrying")

    def pause(self, err: Exception) -> None:
        """Wait before the next try; past the deadline (or when cancelled), give up with
        StoreUnreachableError. Waits on an Event (interruptible by a signal's handler in the
        main thread, and by `cancel` in the lease's heartbeat thread)."""
        self.tries += 1
        left = self.end - time.monotonic()
        reason = _reason(err)
        if left <= 0:
            raise self._gave_up(reason) from err
        wait = min(self.next_pause * random.uniform(0.5, 1.0), left)
        self.next_pause = min(self.next_pause * 2, _LONGEST_PAUSE_S)
        if (self.cancel or threading.Event()).wait(wait):
            raise self._gave_up(f"{reason}; stopped retrying") from err

    def _gave_up(self, reason: str) -> StoreUnreachableError:
        said = f"{reason}, after {self.tries} tries in {self.deadline_s:.0f} s"
        return StoreUnreachableError(
            f"cannot reach {self.url} ({said}); check this machine's network connection (and HTTPS_PROXY, if it "
            "needs a proxy), then run the same command again",
            url=self.url,
            reason=said,
        )


def _new_client(url: str) -> Any:
    """A client with Application Default Credentials (anonymous against an emulator named
    by STORAGE_EMULATOR_HOST); the project only matters for listing buckets, unused here."""
    from google.auth import exceptions as auth_errors
    from google.cloud import storage

    try:
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    except auth_errors.DefaultCredentialsError as err:
        raise StoreDeniedError(
            f"no Google credentials for the lease at {url} ({_reason(err)}); run `gcloud auth application-default "
            "login`, or set GOOGLE_APPLICATION_CREDENTIALS, or use the VM's service account",
            url=url,
            reason="no credentials",
        ) from err


def _status(err: BaseException) -> int | None:
    """The HTTP status of a store's answer, or None when there was no answer."""
    from google.api_core import exceptions as api_errors

    if isinstance(err, api_errors.GoogleAPICallError) and isinstance(err.code, int):
        return err.code
    return None


def _transient(err: BaseException) -> bool:
    """An error that may pass if the request is sent again: no answer, or a 408/429/5xx."""
    import requests
    from google.auth import exceptions as auth_errors

    status = _status(err)
    if status is not None:
        return status in _TRANSIENT_STATUS
    if isinstance(err, auth_errors.TransportError):  # fetching a token: the network, not the credentials
        return True
    network = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout, http.client.HTTPException)
    return isinstance(err, (*network, requests.exceptions.ChunkedEncodingError))


def _as_store_error(err: Exception, url: str) -> Exception:
    """A refusal as StoreDeniedError (the wording of trainer.storage.denied), any other
    answer as WorkdirWriteError naming it; an error of ours (a deadline) as it is."""
    from google.auth import exceptions as auth_errors

    if isinstance(err, (StoreUnreachableError, StoreDeniedError, WorkdirWriteError)):
        return err
    status = _status(err)
    if status in (401, 403) or isinstance(err, auth_errors.RefreshError):
        reason = _reason(err)
        return StoreDeniedError(
            f"the store refused access to {url} ({reason}); check the credentials this machine uses "
            "(GOOGLE_APPLICATION_CREDENTIALS, or the VM's service account) and their access to the bucket",
            url=url,
            reason=reason,
        )
    if status == 404:
        return WorkdirWriteError(f"cannot write {url}: its bucket does not exist ({_reason(err)}); check the --workdir")
    return WorkdirWriteError(f"cannot write the lease at {url} ({_reason(err)}); check the bucket and its settings")


# How google.api_core starts an answer's message: "POST https://...: what the store said".
_REQUEST_PREFIX = re.compile(r"^[A-Z]+ https?://\S+: ")
# In the nested reprs of requests/urllib3 errors: the OS's words, or the innermost message.
_OS_WORDS = re.compile(r"\[Errno -?\d+\] ([^'\"()]+)")
_INNERMOST = re.compile(r"\('([^']+)'\)")
# A download's error carries the store's JSON answer as text: its message.
_STORE_MESSAGE = re.compile(r'"message":\s*"([^"]{1,200})')


def _reason(err: BaseException) -> str:
    """An error in a few words: 'HTTP 503: what the store said' for an answer; for none,
    what the OS or the connection said ('Connection refused'), not urllib3's nested reprs."""
    status = _status(err)
    if status is not None:
        text = str(err.message)  # type: ignore[attr-defined]
        said = _STORE_MESSAGE.search(text)
        lines = _REQUEST_PREFIX.sub("", text.strip()).splitlines()
        return f"HTTP {status}: " + ((said.group(1) if said else lines[0] if lines else "")[:200] or type(err).__name__)
    import requests

    text = str(err)
    if isinstance(err, requests.Timeout):
        return "no answer in time"
    said = _OS_WORDS.search(text) or _INNERMOST.search(text)
    lines = text.strip().splitlines()
    return (said.group(1).strip() if said else lines[0] if lines else type(err).__name__)[:200]
