"""Values as error messages show them: one short line, whatever the input.

Its own module because both the loading (a wrong type, an unknown key) and the rules
(a range that depends on another key) echo the value they refuse.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any


class _Brief(reprlib.Repr):
    """reprlib, and an integer's digits are not even produced when there are too many of
    them: repr() of a 5,000-digit integer raises ValueError (Python's 4,300-digit limit),
    and YAML reads hexadecimal ones of any length."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 512:
            return super().repr_int(x, level)
        digits = int((x.bit_length() - 1) * math.log10(2)) + 1
        digits += abs(x) >= 10**digits
        return f"<{'a negative' if x < 0 else 'an'} integer of {digits} digits>"


_BRIEF = _Brief()
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong, _BRIEF.maxlevel = 60, 60, 60, 2


def shown(value: Any, limit: int = 80) -> str:
    """A repr of `value` of at most `limit` characters, built without expanding it.

    Error messages stay one short line even for hostile input: a YAML alias bomb is a few
    hundred bytes that `repr` would expand to megabytes.
    """
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
