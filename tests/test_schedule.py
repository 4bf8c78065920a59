"""trainer.loop.schedule: what is due at which global step, without TensorFlow or a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from trainer.loop.schedule import Due, SaveClock, Schedule

# 10 steps per epoch, 25 in all (the last epoch cut short), 4 steps per compiled call.
BASE = Schedule(per_epoch=10, total_steps=25, steps_per_loop=4, log_every=4)


def test_the_module_needs_no_tensorflow():
    script = "import sys, trainer.loop.schedule; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_calls_end_at_windows_epoch_ends_and_the_last_step():
    ends, step = [], 0
    while step < BASE.total_steps:
        step = BASE.call_end(step)
        ends.append(step)
    assert ends == [4, 8, 10, 12, 16, 20, 24, 25]


def test_a_resumed_run_ends_its_calls_where_an_uninterrupted_one_does():
    assert BASE.call_end(5) == 8 and BASE.call_end(9) == 10 and BASE.call_end(21) == 24


def test_step_saves_and_profile_boundaries_end_calls_too():
    schedule = Schedule(per_epoch=10, total_steps=25, steps_per_loop=4, log_every=4, save_every=3, profile=(5, 7))
    assert [schedule.call_end(s) for s in (0, 3, 4, 5, 6, 7)] == [3, 4, 5, 6, 7, 8]
    assert [schedule.profiling(s) for s in (4, 5, 6, 7)] == [False, True, True, False]


def test_what_is_due_at_a_window_end_an_epoch_end_and_the_last_step():
    assert BASE.due(0, 4) == Due(log=True)
    assert BASE.due(8, 10) == Due(log=True, epoch_end=True, evaluate=True, save=True)
    assert BASE.due(24, 25) == Due(log=True, epoch_end=True, evaluate=True, final=True, finalize=True, save=True)


def test_a_run_cut_by_max_steps_ends_without_finalizing_the_averaged_weights():
    cut = Schedule(per_epoch=10, total_steps=12, steps_per_loop=4, log_every=4, schedule_steps=30)
    assert cut.due(10, 12).final and not cut.due(10, 12).finalize
    full = Schedule(per_epoch=10, total_steps=30, steps_per_loop=4, log_every=4, schedule_steps=30)
    assert full.due(28, 30).finalize


def test_logging_every_n_steps_and_evaluating_every_n_epochs():
    schedule = Schedule(per_epoch=10, total_steps=30, steps_per_loop=4, log_every=8, eval_every_epochs=2)
    assert not schedule.due(0, 4).log and schedule.due(4, 8).log
    assert schedule.due(8, 10).log  # epoch ends always close a window
    assert not schedule.due(8, 10).evaluate and schedule.due(16, 20).evaluate
    assert schedule.due(28, 30).evaluate  # the last step always evaluates


def test_step_based_saves_and_histograms():
    schedule = Schedule(per_epoch=10, total_steps=30, steps_per_loop=3, log_every=3, save_every=6, histogram_every=5)
    assert schedule.due(3, 6).save and not schedule.due(6, 9).save
    assert schedule.due(3, 6).histograms and not schedule.due(6, 9).histograms  # crossed 5, not 10
    assert schedule.due(9, 10).histograms


def test_epochs_and_their_lengths():
    assert BASE.epochs == 3 and [BASE.steps_in_epoch(e) for e in range(3)] == [10, 10, 5]
    assert BASE.epoch_of(9) == 0 and BASE.epoch_of(10) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_chief_votes_for_a_timed_save_once_its_minutes_passed():
    clock = FakeClock()
    chief = SaveClock(minutes=2, is_chief=True, clock=clock)
    other = SaveClock(minutes=2, is_chief=False, clock=clock)
    clock.now += 119
    assert not chief.wants_save()
    clock.now += 1
    assert chief.wants_save()
    assert not other.wants_save()  # only the chief's clock decides; the call makes everyone agree
    chief.saved()
    assert not chief.wants_save()


@pytest.mark.parametrize("minutes", [0, 0.0])
def test_no_timed_saves_when_off(minutes):
    clock = FakeClock()
    chief = SaveClock(minutes=minutes, is_chief=True, clock=clock)
    clock.now += 10**6
    assert not chief.wants_save()
