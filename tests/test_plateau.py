"""optimizer.schedule=plateau: Keras' ReduceLROnPlateau rule on the test accuracy, with the
cut rate and its count in the checkpoint, so a resumed run trains on at the cut rate."""

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import smoke_config
from tests.test_fault_tolerance import _assert_same_run
from tests.test_training import NO_PROGRESS, _scalars
from trainer.config import OptimizerConfig
from trainer.evaluation import EvalMetrics
from trainer.loop.actions import RATE_PLATEAU, LoopState, RatePlateau
from trainer.loop.plateau import ReduceLearningRate
from trainer.loop.schedule import Schedule
from trainer.optim import PlateauSchedule, build_optimizer, current_learning_rate, plateau_schedule
from trainer.training import train


def _evaluated(state: LoopState, step: int, accuracy: float, schedule: Schedule) -> None:
    state.due = schedule.due(step - schedule.per_epoch, step)
    state.last_eval = EvalMetrics(accuracy, 1.0, {}, [], 10, step)


def test_the_rate_is_cut_after_patience_evaluations_without_a_gain_never_below_min_lr():
    config = OptimizerConfig(schedule="plateau", learning_rate=0.1, plateau_factor=0.5, plateau_patience=2)
    config.plateau_min_lr = 0.02
    optimizer = build_optimizer(config, steps_per_epoch=10, total_steps=200)
    rate = plateau_schedule(optimizer)
    schedule = Schedule(per_epoch=10, total_steps=200, steps_per_loop=10, log_every=10)
    store = SimpleNamespace(extra={RATE_PLATEAU: tf.Variable(RatePlateau().values())})
    said: list[str] = []
    action = ReduceLearningRate(config, schedule, rate, store, said.append)
    state = LoopState(step=0, window_sums=np.zeros(6))
    # A gain, 2 without (cut), a gain, 1 without, an equal one (no gain: cut), then 4 without.
    accuracies = [0.5, 0.4, 0.5, 0.6, 0.55, 0.6, 0.1, 0.1, 0.1, 0.1]
    scales = []
    for epoch, accuracy in enumerate(accuracies, start=1):
        _evaluated(state, epoch * 10, accuracy, schedule)
        action(epoch * 10, state)
        scales.append(state.rate_plateau.scale)
    # 0.1 * 0.25 = 0.025, then 0.0125 would go below min_lr: 0.02 (scale 0.2), then no more cuts.
    assert scales == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.2)]
    assert float(rate.scale.numpy()) == pytest.approx(0.2)
    assert current_learning_rate(optimizer) == pytest.approx(0.02)
    assert len(said) == 3 and said[0].startswith("Step 30: no accuracy gain in 2 evaluation(s) (best 50.00% at step")
    assert said[0].endswith("learning rate cut to 0.05 (optimizer.schedule=plateau)")
    # The evaluation a train.max_steps cut adds (mid-epoch) and the last one do not count.
    state.rate_plateau = RatePlateau()
    state.due, state.last_eval = schedule.due(200, 205), EvalMetrics(0.1, 1.0, {}, [], 10, 205)
    action(205, state)
    assert state.rate_plateau == RatePlateau()


def test_the_plateau_schedule_warms_up_to_the_peak_and_follows_its_scale():
    schedule = PlateauSchedule(peak=0.1, warmup_steps=4, total_steps=100, start=0.0)
    assert [round(float(schedule(step)), 6) for step in (0, 1, 3, 50)] == [0.025, 0.05, 0.1, 0.1]
    schedule.scale.assign(0.1)
    assert float(schedule(50)) == pytest.approx(0.01)


def test_a_cut_rate_survives_a_stop_and_resume_bit_for_bit(tmp_path, monkeypatch):
    """No run gains after its first evaluation (NO_PROGRESS): with patience 1 the rate is
    cut at steps 8 and 12 (evaluations at 4, 8, 12; not at the last step, 16). A stop at
    step 9 (after the first cut, inside a call) resumes at the cut rate and cuts again at
    12, as a straight run does: the logged rate, the checkpoints and every scalar alike."""
    config = smoke_config(
        *NO_PROGRESS,
        "runtime.deterministic=true",
        "optimizer.schedule=plateau",
        "optimizer.plateau_patience=1",
        "optimizer.plateau_factor=0.5",
    )
    lines: list[str] = []
    assert train(config, tmp_path / "straight", echo=lines.append).step == 16
    cuts = [line for line in lines if "learning rate cut to" in line]
    assert [line.split(":")[0] for line in cuts] == ["Step 8", "Step 12"], lines
    # Logged before each step's actions: the rate trained with in the steps up to it.
    rates = dict(_scalars(tmp_path / "straight" / "tensorboard" / "train", "learning_rate"))
    assert rates == {
        4: pytest.approx(1e-12),
        8: pytest.approx(1e-12),
        12: pytest.approx(5e-13),
        16: pytest.approx(2.5e-13),
    }
    monkeypatch.setenv("TRAINER_STOP_AT_STEP", "9")
    assert train(config, tmp_path / "interrupted", echo=lambda _: None).step == 9
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    resumed: list[str] = []
    assert train(config, tmp_path / "interrupted", echo=resumed.append).step == 16
    assert [line.split(":")[0] for line in resumed if "learning rate cut to" in line] == ["Step 12"]
    _assert_same_run(tmp_path / "straight", tmp_path / "interrupted", step=16)
