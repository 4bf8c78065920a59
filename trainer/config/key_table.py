"""The README's table of config keys, rendered from the keys' declarations.

Every key's default, type, meaning and choices live in trainer.config.schema; this module
renders them (through `describe_keys`, as `launch config keys` lists them) as the markdown
table between the README's marker comments, so the table cannot drift from the code:
tests/test_readme.py compares the two. After adding or changing a key:

    python -m trainer.config.key_table --write README.md    # rewrite the table in place
    python -m trainer.config.key_table                      # print it
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.config.loading import KeyInfo, describe_keys

START = "<!-- keys:start -->"
END = "<!-- keys:end -->"
REGENERATE = "python -m trainer.config.key_table --write README.md"


def render_table(keys: Sequence[KeyInfo] | None = None) -> str:
    """The markdown table of every key (default: the schema's), one row per key."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for info in describe_keys() if keys is None else keys:
        meaning = _prose(info.meaning) + (
            f" One of: {', '.join(f'`{c}`' for c in info.choices)}." if info.choices else ""
        )
        cells = (f"`{info.key}`", info.kind, _default(info.default), meaning)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def table_in(text: str) -> str:
    """The table between the markers of `text` (without them); ValueError without markers."""
    start, end = _bounds(text)
    return text[start:end].strip("\n")


def with_table(text: str, table: str) -> str:
    """`text` with the table between its markers replaced by `table`."""
    start, end = _bounds(text)
    return f"{text[:start]}\n{table}\n{text[end:]}"


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(render_table())
        return 0
    if len(argv) != 2 or argv[0] != "--write":
        print("usage: python -m trainer.config.key_table [--write FILE.md]", file=sys.stderr)
        return 2
    path = Path(argv[1])
    text = path.read_text(encoding="utf-8")
    updated = with_table(text, render_table())
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    print(f"{path}: the config key table is {'rewritten' if updated != text else 'up to date'}")
    return 0


def _prose(text: str) -> str:
    """`text` for a markdown cell: `<` and `>` outside code spans escaped (`<class>/` is no tag)."""
    parts = text.split("`")
    parts[::2] = [part.replace("<", "&lt;").replace(">", "&gt;") for part in parts[::2]]
    return "`".join(parts)


def _default(value: Any) -> str:
    """A default as a YAML file spells it."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _bounds(text: str) -> tuple[int, int]:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers (in this order) around the config key table")
    return start + len(START), end


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
