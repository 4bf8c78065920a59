"""Typed errors for user mistakes.

Library code raises these instead of exiting or printing; the CLI turns each into one
clean line and a non-zero exit code. Anything else escaping is a bug and keeps its
traceback.
"""

from __future__ import annotations


class TrainerError(Exception):
    """A mistake the user can fix (bad value, missing file, missing checkpoint)."""

    exit_code = 2
    # True when a thread of the failed call is still blocked inside TensorFlow (a wait on a
    # tf.data service, which cannot be interrupted): the CLI ends the process at once after
    # the error line, as a normal exit could wait on that thread for ever.
    leaves_thread_blocked = False


class ConfigError(TrainerError):
    """A config key or value is wrong."""


class DataError(TrainerError):
    """A dataset cannot be found or one of its files is unusable."""


class RuntimeSetupError(TrainerError):
    """The requested devices, strategy or precision cannot be set up here."""


class CheckpointError(TrainerError):
    """A workdir has no usable checkpoint for the requested action."""


class WorkdirBusyError(TrainerError):
    """Another trainer holds the workdir's lock."""


class DivergedError(TrainerError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""

    exit_code = 3


class WorkdirNotOursError(TrainerError):
    """A folder holds files that `launch train` did not create: it will not write or delete there."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint is readable but belongs to another model or optimizer: not corrupt, refused."""


class WorkdirWriteError(TrainerError):
    """The workdir cannot be written (read-only, full disk, no permission)."""


class StoppedWaitingError(TrainerError):
    """A signal arrived while waiting for peers or a TPU, before anything started.

    Exit 75, as a stop with a checkpoint: nothing is lost, and the same command starts again.
    """

    exit_code = 75


class StoppedBySignalError(TrainerError):
    """SIGTERM or SIGHUP ended a command that has no checkpoint to stop at (`data convert`,
    `export`), after its cleanup removed what it had written.

    Exit 128+N, as the signal's default action would give, so a script sees the signal;
    but the next try finds nothing half-written in its way.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class PeerLostError(TrainerError):
    """Another task of a multi-worker run stopped answering (killed, crashed, its machine gone).

    Exit 75, as a stop: this task's own state is sound, the workdir holds the last
    checkpoint, and the same command on every task resumes from it; schedulers that
    requeue on 75 (deploy/slurm.sbatch) then do the right thing. A task that failed by
    itself (a bug) exits with its own code and traceback, which the launcher reports.
    """

    exit_code = 75


class InputStalledError(TrainerError):
    """A compiled call waited longer than its deadline for batches from outside the process
    (a tf.data service whose worker was lost: the service is at-most-once, so the steps that
    worker held never come).

    Exit 75, as a stop: the workdir holds the last checkpoint and the same command resumes
    from it in a new service job. The call's thread is still blocked inside TensorFlow, so
    the CLI ends the process at once after the error line (nothing is left to save).
    """

    exit_code = 75
    leaves_thread_blocked = True


class WorkdirLostError(TrainerError):
    """The lease of a remote workdir was taken over while this trainer held it (it failed
    to renew for `checkpoint.lease_seconds`, so a second trainer presumed it dead).

    The trainer stops at the next step without writing the workdir again: a checkpoint or
    an upload now would overwrite the new holder's. Exit 75: once the workdir is free, the
    same command resumes from its last checkpoint (while the other trainer runs, it is
    refused with the usual busy line).
    """

    exit_code = 75


class StoreUnreachableError(TrainerError, OSError):
    """A request to a remote store (gs://, s3://, ...) never got an answer: no network,
    an unresolvable host or proxy, a refused or timed-out connection.

    Also an OSError, so code that retries a store's passing failures (lease renewal,
    staged uploads) keeps retrying this one; the CLI shows it as one line. Not a damaged
    file and not a full disk: nothing is rebuilt or deleted because of it.
    """

    def __init__(self, message: str, url: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.url = url
        # What OSError handlers quote (`err.strerror`): the reason in words, not None.
        self.strerror = reason or message


class StoreDeniedError(TrainerError, PermissionError):
    """A remote store (gs://, s3://, ...) answered and refused: HTTP 401 or 403, wrong or
    missing credentials, or no access to the bucket.

    Also a PermissionError (strerror "Permission denied"), so code that handles a local
    permission error handles this one alike (a write failure says "fix its permissions");
    the CLI shows it as one line, its message, instead of a traceback.
    """

    def __init__(self, message: str, url: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.strerror = "Permission denied"
        self.filename = url

    def __str__(self) -> str:
        return str(self.args[0])
