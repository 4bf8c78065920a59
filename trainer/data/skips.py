"""data.on_bad_image=skip's findings, kept in the workdir so a resumed run does not decode
every image again to find them (WORKDIR/unreadable.json).

A split's entry holds a fingerprint of what was listed (names, labels and, for local files
and shards, sizes and modification times) and the indices (files) or ordinals (records)
that did not decode. It is used only when the fingerprint matches; anything else (another
listing, a file changed, a damaged or foreign file) is said and the images are checked
again. Keeping the first run's findings also keeps its batches: the same examples are left
out after every resume, even one that failed only by chance (a read error of a file that
has not changed since); a file repaired since is changed, so the images are checked again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from trainer import files, storage
from trainer.data.splits import Examples, FileSplit, RecordSplit, path_bytes
from trainer.say import Say

FILE_NAME = "unreadable.json"
_VERSION = 1


def fingerprint(split: Examples) -> str | None:
    """What identifies a split's listing; None where it cannot be had cheaply (files on an
    object store: a request per file), so nothing is remembered for it."""
    digest = hashlib.sha256()
    if isinstance(split, RecordSplit):
        try:
            sizes = _sizes(split.shards)
        except OSError:
            return None  # gone since it was listed: reading it names it
        for shard, count, size in zip(split.shards, split.counts, sizes):
            digest.update(f"{shard}\0{count}\0{size}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    if not isinstance(split, FileSplit) or any(storage.is_url(folder) for folder in split.folders):
        return None
    for index in range(len(split)):
        path = path_bytes(split.path(index))
        try:
            stat = os.stat(path)
        except OSError:
            return None  # gone since it was listed: decoding it names it
        digest.update(b"%s\0%d\0%d\0%d\n" % (path, split.labels[index], stat.st_size, stat.st_mtime_ns))
    return digest.hexdigest()


def _sizes(paths: list[str]) -> list[int]:
    return [storage.size(path) for path in paths]


@dataclass
class SkipMemo:
    """The findings of WORKDIR/unreadable.json, read once. What was found anew is kept
    until `save`, which the trainer calls once it holds the workdir (the chief only: every
    worker finds the same): preparing the data writes nothing."""

    path: str
    say: Say
    _entries: dict | None = field(default=None, init=False)
    _changed: bool = field(default=False, init=False)
    # The fingerprint `known` took of each split, for `remember` (split, fingerprint).
    _taken: dict = field(default_factory=dict, init=False)

    def known(self, name: str, split: Examples) -> list[int] | None:
        """The unreadable indices found for this very listing at an earlier start, or None.
        The listing's fingerprint is taken here, before any pass decodes it, and is the one
        `remember` keeps: a file changed during that pass makes the next start check again."""
        found = fingerprint(split)
        entry = self._read().get(name)
        if entry is not None and (entry["fingerprint"], entry["listed"]) == (found, _listed(split)):
            return entry["unreadable"]  # found is a fingerprint: the entry's is a string
        if entry is not None:
            self.say(f"The {name} images differ from those {self.path} describes: checking them again")
        self._taken[name] = (split, found)
        return None

    def remember(self, name: str, split: Examples, unreadable: list[int]) -> None:
        taken, found = self._taken.pop(name, (None, None))
        if taken is not split:
            found = fingerprint(split)
        if found is None:
            return
        entries = dict(self._read())
        entries[name] = {"fingerprint": found, "listed": _listed(split), "unreadable": sorted(unreadable)}
        self._entries, self._changed = entries, True

    def save(self) -> None:
        """Write what was found anew (nothing if every split matched its entry)."""
        if not self._changed:
            return
        try:
            files.write_json(self.path, {"version": _VERSION, **self._read()})
        except OSError as err:  # a memo only: the run goes on, the next start checks again
            self.say(f"Warning: could not write {self.path} ({err.strerror or type(err).__name__})")
        self._changed = False

    def _read(self) -> dict:
        if self._entries is None:
            raw = files.read_json(self.path, self.say, "checking the images again")
            self._entries = _valid_entries(raw, self.path, self.say) if raw is not None else {}
        return self._entries


def _listed(split: Examples) -> int:
    return sum(split.counts) if isinstance(split, RecordSplit) else len(split)


def _valid_entries(raw: object, path: str, say: Say) -> dict:
    """The entries of a parsed unreadable.json whose every value has its type and range;
    a file with anything else is said and left out (checked again, then rewritten)."""
    if not isinstance(raw, dict) or not files.integer_in(raw.get("version"), _VERSION, _VERSION):
        say(f"Warning: {path} is not one this version wrote; checking the images again")
        return {}
    entries = {}
    for name in ("train", "test"):
        entry = raw.get(name)
        if entry is None:
            continue
        if not _valid_entry(entry):
            say(f"Warning: {path} has a damaged {name!r} entry; checking the {name} images again")
            continue
        entries[name] = entry
    return entries


def _valid_entry(entry: object) -> bool:
    """As `remember` writes one: indices in the listing, strictly increasing (a TFRecord
    split's skipped ordinals are searched as a sorted list), and not every example (a start
    that found none decodable ended there, and wrote nothing)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
        return False
    listed, unreadable = entry.get("listed"), entry.get("unreadable")
    if not files.integer_in(listed, 0, 2**40) or not isinstance(unreadable, list):
        return False
    if unreadable and len(unreadable) >= listed:
        return False
    return all(files.integer_in(index, 0, listed - 1) for index in unreadable) and all(
        earlier < later for earlier, later in zip(unreadable, unreadable[1:])
    )
