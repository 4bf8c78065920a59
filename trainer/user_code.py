"""The user's own code, named in a config by import path (`package.module:function`).

`model.name` and `train.actions` may name code of the user's instead of ours, so that a
notebook or a project brings its own network and its own actions without editing this
package. The config holds the path, never the code: config.yaml records it, and whatever
rebuilds the run later (a resume, `launch evaluate`, `predict`, `export`) imports the same
function again. The path is resolved when the run needs it (the model is built, the loop
starts), not when a config is read: reading a config runs no code of anyone's.

Found as Python finds modules (sys.path), then in the current directory, appended, so a
file there never shadows an installed module: `launch train` run from a project folder
finds its `my_model.py`, as `python -m` would. Importing a module runs it: a config (or a
workdir's config.yaml) that names code runs that code with the user's rights.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.files import short

# Dotted identifiers, a colon, dotted identifiers: `pkg.module:function`, `mod:Class.method`.
_DOTTED = r"[^\W\d]\w*(?:\.[^\W\d]\w*)*"
_IMPORT_PATH = re.compile(rf"{_DOTTED}:{_DOTTED}")
EXAMPLE = "package.module:function"
# Where the frames of a traceback are not the user's: Python's and installed packages' files
# (and ours, below), skipped to name the place in the user's own code that failed.
_LIBRARY_PATHS = tuple(
    {os.path.realpath(sysconfig.get_paths()[name]) + os.sep for name in ("stdlib", "platstdlib", "purelib", "platlib")}
)
_OUR_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
_OUR_PACKAGES = ("trainer", "launch")


def is_import_path(text: Any) -> bool:
    """Whether `text` is spelled as `package.module:function` (nothing is imported)."""
    return isinstance(text, str) and _IMPORT_PATH.fullmatch(text) is not None


def resolve(path: str, key: str) -> Callable:
    """The callable `path` names, imported; a ConfigError naming `key`, the path and the fault.

    The faults, each its own message: not an import path, the running script (`__main__`,
    which nothing can import again later), the standard library, a module that is not
    found or fails to import, an attribute it lacks, an attribute that is not callable.
    """
    if not is_import_path(path):
        raise ConfigError(f"{key}={short(repr(path), 80)} is not an import path; write it as {EXAMPLE}")
    module_name, _, attribute = path.partition(":")
    _check_module_name(module_name, key, path)
    target: Any = _import(module_name, key, path)
    for depth, part in enumerate(attribute.split(".")):
        owner = target
        try:
            target = getattr(owner, part)
        except AttributeError:
            owner_name = ".".join([module_name, *attribute.split(".")[:depth]])
            raise ConfigError(_missing(owner, owner_name, part, key, path)) from None
    if not callable(target):
        raise ConfigError(
            f"{key}={path}: {attribute} is {_a(type(target).__name__)}, not a function or class; "
            f"name a callable ({EXAMPLE})"
        )
    return target


def resolve_each(paths: list[str], key: str) -> list[Callable]:
    """`resolve` of each entry of a list key, named `key[index]` in its error."""
    return [resolve(path, f"{key}[{index}]") for index, path in enumerate(paths)]


def failure(err: BaseException) -> str:
    """`ValueError: bad shape (my_model.py:12)`: an exception of user code, in one line, with
    the innermost place in the user's files (not Python's, not ours) it came through."""
    if isinstance(err, SyntaxError) and err.filename:  # its place is the file it could not read
        return f"SyntaxError: {err.msg} ({_relative(err.filename)}:{err.lineno})"
    text = short(str(err), 200)
    return f"{type(err).__name__}{': ' + text if text else ''}{_where(err)}"


def _check_module_name(module_name: str, key: str, path: str) -> None:
    if module_name == "__main__":
        raise ConfigError(
            f"{key}={path} names the running script, which a resumed run or `launch evaluate` cannot import "
            "again; put the function in a module file (my_model.py beside the script or notebook) and name "
            "it as my_model:function"
        )
    # Never a user's code, and its callables would run with our arguments: subprocess:run
    # would start a program named after the first of them.
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names:
        raise ConfigError(
            f"{key}={path} names Python's standard library ({module_name}); name a function of your own "
            f"module ({EXAMPLE}), and if {top}.py is yours, rename it: Python's own module comes first"
        )
    # Nor ours: trainer.training:train or launch.cli:cli, called with a model's or an action's
    # arguments, would start a run (or a command that exits) from inside this one.
    if top in _OUR_PACKAGES:
        raise ConfigError(
            f"{key}={path} names the trainer's own code ({top}); name a function of your own module ({EXAMPLE}), "
            f"and if {top}.py is yours, rename it"
        )


def _import(module_name: str, key: str, path: str) -> Any:
    with _current_directory_searched():
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise ConfigError(
                    f"{key}={path}: no module named {err.name!r} on Python's path (sys.path) or in the current "
                    f"directory ({os.getcwd()}); run from the folder that holds it, or add that folder to PYTHONPATH"
                ) from None
            raise ConfigError(f"{key}={path}: importing {module_name} failed: {failure(err)}") from err
        except (Exception, SystemExit) as err:  # anything the module's own code raises (sys.exit included)
            raise ConfigError(f"{key}={path}: importing {module_name} failed: {failure(err)}") from err


@contextlib.contextmanager
def _current_directory_searched() -> Iterator[None]:
    """The current directory at the end of sys.path while importing (removed after: the
    imported module stays in sys.modules, and nothing else the process imports changes)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _missing(owner: Any, owner_name: str, part: str, key: str, path: str) -> str:
    names = [name for name in dir(owner) if not name.startswith("_") and callable(getattr(owner, name, None))]
    close = difflib.get_close_matches(part, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = f"its callables: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names else "it has none"
    where = getattr(owner, "__file__", None)
    return f"{key}={path}: {owner_name}{f' ({where})' if where else ''} has no {part!r}; {hint}{listed}"


def _where(err: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        filename = frame.filename
        if filename.startswith("<"):
            continue
        real = os.path.realpath(filename)
        if real.startswith(_LIBRARY_PATHS) or real.startswith(_OUR_PACKAGE):
            continue
        return f" ({_relative(filename)}:{frame.lineno})"
    return ""


def _relative(filename: str) -> str:
    """Relative to the current directory when inside it, else as it is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if relative.startswith(os.pardir) else relative


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
