"""Optimizer and learning-rate schedule from `optimizer.*`.

Built inside `strategy.scope()` and built on the model's variables before the first
`strategy.run`: Keras 3 creates slots lazily otherwise, which fails under
MirroredStrategy ("You must feed a value for placeholder tensor").
"""

from __future__ import annotations

import keras

from trainer.config import OptimizerConfig

# Normalisation parameters and biases are not decayed (standard practice; decay there
# only shrinks scales that BatchNorm immediately undoes).
_NO_DECAY = ["bias", "gamma", "beta"]


def learning_rate_schedule(config: OptimizerConfig, steps_per_epoch: int, total_steps: int):
    """Peak `learning_rate` after `warmup_epochs` of linear warm-up, then constant or cosine to 0."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    if config.schedule == "constant" and not warmup:
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        # alpha=1 keeps the rate at its peak: a constant schedule with warm-up.
        alpha=1.0 if config.schedule == "constant" else 0.0,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def build_optimizer(
    config: OptimizerConfig,
    steps_per_epoch: int,
    total_steps: int,
    *,
    loss_scaling: bool = False,
    skip_nonfinite: bool = False,
) -> keras.optimizers.Optimizer:
    """The configured optimizer, wrapped in a LossScaleOptimizer where steps may be skipped.

    `loss_scaling` (mixed_float16): dynamic loss scaling. `skip_nonfinite`
    (train.nan_policy=skip_step): the same wrapper at scale 1 that never grows, used only
    for its tested, distribution-aware skipping of steps with non-finite gradients.
    """
    lr = learning_rate_schedule(config, steps_per_epoch, total_steps)
    decay = config.weight_decay or None
    if config.name == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=decay)
    elif config.name == "adam":
        optimizer = keras.optimizers.Adam(lr, weight_decay=decay)
    else:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    if decay or config.name == "adamw":
        optimizer.exclude_from_weight_decay(var_names=_NO_DECAY)
    if loss_scaling:
        # Dynamic loss scaling: float16 gradients would underflow without it.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    elif skip_nonfinite:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=1.0, dynamic_growth_steps=2**30)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))
