"""The compiled call for each training phase: fine-tuning trains the head alone, then the backbone too.

Each phase has its own compiled call (trainer.loop.step): its trainable variables and
BatchNorm mode are fixed when it is traced, so the unfreeze cannot happen inside one.
The controller asks for the call of a step (`loop_for(step)`); the phase comes from the
step alone (trainer.backbones.FreezePlan), so a resumed run picks up where it left off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from trainer.backbones import FreezePlan, set_backbone_frozen
from trainer.loop.step import StepOptions, Votes, make_train_loop
from trainer.say import Say


@dataclass
class PhasedLoops:
    """`loop_for(step)`: the compiled call for the training phase of `step`, built when first needed.

    Steps only grow, so the phases come in order and trainability is set once per phase,
    not at every call.

    Args:
        options: the phase's StepOptions, made once its trainability is set (the gradient
            multipliers are one per trainable variable).
        say: told when the backbone starts training.
    """

    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    votes: Votes
    freeze: FreezePlan
    options: Callable[[], StepOptions]
    say: Say
    _loops: dict[bool, Callable] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, step: int) -> Callable:
        frozen = self.freeze.frozen_at(step)
        if frozen not in self._loops:
            set_backbone_frozen(self.model, frozen, keep_batchnorm_frozen=self.freeze.ever_frozen)
            if self._loops:
                self.say(f"Step {step}: the backbone is unfrozen and trains from here on")
            self._loops[frozen] = make_train_loop(self.strategy, self.model, self.optimizer, self.votes, self.options())
        return self._loops[frozen]
