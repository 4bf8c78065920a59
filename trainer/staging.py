"""Checkpoints for a remote workdir are saved to local disk first and uploaded behind training.

A save to an object store takes several round trips (data, index, state file, deletes)
plus the transfer, all while the training loop waits. `tf.train.CheckpointOptions(
experimental_enable_async_checkpoint=True)` would hide that, but it fails on Keras 3
variables (TensorFlow 2.21, Keras 3.15: "tf.function only supports singleton
tf.Variables" in Keras' `_copy_trackable_to_cpu`). So the chief's CheckpointManager
writes into a local staging folder (a local-disk stall), and one background thread copies
each checkpoint to the workdir in an order that a kill cannot break:

1. the data files, then the index (a checkpoint is listed, by its `.index`, only once
   its data is there; a half-uploaded one is unlisted, and the resume falls back);
2. the `checkpoint` state file naming it (for tools that read tf.train.latest_checkpoint);
3. only then the remote checkpoints beyond `keep` go, index first.

`wait()` blocks until every queued upload is done (the run's end, a stop for preemption:
the trainer does not exit before its last checkpoint is in the workdir) and raises an
upload's error there, so a failed upload is never silent.

A save first waits (`make_room()`) while `keep` checkpoints still wait for their upload:
the staging folder keeps `keep`, and each save deletes the oldest there, which must be in
the workdir by then. A store slower than the saves therefore slows the saves, and the
workdir is never more than keep-1 checkpoints behind.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections.abc import Callable

from trainer import files, storage
from trainer.checkpoint_files import INDEX_SUFFIX, checkpoint_file_names, checkpoint_steps, remove_checkpoint


class CheckpointUploads:
    """A local staging folder for a CheckpointManager, and the thread that uploads from it."""

    def __init__(self, remote: str, keep: int, require_held: Callable[[str], None] | None = None) -> None:
        """`require_held`: called before each upload writes the workdir; raises if the
        workdir's lease was lost (its new holder's checkpoints must not be overwritten or
        deleted), and the error reaches the training thread like any upload's."""
        self.remote = remote
        self.keep = keep
        self._require_held = require_held or (lambda _doing: None)
        self.local = tempfile.mkdtemp(prefix="trainer-checkpoints-")
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._error: BaseException | None = None
        self._pending = 0  # submitted, not yet uploaded (or given up)
        self._uploaded = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int) -> None:
        """Queue the checkpoint of `step` (already saved in `local`) for upload."""
        self._raise_if_failed()
        with self._uploaded:
            self._pending += 1
        self._queue.put(step)

    def make_room(self) -> None:
        """Block until fewer than `keep` checkpoints wait for upload (then raise an upload's
        error, if one failed): call it before each save into `local`.

        Why: the staging folder's CheckpointManager keeps `keep` checkpoints, so its next
        save deletes the oldest one there; a store slower than the saves (retries, a slow
        link) had not uploaded it yet, and the run ended in "No such file or directory".
        So the workdir is never more than keep-1 checkpoints behind."""
        with self._uploaded:
            self._uploaded.wait_for(lambda: self._pending < self.keep or not self._thread.is_alive())
        self._raise_if_failed()

    def wait(self) -> None:
        """Block until every queued checkpoint is uploaded; raise the first upload error."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Finish the uploads, stop the thread and delete the staging folder (once)."""
        if not self._thread.is_alive():
            return
        try:
            self.wait()
        finally:
            self._queue.put(None)
            self._thread.join(timeout=60)
            shutil.rmtree(self.local, ignore_errors=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _run(self) -> None:
        while (step := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._upload(step)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = err
            finally:
                with self._uploaded:
                    self._pending -= 1
                    self._uploaded.notify_all()
                self._queue.task_done()
        self._queue.task_done()

    def _upload(self, step: int) -> None:
        self._require_held(f"uploading the checkpoint of step {step}")
        storage.makedirs(self.remote)
        names = checkpoint_file_names(self.local, step)
        for name in sorted(names, key=lambda name: name.endswith(INDEX_SUFFIX)):  # the index last
            self._require_held(f"uploading {name}")  # asked per file: a checkpoint's data can take minutes
            storage.copy_file(storage.join(self.local, name), storage.join(self.remote, name))
        steps = checkpoint_steps(self.remote)
        newest_first = [f"ckpt-{kept}" for kept in steps[: self.keep]]
        state = f'model_checkpoint_path: "{newest_first[0]}"\n' + "".join(
            f'all_model_checkpoint_paths: "{name}"\n' for name in reversed(newest_first)
        )
        self._require_held(f"naming the checkpoint of step {step} the latest")
        files.write_text(storage.join(self.remote, "checkpoint"), state)
        for old in steps[self.keep :]:
            self._require_held(f"deleting the checkpoint of step {old}")
            remove_checkpoint(self.remote, old)
