"""One value of a key: a YAML value or `--set` text turned into the key's type, or refused.

The types a key may have: bool, int, float, str (a `choice` among words, or also an import
path where its metadata says `import_path`) and list[str] (`train.actions`). Each refusal
names the key, the value received and what would be valid. trainer.config.loading walks
the config; what a single value may be is decided here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

import yaml

from trainer.config.brief import shown
from trainer.errors import ConfigError
from trainer.user_code import EXAMPLE, is_import_path


def is_string_list(ftype: Any) -> bool:
    """Whether a field's type is list[str] (a YAML list; `--set a,b` or `--set [a, b]`)."""
    return typing.get_origin(ftype) is list


def type_name(ftype: Any) -> str:
    """`int`, `str`, `list[str]`: a type as `launch config keys` names it (one word)."""
    return str(ftype) if is_string_list(ftype) else getattr(ftype, "__name__", str(ftype))


def check_choice(key: str, value: Any, f: dataclasses.Field) -> Any:
    choices = f.metadata.get("choices")
    if not choices or value in choices:
        return value
    if f.metadata.get("import_path") and is_import_path(value):
        return value  # the user's own code, resolved when it is needed (trainer.user_code)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    own = f", or your own as {EXAMPLE}" if f.metadata.get("import_path") else ""
    raise ConfigError(f"{key} must be one of {', '.join(choices)}{own}; got {shown(value)}{hint}")


def coerce_value(key: str, value: Any, ftype: Any, f: dataclasses.Field) -> Any:
    """Check a YAML value against the field type; ints are accepted where floats are."""
    if is_string_list(ftype):
        return _string_list(key, [] if value is None else value)
    if ftype is bool:
        ok = isinstance(value, bool)
    elif ftype is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ftype is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = _as_float(key, value) if ok else value
    elif ftype is str:
        ok = isinstance(value, str)
        if value is None:
            value, ok = "", True
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {ftype} for {key}")
    if not ok:
        raise ConfigError(f"{key} must be {_article(ftype)}, got {shown(value)}")
    check_finite(key, value)
    return check_choice(key, value, f)


def _string_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of strings, e.g. [{EXAMPLE}], got {shown(value)}")
    return list(value)


def _as_float(key: str, value: float) -> float:
    """An int from YAML as a float; one of 400 digits is beyond any float (OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{key} must be a finite number, got {shown(value)}") from None


def check_finite(key: str, value: Any) -> None:
    """nan and inf pass every range check (comparisons with nan are false): refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce_text(key: str, text: str, ftype: Any, f: dataclasses.Field) -> Any:
    """Turn `--set` text into the field's type."""
    if is_string_list(ftype):
        return _text_list(key, text)
    try:
        if ftype is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if ftype is int:
            return int(text)
        if ftype is float:
            value = float(text)
            check_finite(key, value)
            return value
    except ValueError:
        raise ConfigError(f"{key} must be {_article(ftype)}, got {shown(text)}") from None
    return check_choice(key, text, f)


def _text_list(key: str, text: str) -> list[str]:
    """`a,b` (commas, spaces around them ignored; empty: no items) or a YAML list `[a, b]`."""
    if not text.startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key} must be a list like [{EXAMPLE}, ...] or a,b; got {shown(text)}") from None
    return _string_list(key, value)


def _article(ftype: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(ftype, str(ftype))
