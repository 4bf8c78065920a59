"""`launch --version`: this package's version and TensorFlow's and Keras', read from the
installed packages' metadata, so that neither is imported (the command stays instant)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_PACKAGE = "tf-dist-trainer"
# The distributions TensorFlow comes as (pyproject.toml's extras, and the macOS build).
_TENSORFLOW = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tensorflow-macos")
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def version_line() -> str:
    """`launch 0.1.0 (TensorFlow 2.21.0, Keras 3.15.1)`; a missing one is said so."""
    tensorflow = _installed(*_TENSORFLOW)
    keras = _installed("keras")
    return f"launch {own_version()} (TensorFlow {tensorflow or 'not installed'}, Keras {keras or 'not installed'})"


def own_version() -> str:
    """The installed package's version; in a checkout that is not installed, pyproject.toml's."""
    found = _installed(_PACKAGE)
    if found:
        return found
    try:
        text = _PYPROJECT.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = text.split("[project]", 1)[-1]
    match = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    return match.group(1) if match else "unknown"


def _installed(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None
