"""How a config key is declared: its default, its one-line meaning and its limits.

`bounded` (numbers), `choice` (words), `setting` (no limits of its own) and `section` put
a key's meaning and limits into its dataclass field's metadata, where trainer.config.loading
reads them to check and describe a config; the keys themselves live in trainer.config.schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric key, kept in its field's metadata under "bounds".

    Declared with `bounded`; a value outside is refused once the whole config is read,
    naming the key, the value and the range.
    """

    minimum: float | None = None  # None: no lower bound
    inclusive: bool = True  # whether `minimum` itself is valid
    maximum: float | None = None  # inclusive
    below: float | None = None  # exclusive: for rates and fractions that must stay under 1


def bounded(
    default: float,
    *,
    help: str,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
) -> Any:
    """A numeric field whose value must be >= minimum (or > above) and <= maximum (or < below).

    Upper bounds are there because sizes past them are typos (1e8 for 128), not experiments,
    and would only fail later, deep inside TensorFlow, after minutes of work.
    """
    if minimum is not None and above is not None:
        raise TypeError("give minimum (inclusive) or above (exclusive), not both")
    bounds = Bounds(
        minimum=above if above is not None else minimum, inclusive=above is None, maximum=maximum, below=below
    )
    return field(default=default, metadata={"bounds": bounds, "help": help})


def choice(default: str, *choices: str, help: str) -> Any:
    """A word field: one of `choices` (kept in its metadata, listed by `launch config keys`)."""
    return field(default=default, metadata={"choices": choices, "help": help})


def setting(default: Any, *, help: str) -> Any:
    """A field without limits of its own (a flag, a path, a number the rules check)."""
    return field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    """A field holding a section: its meaning is the first line of the section's docstring."""
    return field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip().splitlines()[0]})
