import json
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from tests.conftest import SMALL_FLOAT16_RUN, smoke_config
from trainer.checkpoints import checkpoint_steps
from trainer.errors import ConfigError
from trainer.models import build_model, model_summary
from trainer.training import train


def _scalars(folder, tag):
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def test_two_replicas_learn_synthetic_data(tmp_path):
    config = smoke_config("runtime.cpu_replicas=2", "train.epochs=3")
    result = train(config, tmp_path, echo=lambda _: None)
    assert result.step == 3 * (1024 // 64)
    losses = _scalars(tmp_path / "tensorboard" / "train", "loss")
    accuracy = _scalars(tmp_path / "tensorboard" / "train", "accuracy")
    assert losses[-1][1] < 0.6 * losses[0][1]
    assert accuracy[-1][1] > accuracy[0][1] + 0.3
    assert result.final_eval.accuracy > 0.8
    assert result.final_eval.examples == 256
    assert (tmp_path / "config.yaml").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == result.step and metrics["accuracy"] == pytest.approx(result.final_eval.accuracy)


def test_tensorboard_has_train_and_eval_scalars_by_global_step(tmp_path):
    train(smoke_config("train.epochs=1"), tmp_path, echo=lambda _: None)
    train_steps = [step for step, _ in _scalars(tmp_path / "tensorboard" / "train", "loss")]
    assert train_steps == [8, 16]  # steps_per_loop=8, 16 steps per epoch
    for tag in ("accuracy", "learning_rate", "images_per_second", "epoch"):
        assert len(_scalars(tmp_path / "tensorboard" / "train", tag)) == 2
    assert [step for step, _ in _scalars(tmp_path / "tensorboard" / "eval", "accuracy")] == [16]


def test_resume_continues_from_the_saved_step(tmp_path):
    lines: list[str] = []
    train(smoke_config("train.epochs=2", "train.max_steps=24"), tmp_path, echo=lines.append)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-16.index",
        "ckpt-24.index",
        "ckpt-8.index",
    ]
    lines.clear()
    result = train(smoke_config("train.epochs=2"), tmp_path, echo=lines.append)
    assert any("Resuming from" in line and "step 24" in line for line in lines)
    assert result.step == 32
    steps = [step for step, _ in _scalars(tmp_path / "tensorboard" / "train", "loss")]
    assert steps == [8, 16, 24, 32]  # the resumed run continues the curve, no restart at 0


# Cut by train.max_steps at 12 (between the lookahead's beats at 10 and 15, mid-epoch),
# then resumed to the end: the slow weights and the EMA must come back from the checkpoint,
# and the cut must not finalize the averaged weights early.
@pytest.mark.parametrize(
    "extra",
    [
        ("optimizer.lookahead_every_steps=5", "optimizer.lookahead_start_epochs=0.5"),
        ("optimizer.ema_momentum=0.9", "optimizer.learning_rate=0.01"),
    ],
    ids=["lookahead", "ema"],  # the plain run: test_fault_tolerance's exact-stop test
)
def test_a_run_cut_by_max_steps_and_extended_is_bit_identical(tmp_path, extra):
    from tests.test_fault_tolerance import _checkpoint_tensors

    overrides = ("runtime.deterministic=true", "train.epochs=2", *extra)
    straight = train(smoke_config(*overrides), tmp_path / "a", echo=lambda _: None)
    train(smoke_config(*overrides, "train.max_steps=12"), tmp_path / "b", echo=lambda _: None)
    resumed = train(smoke_config(*overrides), tmp_path / "b", echo=lambda _: None)
    assert resumed.step == straight.step == 32
    assert resumed.final_eval.loss == straight.final_eval.loss
    expected = _checkpoint_tensors(str(tmp_path / "a" / "checkpoints" / "ckpt-32"))
    actual = _checkpoint_tensors(str(tmp_path / "b" / "checkpoints" / "ckpt-32"))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_fresh_starts_over(tmp_path):
    train(smoke_config("train.max_steps=8"), tmp_path, echo=lambda _: None)
    lines: list[str] = []
    result = train(smoke_config("train.max_steps=8"), tmp_path, fresh=True, echo=lines.append)
    assert not any("Resuming" in line for line in lines)
    assert result.step == 8


def test_already_finished_run_says_so(tmp_path):
    train(smoke_config("train.max_steps=8"), tmp_path, echo=lambda _: None)
    lines: list[str] = []
    result = train(smoke_config("train.max_steps=8"), tmp_path, echo=lines.append)
    assert result.step == 8
    assert any("nothing to do" in line for line in lines)


def test_global_batch_must_divide_over_replicas(tmp_path):
    with pytest.raises(ConfigError, match="divisible by the 2 replicas"):
        train(smoke_config("runtime.cpu_replicas=2", "data.batch_size=63"), tmp_path, echo=lambda _: None)


@pytest.mark.parametrize("model", ["paper_cnn", "resnet_small", "airbench"])
def test_models_train_under_mixed_bfloat16(tmp_path, model, monkeypatch):
    import keras

    import trainer.training

    built = []
    original = trainer.training.build_for_dataset
    recorded = lambda *a, **k: built.append(original(*a, **k)) or built[-1]  # noqa: E731
    monkeypatch.setattr(trainer.training, "build_for_dataset", recorded)
    config = smoke_config(
        f"model.name={model}", "model.width=8", "runtime.precision=mixed_bfloat16", "train.max_steps=8"
    )
    result = train(config, tmp_path, echo=lambda _: None)
    assert np.isfinite(result.final_eval.loss)
    convolutions = [layer for layer in built[0].layers if isinstance(layer, keras.layers.Conv2D)]
    # The speed path: the convolutions compute in bfloat16, their variables stay float32...
    assert convolutions and all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert all(layer.output.dtype == "bfloat16" for layer in convolutions)
    assert all(v.dtype == "float32" for v in built[0].trainable_variables)
    assert built[0].get_layer("logits").compute_dtype == "float32"  # ...and the logits are float32


def test_mixed_float16_uses_loss_scaling(tmp_path):
    config = smoke_config("runtime.precision=mixed_float16", "train.max_steps=8", "model.width=8", *SMALL_FLOAT16_RUN)
    result = train(config, tmp_path, echo=lambda _: None)
    assert np.isfinite(result.final_eval.loss)
    assert _scalars(tmp_path / "tensorboard" / "train", "loss")[-1][1] < 10


# --- #28 item 2: early stopping, the model line ---------------------------------------------

# 4 steps per epoch, an evaluation at each epoch's end, 16 steps. A learning rate of 0 is
# refused (it must be > 0); at 1e-12 the weights move by ~1e-13, so every evaluation scores
# the same and none is a gain.
NO_PROGRESS = (
    "data.synthetic_train_size=256",
    "data.synthetic_test_size=64",
    "model.width=4",
    "train.epochs=4",
    "train.steps_per_loop=4",
    "checkpoint.every_steps=0",
    "optimizer.learning_rate=1e-12",
)
_EARLY_LINE = (
    r"Early stopping at step 8 of 16: no accuracy gain in the last evaluation "
    r"\(best (\d+\.\d\d)% at step 4\); checkpoint saved"
)


def test_early_stopping_ends_a_run_without_gains_saved_and_a_resume_has_nothing_to_do(tmp_path):
    lines: list[str] = []
    result = train(smoke_config(*NO_PROGRESS, "train.early_stopping_patience=1"), tmp_path, echo=lines.append)
    # The second evaluation (step 8) gained nothing over the first: the run ends there, as planned.
    assert (result.stopped_by, result.step, result.exit_code) == ("early_stopping", 8, 0)
    said = [line for line in lines if line.startswith("Early stopping")]
    assert len(said) == 1 and re.fullmatch(_EARLY_LINE, said[0]), lines
    assert f"{result.final_eval.accuracy:.2%}" == re.fullmatch(_EARLY_LINE, said[0])[1] + "%"
    assert checkpoint_steps(tmp_path / "checkpoints")[0] == 8
    assert not any(line.startswith(("Stopped by", "Epoch 3/4")) for line in lines)
    assert any(line.startswith("Done.") for line in lines)  # the closing table of a finished run
    lines = []
    again = train(smoke_config(*NO_PROGRESS, "train.early_stopping_patience=1"), tmp_path, echo=lines.append)
    assert (again.stopped_by, again.step, again.exit_code) == ("early_stopping", 8, 0)
    assert any(
        line.startswith("Already stopped early at step 8: no accuracy gain in the last evaluation (best ")
        and line.endswith(
            "; nothing to do (raise train.early_stopping_patience or set it to 0 to train on, or use --fresh)"
        )
        for line in lines
    ), lines
    assert checkpoint_steps(tmp_path / "checkpoints")[0] == 8
    # A larger patience trains on from the checkpoint's count (1): 2 at step 12, 3 at the end.
    lines = []
    more = train(smoke_config(*NO_PROGRESS, "train.early_stopping_patience=3"), tmp_path, echo=lines.append)
    assert (more.stopped_by, more.step) == (None, 16) and not any("Early stopping" in line for line in lines)


def test_without_a_patience_the_same_run_goes_to_the_end_and_names_its_model(tmp_path):
    lines: list[str] = []
    result = train(smoke_config(*NO_PROGRESS), tmp_path, echo=lines.append)
    assert (result.stopped_by, result.step, result.exit_code) == (None, 16, 0)
    assert not any("Early stopping" in line for line in lines)
    model = build_model("paper_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
    count = model.count_params()
    size = count * 4 / 1e6  # float32
    assert f"Model: paper_cnn, {count:,} parameters ({count:,} trainable), {size:.1f} MB float32" in lines


def test_the_model_line_counts_trainable_and_frozen_weights():
    model = build_model("resnet_small", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)  # BatchNorm's statistics
    assert frozen > 0
    total = trainable + frozen
    assert model_summary(model, "resnet_small") == (
        f"resnet_small, {total:,} parameters ({trainable:,} trainable), {total * 4 / 1e6:.1f} MB float32"
    )
