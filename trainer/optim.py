"""Optimizer and learning-rate schedule from `optimizer.*`.

Built inside `strategy.scope()` and built on the model's variables before the first
`strategy.run`: Keras 3 creates slots lazily otherwise, which fails under
MirroredStrategy ("You must feed a value for placeholder tensor").
"""

from __future__ import annotations

import contextlib

import keras

from trainer.config import OptimizerConfig

# Normalisation parameters and biases are not decayed (standard practice; decay there
# only shrinks scales that BatchNorm immediately undoes).
_NO_DECAY = ["bias", "gamma", "beta"]


class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from 0 to `peak` over `warmup_steps`, then linear down to 0 at `total_steps`.

    airbench's triangle; Keras' PolynomialDecay has no warm-up, hence this small class.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        down = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        up = (step + 1) / self.warmup_steps if self.warmup_steps else down
        return self.peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def learning_rate_schedule(config: OptimizerConfig, steps_per_epoch: int, total_steps: int):
    """Peak `learning_rate` after `warmup_epochs` of linear warm-up, then constant, cosine or linear to 0."""
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    if config.schedule == "linear":
        return WarmupLinearDecay(config.learning_rate, warmup, total_steps)
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
    # Keras' own weight averaging; its `ema_overwrite_frequency` (lookahead) is not used:
    # it fails under tf.distribute (a cond around the cross-replica update).
    averaging = {"use_ema": config.ema_momentum > 0, "ema_momentum": config.ema_momentum or 0.99}
    if config.name == "sgd":
        optimizer = keras.optimizers.SGD(
            lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=decay, **averaging
        )
    elif config.name == "adam":
        optimizer = keras.optimizers.Adam(lr, weight_decay=decay, **averaging)
    else:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay, **averaging)
    if decay or config.name == "adamw":
        optimizer.exclude_from_weight_decay(var_names=_NO_DECAY)
    if loss_scaling:
        # Dynamic loss scaling: float16 gradients would underflow without it.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    elif skip_nonfinite:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=1.0, dynamic_growth_steps=2**30)
    return optimizer


def _unwrapped(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The configured optimizer inside a LossScaleOptimizer, or the optimizer itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def uses_weight_averaging(optimizer: keras.optimizers.Optimizer) -> bool:
    return bool(getattr(_unwrapped(optimizer), "use_ema", False))


@contextlib.contextmanager
def averaged_weights(model: keras.Model, optimizer: keras.optimizers.Optimizer):
    """Within the block the model holds the optimizer's averaged weights, after it the live ones.

    Uses Keras' `finalize_variable_values` (distribution-aware); a no-op without averaging.
    """
    if not uses_weight_averaging(optimizer):
        yield
        return
    live = [variable.numpy() for variable in model.trainable_variables]
    finalize_averaged_weights(model, optimizer)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, live):
            variable.assign(value)


def finalize_averaged_weights(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Copy the averaged weights into the model for good (the end of training)."""
    if uses_weight_averaging(optimizer):
        _unwrapped(optimizer).finalize_variable_values(model.trainable_variables)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(_unwrapped(optimizer).learning_rate))
