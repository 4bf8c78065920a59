"""What a training step reports: the sums the compiled call carries over a logging window.

Its own module, below both the loop that adds them up (trainer.loop.step) and the
monitor that logs their means (trainer.monitoring), so neither has to import the other.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class StepSums(NamedTuple):
    """Sums over the steps of a logging window, as the compiled call carries them.

    Inside the graph they travel as one float32 vector in this field order (one
    all-reduce instead of six); `StepSums.of(vector)` names them again on the host.
    """

    loss: float  # sum of per-example losses
    correct: float  # correctly classified examples
    examples: float
    nonfinite: float  # steps with a NaN/Inf loss or gradient
    gradient_norm: float  # sum over steps of the global gradient's norm
    steps: float

    @classmethod
    def of(cls, vector) -> StepSums:
        return cls(*(float(value) for value in np.asarray(vector)))

    @staticmethod
    def zeros() -> np.ndarray:
        return np.zeros(len(StepSums._fields), np.float32)


NUM_SUMS = len(StepSums._fields)
