"""The rules that tie keys together, which no single field's bounds can say.

Checked after every key has its type and range (trainer.config.loading.validate), so a
rule may compare keys freely: one key's limit that depends on another, settings that do
nothing unless another is set, a key that needs another.
"""

from __future__ import annotations

from trainer.config.brief import shown
from trainer.config.schema import (
    BACKBONE_NAMES,
    BACKBONE_ONLY_KEYS,
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
)
from trainer.errors import ConfigError
from trainer.user_code import is_import_path


def check_rules(config: Config) -> None:
    """Raise ConfigError, naming the keys and the fix, for the first rule `config` breaks."""
    if config.optimizer.lookahead_every_steps and config.optimizer.ema_momentum:
        raise ConfigError(
            "optimizer.lookahead_every_steps and optimizer.ema_momentum both average the weights; set one of them to 0"
        )
    _check_weight_decay(config.optimizer)
    for key in ("initial_lr_fraction", "final_lr_fraction"):
        if not 0 <= getattr(config.optimizer, key) <= 1:
            raise ConfigError(
                f"optimizer.{key} must be between 0 and 1 (a fraction of optimizer.learning_rate), "
                f"got {getattr(config.optimizer, key)}"
            )
    spl, every = config.train.steps_per_loop, config.tensorboard.every_steps
    if every % spl:
        raise ConfigError(
            f"tensorboard.every_steps={every} must be a multiple of train.steps_per_loop={spl} "
            "(scalars are written between compiled calls)"
        )
    if config.tensorboard.profile_steps:
        profile_range(config.tensorboard.profile_steps)
    _check_fine_tuning(config)
    _check_accumulation_and_early_stopping(config)
    _check_actions(config.train.actions)
    _check_idle_settings(config)
    if config.data.service and config.data.placement == "device":
        raise ConfigError(
            "data.service sends the batches of the host pipeline; data.placement=device makes them on the "
            "device and would not use it: set data.placement=host (or auto)"
        )
    if config.data.source in ("folder", "tfrecord") and not config.data.path:
        what = "train/<class>/ and test/<class>/, or <class>/" if config.data.source == "folder" else "TFRecord shards"
        raise ConfigError(f"data.source={config.data.source} needs data.path (a folder with {what})")


def profile_range(text: str) -> tuple[int, int]:
    """Parse "START:END" global steps for the profiler."""
    start, sep, end = text.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        first = last = -1
    if not sep or first < 0 or last <= first:
        raise ConfigError(
            f"tensorboard.profile_steps must look like START:END with 0 <= START < END, got {shown(text)}"
        )
    return first, last


def _check_weight_decay(optimizer: OptimizerConfig) -> None:
    """Keras' decoupled decay takes learning_rate * weight_decay of every weight at each
    step: at 1 or more it zeroes (or flips) all the weights at the peak of the schedule."""
    limit = 1 / optimizer.learning_rate
    if optimizer.weight_decay >= limit:
        raise ConfigError(
            f"optimizer.weight_decay must be < {limit:g} (1/optimizer.learning_rate: each step removes "
            f"learning_rate * weight_decay of every weight), got {shown(optimizer.weight_decay)}; "
            f"the range is [0, {limit:g})"
        )


def _check_accumulation_and_early_stopping(config: Config) -> None:
    steps, batch = config.optimizer.gradient_accumulation_steps, config.data.batch_size
    if batch % steps:
        raise ConfigError(
            f"data.batch_size={batch} must be divisible by optimizer.gradient_accumulation_steps={steps} (each "
            f"update sums {steps} micro-batches of equal size); use a batch size that is a multiple of {steps}"
        )
    train = config.train
    if train.early_stopping_min_delta and not train.early_stopping_patience:
        raise ConfigError(
            "train.early_stopping_min_delta does nothing without train.early_stopping_patience (0 = no early "
            "stopping); set a patience, or leave the min_delta out"
        )


def _check_idle_settings(config: Config) -> None:
    """A setting of a feature that is off does nothing: refused, so a typo in the other key shows."""
    optimizer, idle = config.optimizer, OptimizerConfig()
    if optimizer.schedule != "plateau":
        for key in ("plateau_factor", "plateau_patience", "plateau_min_lr"):
            if getattr(optimizer, key) != getattr(idle, key):
                raise ConfigError(
                    f"optimizer.{key} is for optimizer.schedule=plateau, not {optimizer.schedule}; "
                    "set the schedule to plateau, or leave it out"
                )
    elif optimizer.plateau_min_lr >= optimizer.learning_rate:
        raise ConfigError(
            f"optimizer.plateau_min_lr={shown(optimizer.plateau_min_lr)} is not below optimizer.learning_rate="
            f"{shown(optimizer.learning_rate)}: the LR could never be cut; lower it"
        )
    if config.data.randaugment_magnitude != DataConfig().randaugment_magnitude and not config.data.randaugment_ops:
        raise ConfigError(
            "data.randaugment_magnitude does nothing with data.randaugment_ops=0 (RandAugment off); "
            "set randaugment_ops (e.g. 2), or leave the magnitude out"
        )


def _check_actions(actions: list[str]) -> None:
    """Each spelled as an import path; whether it imports is known when the run starts (reading
    a config runs no code), with the same message as a model.name that does not import."""
    for index, action in enumerate(actions):
        if not is_import_path(action):
            raise ConfigError(
                f"train.actions[{index}]={shown(action)} is not an import path; write it as package.module:factory "
                "(a function that returns the action)"
            )


def _check_fine_tuning(config: Config) -> None:
    """Backbone-only keys on our own nets, and fine-tuning settings that would do nothing."""
    model = config.model
    if model.name not in BACKBONE_NAMES:
        idle = ModelConfig()  # a backbone-only key at its default is not used
        used = [key for key in BACKBONE_ONLY_KEYS if getattr(model, key) != getattr(idle, key)]
        if used:
            raise ConfigError(
                f"model.{used[0]} is for Keras Applications backbones, not model.name={model.name}; "
                f"choose one of {', '.join(BACKBONE_NAMES)}, or leave it out"
            )
    if model.unfreeze_at_epoch and not model.freeze_backbone:
        raise ConfigError("model.unfreeze_at_epoch needs model.freeze_backbone=true (the backbone is never frozen)")
    if model.unfreeze_at_epoch >= config.train.epochs:
        raise ConfigError(
            f"model.unfreeze_at_epoch={model.unfreeze_at_epoch} is not before the last epoch "
            f"(train.epochs={config.train.epochs}): the backbone would never train; lower it, "
            "or use 0 to keep it frozen"
        )
    if model.backbone_lr_multiplier != 1.0 and config.optimizer.name != "sgd":
        raise ConfigError(
            f"model.backbone_lr_multiplier works with optimizer.name=sgd only, got {config.optimizer.name} (it "
            "multiplies the backbone's gradients, which Adam's normalisation cancels); set it to 1 or use sgd"
        )
