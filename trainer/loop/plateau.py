"""optimizer.schedule=plateau: the learning rate cut after evaluations without a gain.

Keras' ReduceLROnPlateau rule on the test accuracy: after `plateau_patience` evaluations
in a row without a rise over the best so far, the rate is multiplied by `plateau_factor`,
never below `plateau_min_lr`, and the count starts again. The rule reads the same
evaluation every worker computed, so every worker cuts at the same step. Its count and
the scale it cut to (trainer.loop.actions.RatePlateau) go into every checkpoint, after it
ran: a resumed run puts the scale back into the optimizer's PlateauSchedule before its
first step and counts on, so it trains as a straight run does.
"""

from __future__ import annotations

import numpy as np

from trainer.checkpoints import CheckpointStore
from trainer.config import OptimizerConfig
from trainer.loop.actions import RATE_PLATEAU, LoopState, RatePlateau, single_view_accuracy
from trainer.loop.schedule import Schedule
from trainer.optim import PlateauSchedule, plateau_schedule
from trainer.say import Say


class ReduceLearningRate:
    """The action (trainer.loop.actions' protocol), after each evaluation, before the save."""

    def __init__(
        self, config: OptimizerConfig, schedule: Schedule, rate: PlateauSchedule, store: CheckpointStore, say: Say
    ) -> None:
        self.factor, self.patience, self.min_lr = config.plateau_factor, config.plateau_patience, config.plateau_min_lr
        self.schedule, self.rate, self.say = schedule, rate, say
        # The checkpoint's scale (1.0 for a new run), back in the optimizer before the first step.
        rate.scale.assign(RatePlateau.of(store.extra[RATE_PLATEAU].numpy()).scale)

    def __call__(self, step: int, state: LoopState) -> None:
        if not state.due.evaluate or state.last_eval is None or not self.schedule.planned_evaluation(step):
            return
        plateau = state.rate_plateau.plateau.after(single_view_accuracy(state), step)
        scale = state.rate_plateau.scale
        if plateau.without_gain >= self.patience:
            plateau.without_gain = 0
            scale = self.cut(step, scale, plateau)
        state.rate_plateau = RatePlateau(plateau, scale)

    def cut(self, step: int, scale: float, plateau) -> float:
        """The scale after a plateau at `step`: times the factor, the rate not below min_lr
        (as Keras: no cut once the rate is there). Kept as the float32 the optimizer reads."""
        peak = self.rate.peak
        if peak * scale <= self.min_lr * (1 + 1e-6):  # at the floor, but for the float32 rounding of the scale
            return scale
        new = float(np.float32(max(scale * self.factor, self.min_lr / peak)))
        self.rate.scale.assign(new)
        self.say(
            f"Step {step}: no accuracy gain in {self.patience} evaluation(s) (best {plateau.best_accuracy:.2%} at "
            f"step {plateau.best_step}); learning rate cut to {peak * new:.4g} (optimizer.schedule=plateau)"
        )
        return new


def reduce_on_plateau(config: OptimizerConfig, schedule: Schedule, optimizer, store: CheckpointStore, say: Say) -> list:
    """The plateau schedule's action, as a list for trainer.loop.build's (empty: another schedule)."""
    rate = plateau_schedule(optimizer)
    return [] if rate is None else [ReduceLearningRate(config, schedule, rate, store, say)]
