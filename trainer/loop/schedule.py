"""When things happen in a run: pure arithmetic on global steps, no TensorFlow.

Everything the controller does between compiled calls (log, evaluate, keep the best,
save, write histograms, start or stop the profiler) is decided here from the global step
alone, so a run that was interrupted and resumed does it at exactly the same steps as one
that was not. The one decision that depends on a clock, `checkpoint.every_minutes`, is
made on the chief (`SaveClock`) and agreed by every worker inside the compiled call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Due:
    """What is due after a compiled call that ended at a step."""

    log: bool = False  # training scalars of the logging window
    epoch_end: bool = False  # an epoch ended (or the last step): progress bar, checkpoint
    evaluate: bool = False  # test-set evaluation (and keep-best)
    final: bool = False  # the last step of this run: final evaluation with TTA
    finalize: bool = False  # the schedule's last step: averaged weights replace the live ones
    save: bool = False  # a checkpoint by step count or epoch end (time is agreed separately)
    histograms: bool = False


@dataclass(frozen=True)
class Schedule:
    """The step arithmetic of one run.

    Args:
        per_epoch: steps per epoch.
        total_steps: where the run ends (epochs x per_epoch, or train.max_steps).
        steps_per_loop: steps per compiled call.
        log_every: training scalars every N steps (a multiple of steps_per_loop).
        eval_every_epochs: evaluate every N epochs, and at the end.
        save_every: checkpoint every N steps as well as at epoch ends (0 = epoch ends).
        histogram_every: histograms every N steps (0 = off).
        profile: (START, END) steps to trace, or None.
        schedule_steps: the last step of the whole schedule (train.epochs), which a run cut
            by train.max_steps does not reach; 0 = total_steps.
    """

    per_epoch: int
    total_steps: int
    steps_per_loop: int
    log_every: int
    eval_every_epochs: int = 1
    save_every: int = 0
    histogram_every: int = 0
    profile: tuple[int, int] | None = None
    schedule_steps: int = 0

    @property
    def epochs(self) -> int:
        """Epochs this run reaches (a run cut by max_steps may end inside one)."""
        return -(-self.total_steps // self.per_epoch)

    def epoch_of(self, step: int) -> int:
        """0-based epoch that the step after `step` belongs to."""
        return step // self.per_epoch

    def steps_in_epoch(self, epoch: int) -> int:
        return min(self.per_epoch, self.total_steps - epoch * self.per_epoch)

    def call_end(self, step: int) -> int:
        """Where the compiled call starting at `step` ends; the same whatever the restarts."""
        stops = [
            self.total_steps,
            (step // self.per_epoch + 1) * self.per_epoch,
            (step // self.steps_per_loop + 1) * self.steps_per_loop,
        ]
        if self.save_every:
            stops.append((step // self.save_every + 1) * self.save_every)
        if self.profile:
            stops += [boundary for boundary in self.profile if boundary > step]
        return min(stops)

    def due(self, previous: int, step: int) -> Due:
        """What is due after a call that went from `previous` to `step` (a call end)."""
        final = step == self.total_steps
        epoch_end = step % self.per_epoch == 0 or final
        evaluate = epoch_end and (final or (step // self.per_epoch) % self.eval_every_epochs == 0)
        every = self.histogram_every
        return Due(
            log=step % self.log_every == 0 or epoch_end,
            epoch_end=epoch_end,
            evaluate=evaluate,
            final=final,
            finalize=step == (self.schedule_steps or self.total_steps),
            save=epoch_end or bool(self.save_every and step % self.save_every == 0),
            histograms=bool(every and step // every > previous // every),
        )

    def planned_evaluation(self, step: int) -> bool:
        """Whether an evaluation at `step` is one of the schedule's own, before its last step:
        not the one a train.max_steps cut adds, so a cut run and its extension count the
        same evaluations as a straight run (and none at the end, where a cut changes nothing)."""
        epoch, within = divmod(step, self.per_epoch)
        return within == 0 and epoch % self.eval_every_epochs == 0 and step < (self.schedule_steps or self.total_steps)

    def profiling(self, step: int) -> bool:
        """Whether the profiler traces the steps from `step` on: [START, END)."""
        return bool(self.profile and self.profile[0] <= step < self.profile[1])


class SaveClock:
    """`checkpoint.every_minutes` on the chief's clock.

    Only the chief asks its clock. Its vote is a variable that turns True when the time
    is up, also in the middle of a compiled call (a timer thread sets it); every worker
    takes part in agreeing on it at the end of each call, so they all save at the same
    step, the end of the call during which the time ran out.
    """

    def __init__(self, minutes: float, is_chief: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.is_chief, self.clock = minutes * 60.0, is_chief, clock
        self.last = clock()

    def wants_save(self) -> bool:
        """This worker's vote for saving, now."""
        return self.seconds_left() == 0.0

    def seconds_left(self) -> float | None:
        """Seconds until the chief's vote turns to "save"; None on other workers or when off."""
        if not self.seconds or not self.is_chief:
            return None
        return max(0.0, self.seconds - (self.clock() - self.last))

    def saved(self) -> None:
        self.last = self.clock()
