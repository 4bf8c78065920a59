"""Which run a `launch train` is: the folder a config lands in, and its config history.

Runs that never collide (#28 item 1). Without `--workdir`, a config named `C` trains in
`runs/C`, unless that folder holds a run of another config: then in `runs/C-2`, `runs/C-3`,
... whichever comes first of a free folder and one holding this config's run (resumed).
What "another config" means: `training_differences`, every key that changes what is
trained. Left out: the sections `runtime` (where it runs: a run resumes on other devices
or another replica count on the same data stream, and `--workers N` sets its own
strategy), `checkpoint` and `tensorboard` (how it is kept and watched: `--profile-steps`
is one of them), and `train.max_steps` and early stopping's two keys (where it stops: a
run cut by them and extended is the run trained straight; "raise
train.early_stopping_patience to train on" must resume the run it names). Everything
else counts, cadences included: a key left in is at worst a new folder, never a resume of
another experiment. A folder holding a run started from another run's weights (`--from`)
is that run's alone; a `--from` run always starts in a free folder. A folder a run could
not use (a file, a broken link, a folder of files `launch train` did not create) is
passed over too.

The choice is made before the run starts, so two launches at once may both choose the
same free folder: the run checks it again once it holds the workdir's lock
(`check_still_free`), before writing anything.

A resume whose settings changed (any key, the ones left out above included) says which,
and keeps the config the run had up to the step it resumes from as `config-STEP.yaml`
beside the new `config.yaml` (`record_config`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

from trainer import files, storage
from trainer.checkpoint_files import checkpoint_steps
from trainer.config import Config, config_differences, load_config, save_config
from trainer.errors import TrainerError, WorkdirBusyError, WorkdirNotOursError
from trainer.workdir import Workdir

__all__ = ["WorkdirChoice", "check_still_free", "default_workdir", "record_config", "training_differences"]

# Sections and keys that do not change what is trained (see the module's docstring).
IGNORED_SECTIONS = ("runtime", "checkpoint", "tensorboard")
# Keys that change when or how long a run goes, or what watches it, not what it trains.
IGNORED_KEYS = ("train.max_steps", "train.early_stopping_patience", "train.early_stopping_min_delta", "train.actions")
_SHOWN_CHANGES = 3


def training_differences(saved: Config, config: Config) -> list[tuple[str, str, str]]:
    """(key, old, new) of every key that changes what is trained."""
    return [change for change in config_differences(saved, config) if not _ignored(change[0])]


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.split(".")[0] in IGNORED_SECTIONS


@dataclass(frozen=True)
class WorkdirChoice:
    """The folder a run without `--workdir` trains in, and the line that says why, if it is not the first."""

    workdir: str
    note: str | None = None


def default_workdir(config: Config, base: str, *, new_run: bool = False) -> WorkdirChoice:
    """`base`, or the first of `base-2`, `base-3`, ... that is free or holds this config's run.

    Reads only. `new_run` (`--from`): a free folder, whatever the others hold.
    """
    skipped: list[tuple[str, str]] = []  # (folder, what it holds)
    for candidate in _candidates(base):
        held = _other_run_in(Workdir(candidate), config, new_run)
        if held is None:
            return WorkdirChoice(candidate, _note(skipped, candidate) if skipped else None)
        skipped.append((candidate, held))
    raise AssertionError("unreachable: the candidates never end")  # pragma: no cover


def _candidates(base: str) -> Iterator[str]:
    yield base
    for number in itertools.count(2):
        yield f"{base}-{number}"


def _other_run_in(wd: Workdir, config: Config, new_run: bool) -> str | None:
    """None: `config` trains in `wd` (free, or its own run there, resumed); else what `wd` holds."""
    if not storage.exists(wd.root) or not (storage.isfile(wd.config_path) or checkpoint_steps(wd.checkpoints)):
        return _unusable(wd)  # None: free
    if new_run:
        return "holds a run (--from starts a new one)"
    if storage.isfile(wd.started_from_path):
        return "holds a run started from another run's weights"
    try:
        saved = wd.require_config()
    except TrainerError:
        return "holds a run whose config.yaml cannot be read"
    changes = training_differences(saved, config)
    return f"holds a run of another config ({listed(changes, _SHOWN_CHANGES)})" if changes else None


def _unusable(wd: Workdir) -> str | None:
    """What makes `wd` a folder no run can take (the run's own checks would refuse it), or None."""
    if not storage.is_url(wd.root) and os.path.lexists(wd.root) and not os.path.exists(wd.root):
        return "is a broken link"  # a dangling symlink, or a loop: nothing can be created there
    if storage.exists(wd.root) and not storage.isdir(wd.root):
        return "is a file"
    if not storage.isdir(wd.root) or wd.is_ours():
        return None  # new, or ours: whose run it holds is told by its config
    try:
        wd.check_trainable(fresh=False)
    except WorkdirNotOursError:
        return "holds files launch train did not create"
    return None


def check_still_free(wd: Workdir, config: Config, *, new_run: bool = False) -> None:
    """Once the workdir is held: the folder `default_workdir` chose is still this config's.

    Another launch may have chosen it at the same moment and trained there first; this
    one would then resume (or, with `--from`, overwrite the start of) another config's run.
    """
    if not (storage.isfile(wd.config_path) or checkpoint_steps(wd.checkpoints)):
        return  # no run there yet (what else it holds was looked at when it was chosen)
    held = _other_run_in(wd, config, new_run)
    if held is not None:
        raise WorkdirBusyError(
            f"{wd.root} was free when this run chose it, but another launch took it since: it now {held}; "
            "nothing was written; run the same command again to train in the next free folder"
        )


def _note(skipped: list[tuple[str, str]], chosen: str) -> str:
    """`runs/smoke holds a run of another config (data.batch_size 64 -> 32): training in runs/smoke-2`."""
    (first, held), others = skipped[0], [folder for folder, _ in skipped[1:]]
    also = ""
    if others:
        names = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        also = f"; {names} {'is' if len(others) == 1 else 'are'} taken too"
    return f"{first} {held}{also}: training in {chosen}"


def listed(changes: list[tuple[str, str, str]], most: int) -> str:
    """`optimizer.learning_rate 0.02 -> 0.01, ...` (the first `most`, then how many more)."""
    shown = ", ".join(f"{key} {before} -> {after}" for key, before, after in changes[:most])
    return shown + (f" and {len(changes) - most} more" if len(changes) > most else "")


# --- config history ------------------------------------------------------------------------


def record_config(wd: Workdir, config: Config, resumed_step: int | None) -> str | None:
    """Write config.yaml; returns the line a resume (`resumed_step`) with changed settings says.

    The earlier config.yaml, the one the checkpoint of `resumed_step` was trained with, is
    kept first as config-STEP.yaml (atomically; an existing one is left as it is: it is
    older still, and the run's checkpoints up to STEP were trained with it).
    """
    line = None if resumed_step is None else _keep_earlier_config(wd, config, resumed_step)
    save_config(config, wd.config_path)
    return line


def _keep_earlier_config(wd: Workdir, config: Config, step: int) -> str | None:
    if not storage.isfile(wd.config_path):
        return None
    text = storage.read_text(wd.config_path)
    try:
        changes = listed(config_differences(load_config(wd.config_path, bases=False), config), 8)
    except TrainerError as err:  # written by another version, or edited by hand
        changes = f"the earlier config.yaml cannot be compared ({files.short(str(err), 100)})"
    if not changes:
        return None
    kept = wd.kept_config_path(step)
    if not storage.exists(kept):
        files.write_text(kept, text)
    return f"Resuming with changed settings: {changes} (the config up to step {step} is kept in {kept})"
