"""Reading a config: YAML, its `base:` files, `--set` overrides, types, bounds, and what a wrong value says.

Nothing here knows a key by name: the keys, their types and their limits come from the
dataclasses of trainer.config.schema (bounds and choices from each field's metadata), the
rules between keys from trainer.config.rules. A new key therefore needs no change here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Iterator
from typing import Any

import yaml

from trainer import files, storage
from trainer.config.brief import shown
from trainer.config.fields import Bounds
from trainer.config.rules import check_rules
from trainer.config.schema import Config
from trainer.config.values import coerce_text, coerce_value, type_name
from trainer.errors import ConfigError

# A chain of bases longer than this is a mistake (a generated loop of distinct files), and
# Python's recursion limit would otherwise end it with a wrong message (~970 deep).
MAX_BASES = 32
# A config is a few kilobytes: a bigger file (a log or a data file named by mistake, or a
# workdir's config.yaml replaced by one) would take minutes to parse, line by line.
MAX_CONFIG_BYTES = 1_000_000


def load_config(
    path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *, bases: bool = True
) -> Config:
    """Read a YAML config (or the defaults), apply `key=value` overrides, validate.

    Args:
        path: YAML file; None starts from the dataclass defaults. A file that says
            `base: other.yaml` (relative to its own folder) is read over that file, key by key.
        overrides: strings like `"data.batch_size=256"`, applied in order.
        bases: False for a config the trainer saved (a workdir's config.yaml, merged, so
            without `base:`): one that names a base is refused, not followed, as the file is
            untrusted input (a shared workdir could make any command read, and quote in its
            error, any file its user can read, or fetch a gs:// object with their credentials).
    """
    raw = {} if path is None else (_read_with_bases(str(path), ()) if bases else _read_saved(str(path)))
    config = _from_dict(Config, raw, prefix="")
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def _read_with_bases(path: str, chain: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The mapping of `path` read over that of its `base:` (recursively), key by key.

    `chain`: (spelling, identity) of the files that included this one, outermost first.
    """
    raw = _read_yaml(path)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be a config file's path (a string), got {shown(base)}")
    chain = (*chain, (path, _identity(path)))
    resolved = _beside(path, base)
    _check_no_cycle(chain, resolved)
    if len(chain) >= MAX_BASES:
        raise ConfigError(
            f"{_path_shown(chain[0][0])}: its chain of bases is over {MAX_BASES} files long (at "
            f"{_path_shown(path)}); a config needs a few"
        )
    if not storage.special_kind(resolved) and not storage.isfile(resolved):
        raise ConfigError(f"{path} names base {shown(base)}, which is not found: {_path_shown(resolved)}")
    return _merged(_read_with_bases(resolved, chain), raw)


def _read_saved(path: str) -> dict[str, Any]:
    raw = _read_yaml(path)
    if "base" in raw:
        raise ConfigError(
            f"{path} names a base ({shown(raw['base'], 60)}), which a saved config never does (it holds the merged "
            "result); it was edited by hand: remove the base line, or write the keys it should have"
        )
    return raw


def _beside(path: str, name: str) -> str:
    """`name` as the file `path` names it: relative to the folder of `path` unless absolute."""
    if storage.is_url(name) or os.path.isabs(name):
        return name
    if storage.is_url(path):
        return storage.join(storage.parent_of(path), name)
    return os.path.join(os.path.dirname(path), name)


def _identity(path: str) -> str:
    """One spelling per file, so that `./a.yaml` and a symlink to it are the same file."""
    if storage.is_url(path):
        return path
    try:
        return os.path.realpath(path)
    except ValueError:  # a NUL byte: no file has that name, and the lookup that follows says so
        return path


def _check_no_cycle(chain: tuple[tuple[str, str], ...], resolved: str) -> None:
    identity = _identity(resolved)
    for spelling, seen in chain:
        if seen == identity:
            same = "" if spelling == resolved else f" ({_path_shown(resolved)} is {_path_shown(spelling)})"
            names = " -> ".join(_path_shown(name) for name in [*(name for name, _ in chain), resolved])
            raise ConfigError(
                f"config bases form a cycle: {names}{same}; a base cannot include a file that includes it"
            )


def _path_shown(path: str) -> str:
    """A path as it is, unless it is long or holds a control character (a base is any YAML string)."""
    return path if path.isprintable() and len(path) <= 300 else shown(path, 300)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `override` set over it; a section (a mapping in both) key by key."""
    merged = dict(base)
    for name, value in override.items():
        below = merged.get(name)
        if isinstance(below, dict) and (isinstance(value, dict) or value is None):
            merged[name] = _merged(below, value or {})
        else:
            merged[name] = value
    return merged


def _read_yaml(path: str) -> dict[str, Any]:
    """The mapping a YAML config holds; anything else (hostile input included) is one line."""
    kind = storage.special_kind(path)  # /dev/null, a pipe: isfile() says no, yet they exist
    if kind:
        raise ConfigError(f"{path} is not a regular file ({kind}); a config is a YAML file, e.g. configs/smoke.yaml")
    if not storage.isfile(path):
        raise ConfigError(f"config file not found: {path} (the shipped ones are in configs/)")
    if storage.size(path) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is {storage.size(path):,} bytes, not a config (a few kilobytes; at most {MAX_CONFIG_BYTES:,} "
            "are read): is it the file you meant?"
        )
    try:
        raw = yaml.safe_load(storage.read_text(path)) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {files.short(str(err).replace(chr(10), ' '), 300)}") from None
    except RecursionError:  # PyYAML composes nested [ and { recursively: 5,000 of them exhaust the stack
        raise ConfigError(f"{path} nests lists or mappings thousands of levels deep; a config is two levels") from None
    except ValueError as err:  # a value PyYAML cannot build: a 5,000-digit integer, February 30th
        raise ConfigError(f"{path} holds a value that cannot be read ({files.short(str(err), 100)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(config: Config, override: str) -> None:
    """Apply one `section.key=value`, coercing the text to the field's type."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {shown(override)}")
    target: Any = config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth])
        f = _field_named(target, name, prefix)
        full_key = ".".join(parts[: depth + 1])
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(_resolved_type(target, f)):
                example = f"{full_key}.{_first_key(target, f)}"
                raise ConfigError(f"{full_key} is a section; set one of its keys, e.g. {example}=...")
            setattr(target, name, coerce_text(full_key, text.strip(), _resolved_type(target, f), f))
        else:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{full_key} is a key, not a section; use --set {full_key}=VALUE")


def validate(config: Config) -> None:
    """Check every key's bounds, then the rules between keys (trainer.config.rules)."""
    check_bounds(config)
    check_rules(config)


def check_bounds(config: Any) -> None:
    """Every lower bound first, then the upper ones, each in the order the keys are declared.

    Values are echoed through `shown`: `--set seed=<4,000 nines>` is one short line too.
    """
    leaves = [(key, value, f.metadata["bounds"]) for key, value, f, _ in _leaves(config) if "bounds" in f.metadata]
    for key, value, bounds in leaves:
        minimum = bounds.minimum
        if minimum is not None and (value < minimum or (not bounds.inclusive and value == minimum)):
            raise ConfigError(f"{key} must be {'>=' if bounds.inclusive else '>'} {minimum}, got {shown(value)}")
    for key, value, bounds in leaves:
        if bounds.maximum is not None and value > bounds.maximum:
            raise ConfigError(f"{key} must be between {_lowest(bounds)} and {bounds.maximum}, got {shown(value)}")
    for key, value, bounds in leaves:
        if bounds.below is not None and value >= bounds.below:
            raise ConfigError(
                f"{key} must be < {bounds.below}, got {shown(value)} (the range is [{_lowest(bounds)}, {bounds.below}))"
            )


def _lowest(bounds: Bounds) -> float:
    """The low end a range message names: 0 when the key has no lower bound."""
    return 0 if bounds.minimum is None else bounds.minimum


def _leaves(instance: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field, Any]]:
    """(dotted key, value, field, its section) of every leaf key, sections entered, in declaration order."""
    for f in dataclasses.fields(instance):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key)
        else:
            yield key, value, f, instance


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dicts, as YAML and the hyperparameter tables want them."""
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    """The config as `load_config` reads it back, keys in declaration order (as documented)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically), so a run can be understood and repeated later."""
    files.write_text(path, to_yaml(config))


def config_differences(before: Config, after: Config) -> list[tuple[str, str, str]]:
    """(key, old value, new value) of every leaf key that differs, values shown briefly."""
    old, new = hyperparameter_items(before), hyperparameter_items(after)
    return [(key, shown(old[key], 40), shown(new[key], 40)) for key in old if old[key] != new[key]]


def hyperparameter_items(config: Config) -> dict[str, Any]:
    """Every leaf key as a flat `section.key` -> value; a list as one string (`a, b`), as
    TensorBoard's HParams table takes only numbers, booleans and strings."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": _scalar(value) for key, value in values.items()})
        else:
            flat[section] = _scalar(values)
    return flat


def _scalar(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, list) else value


class KeyInfo(typing.NamedTuple):
    """One leaf key as `launch config keys` lists it."""

    key: str  # dotted: section.key
    kind: str  # the type's name: int, float, bool, str, list[str]
    default: Any
    meaning: str  # one line, from the field's metadata (trainer.config.schema)
    choices: tuple[str, ...]  # the valid words of a `choice` key, else ()


def describe_keys() -> list[KeyInfo]:
    """Every leaf key with its type, default, meaning and choices, in declaration order."""
    return [
        KeyInfo(key, _type_name(owner, f), value, f.metadata["help"], tuple(f.metadata.get("choices", ())))
        for key, value, f, owner in _leaves(Config())
    ]


# --- helpers ---------------------------------------------------------------------------


def _from_dict(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix or "the config"
        raise ConfigError(f"{where} must be a mapping of keys, got {shown(raw)}")
    instance = cls()
    for name, value in raw.items():
        f = _field_named(instance, str(name), prefix)
        key = f"{prefix}.{name}" if prefix else str(name)
        ftype = _resolved_type(instance, f)
        if dataclasses.is_dataclass(ftype):
            setattr(instance, f.name, _from_dict(ftype, value or {}, key))
        else:
            setattr(instance, f.name, coerce_value(key, value, ftype, f))
    return instance


def _field_named(instance: Any, name: str, prefix: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(instance)}
    if name in fields:
        return fields[name]
    where = f"in section '{prefix}'" if prefix else "at the top level"
    name = shown(name, 60).strip("'")
    full = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown key '{full}' {where}: {hint}valid keys: {', '.join(fields)}")


def _resolved_type(instance: Any, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(type(instance))
    return hints[f.name]


def _first_key(instance: Any, f: dataclasses.Field) -> str:
    return dataclasses.fields(getattr(instance, f.name))[0].name


def _type_name(instance: Any, f: dataclasses.Field) -> str:
    return type_name(_resolved_type(instance, f))
