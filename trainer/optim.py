"""Optimizer and learning-rate schedule from `optimizer.*`.

Built inside `strategy.scope()` and built on the model's variables before the first
`strategy.run`: Keras 3 creates slots lazily otherwise, which fails under
MirroredStrategy ("You must feed a value for placeholder tensor").
"""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf

from trainer.config import OptimizerConfig

# Normalisation parameters and biases are not decayed (standard practice; decay there
# only shrinks scales that BatchNorm immediately undoes).
_NO_DECAY = ["bias", "gamma", "beta"]


class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from `start * peak` to `peak` over `warmup_steps`, then linear to `end * peak` at `total_steps`.

    airbench's triangle; Keras' PolynomialDecay has no warm-up, hence this small class.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, start: float = 0.0, end: float = 0.0):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.start, self.end = start, end

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        falling = keras.ops.clip((self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        down = self.end + (1.0 - self.end) * falling
        if not self.warmup_steps:
            return self.peak * down
        rising = keras.ops.clip((step + 1) / self.warmup_steps, 0.0, 1.0)
        up = self.start + (1.0 - self.start) * rising
        return self.peak * keras.ops.minimum(up, down)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "start": self.start,
            "end": self.end,
        }


class PlateauSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """optimizer.schedule=plateau: the warm-up to the peak, then the peak, times `scale`.

    `scale` (a variable read at every step) starts at 1; trainer.loop.plateau multiplies it
    by optimizer.plateau_factor after evaluations without a gain, Keras' ReduceLROnPlateau
    rule. It is not in the optimizer's checkpoint: the loop checkpoints it with its count
    and sets it back on resume, so a resumed run trains at the rate it was cut to.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, start: float = 0.0):
        self.warmup = WarmupLinearDecay(peak, warmup_steps, total_steps, start=start, end=1.0)
        self.peak = peak
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="plateau_scale")

    def __call__(self, step):
        return self.warmup(step) * keras.ops.cast(self.scale, "float32")

    def get_config(self):
        return self.warmup.get_config()


def learning_rate_schedule(config: OptimizerConfig, steps_per_epoch: int, total_steps: int):
    """Peak `learning_rate` after `warmup_epochs` of linear warm-up, then constant, cosine,
    linear, or constant cut on plateaus.

    Warm-up starts at `initial_lr_fraction` of the peak; cosine and linear end at `final_lr_fraction`.
    """
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    start, end = config.initial_lr_fraction, config.final_lr_fraction
    if config.schedule == "linear":
        return WarmupLinearDecay(config.learning_rate, warmup, total_steps, start=start, end=end)
    if config.schedule == "plateau":
        return PlateauSchedule(config.learning_rate, warmup, total_steps, start=start)
    if config.schedule == "constant" and not warmup:
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=start * config.learning_rate if warmup else config.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        # alpha=1 keeps the rate at its peak: a constant schedule with warm-up.
        alpha=1.0 if config.schedule == "constant" else end,
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


def gradient_multipliers(
    variables, config: OptimizerConfig, scaled_ids: frozenset[int] = frozenset(), scale: float = 1.0
) -> list[float] | None:
    """Per-variable gradient multipliers: per-variable learning rates under SGD.

    Keras optimizers have one learning rate; with (Nesterov) momentum SGD multiplying a
    gradient by k is exactly a k-times learning rate for that variable. BatchNorm shifts get
    `bias_lr_multiplier`; the variables whose id is in `scaled_ids` (a fine-tuned backbone)
    also get `scale`. None: all 1.
    """
    if config.bias_lr_multiplier == 1.0 and (scale == 1.0 or not scaled_ids):
        return None
    return [
        (config.bias_lr_multiplier if _is_batchnorm_shift(v) else 1.0) * (scale if id(v) in scaled_ids else 1.0)
        for v in variables
    ]


def _is_batchnorm_shift(variable) -> bool:
    return variable.path.split("/")[-1] == "beta"


def unwrapped(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The configured optimizer inside a LossScaleOptimizer, or the optimizer itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def uses_weight_averaging(optimizer: keras.optimizers.Optimizer) -> bool:
    return bool(getattr(unwrapped(optimizer), "use_ema", False))


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
        unwrapped(optimizer).finalize_variable_values(model.trainable_variables)


class Lookahead:
    """airbench's lookahead (from hlb-cifar10): averaging that also pulls the live weights back.

    Every `every` steps from `start_step` on, a slow copy of the model's float variables
    (weights and BatchNorm statistics) moves toward the live ones by 1 - rho and the live
    ones are reset to it; at each epoch's end (and the last step) the live ones are reset to
    it too, so evaluations and checkpoints see the averaged model. rho = decay**every *
    (step / total_steps)**3 grows over training. Keras' own `ema_overwrite_frequency` does
    the same kind of thing but fails under tf.distribute (a merge_call inside a cond); this
    runs in cross-replica context, between steps. Create inside `strategy.scope()`; the
    slow copies belong in the checkpoint (`state`) for an exact resume.
    """

    def __init__(
        self, model: keras.Model, *, every: int, start_step: int, per_epoch: int, total_steps: int, decay: float
    ) -> None:
        self.every, self.per_epoch, self.total_steps = every, per_epoch, total_steps
        self.rho_base = decay**every
        # The first beat at or after start_step only takes the copy.
        self.first_step = max(math.ceil(start_step / every), 1) * every
        self.fast = [v for v in model.variables if "float" in str(v.dtype)]
        self.slow = [tf.Variable(v.value, trainable=False, name=f"lookahead_{i}") for i, v in enumerate(self.fast)]

    @property
    def state(self) -> dict[str, tf.Variable]:
        return {str(i): v for i, v in enumerate(self.slow)}

    def after_step(self, step) -> None:
        """Call in cross-replica context with the number of steps done (optimizer.iterations)."""
        step = tf.cast(step, tf.int64)
        beat = (step > self.first_step) & (step % self.every == 0)
        epoch_end = (step > self.first_step) & ((step % self.per_epoch == 0) | (step >= self.total_steps))
        tf.cond(
            tf.equal(step, self.first_step),
            self._take_copy,
            lambda: tf.cond(beat, lambda: self._average(step), lambda: tf.cond(epoch_end, self._reset, tf.no_op)),
        )

    def _take_copy(self):
        return _assign_all(self.slow, self.fast)

    def _average(self, step):
        rho = self.rho_base * (tf.cast(step, tf.float32) / self.total_steps) ** 3
        updates = []
        for slow, fast in zip(self.slow, self.fast):
            averaged = rho * slow.read_value() + (1.0 - rho) * fast.value
            updates += [slow.assign(averaged), fast.assign(averaged)]
        return tf.group(updates)

    def _reset(self):
        return _assign_all(self.fast, self.slow)


def _assign_all(targets, sources):
    """Each target variable takes its source's current value (cross-replica: on every replica)."""
    return tf.group([target.assign(tf.convert_to_tensor(source)) for target, source in zip(targets, sources)])


def build_lookahead(model: keras.Model, config: OptimizerConfig, per_epoch: int, total_steps: int) -> Lookahead | None:
    """The configured lookahead, or None; call inside `strategy.scope()`."""
    if not config.lookahead_every_steps:
        return None
    return Lookahead(
        model,
        every=config.lookahead_every_steps,
        start_step=int(round(config.lookahead_start_epochs * per_epoch)),
        per_epoch=per_epoch,
        total_steps=total_steps,
        decay=config.lookahead_decay,
    )


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(unwrapped(optimizer).learning_rate))


def plateau_schedule(optimizer: keras.optimizers.Optimizer) -> PlateauSchedule | None:
    """The optimizer's PlateauSchedule (optimizer.schedule=plateau), or None.

    Keras keeps a schedule in `_learning_rate` (its `learning_rate` is the current value)."""
    schedule = getattr(unwrapped(optimizer), "_learning_rate", None)
    return schedule if isinstance(schedule, PlateauSchedule) else None
