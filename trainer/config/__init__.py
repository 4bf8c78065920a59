"""Experiment configuration: nested dataclasses loaded from YAML, overridden by `--set`.

Every key has one home, `schema`: its dataclass field, with its default, and in the field's
metadata its one-line meaning (`help`, printed by `launch config keys`) and its limits
(`bounded(...)` for numbers, `choice(...)` for words), so configs, the CLI and the README
agree. A new key is a new field there and nothing else; a rule between keys (one key's
limit set by another, a key that needs another) goes to `rules`. `loading` reads YAML (a
file's `base:` first) and `--set`, converts and checks values by those declarations, and
writes the messages; it knows no key by name, so it never changes for a new key. Unknown
keys and wrong types fail early with the key's name, the value received and what would be
valid, before any TensorFlow work starts.

Callers import from here (`from trainer.config import load_config`), not from the modules.
"""

from __future__ import annotations

from trainer.config.loading import (
    apply_override,
    config_differences,
    describe_keys,
    hyperparameter_items,
    load_config,
    save_config,
    to_yaml,
    validate,
)
from trainer.config.rules import profile_range
from trainer.config.schema import (
    BACKBONE_NAMES,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    TensorBoardConfig,
    TrainConfig,
)

__all__ = [
    "BACKBONE_NAMES",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RuntimeConfig",
    "TensorBoardConfig",
    "TrainConfig",
    "apply_override",
    "config_differences",
    "describe_keys",
    "hyperparameter_items",
    "load_config",
    "profile_range",
    "save_config",
    "to_yaml",
    "validate",
]
