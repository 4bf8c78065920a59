"""The fast CIFAR-10 recipe's pieces: whitening init, schedule, weight averaging, flips, TTA."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import REPO, smoke_config, tiny_loop
from trainer.config import OptimizerConfig, load_config
from trainer.data.pipeline import InputSpec, augment_batch
from trainer.errors import ConfigError
from trainer.evaluation import tta_logits
from trainer.models import build_model, init_from_data, patch_whitening_kernel
from trainer.monitoring import NUM_SUMS
from trainer.optim import averaged_weights, finalize_averaged_weights, learning_rate_schedule
from trainer.runtime import cached_strategy

SMOKE = str(REPO / "configs" / "smoke.yaml")
N = 24
RNG = np.random.default_rng(0)
# Correlated channels and neighbouring pixels, like photos: a smooth field plus noise.
_FIELD = RNG.normal(size=(N, 9, 9, 1)).repeat(4, axis=1).repeat(4, axis=2)[:, :32, :32]
IMAGES = np.clip(128 + 40 * _FIELD + RNG.normal(scale=8, size=(N, 32, 32, 3)), 0, 255).astype(np.uint8)


def test_whitening_kernel_decorrelates_two_by_two_patches():
    mean, std = [120.0] * 3, [50.0] * 3
    kernel = patch_whitening_kernel(IMAGES, mean, std, eps=1e-8)
    assert kernel.shape == (2, 2, 3, 24)
    x = (IMAGES.astype(np.float32) - 120.0) / 50.0
    out = tf.nn.conv2d(x, kernel[..., :12], strides=1, padding="VALID").numpy().reshape(-1, 12)
    covariance = np.cov(out, rowvar=False)
    np.testing.assert_allclose(covariance, np.eye(12), atol=2e-2)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])  # both signs


def test_airbench_whitening_is_set_from_data_and_stays_frozen(tmp_path):
    model = build_model("airbench", input_shape=(32, 32, 3), num_classes=10, mean=[120] * 3, std=[50] * 3, width=8)
    assert init_from_data(model, IMAGES, [120] * 3, [50] * 3)
    whiten = model.get_layer("whiten")
    np.testing.assert_allclose(whiten.kernel.numpy(), patch_whitening_kernel(IMAGES, [120] * 3, [50] * 3))
    assert not whiten.trainable
    assert all(variable.path != whiten.kernel.path for variable in model.trainable_variables)
    paper = build_model("paper_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
    assert not init_from_data(paper, IMAGES, [0] * 3, [1] * 3)


def test_linear_schedule_warms_up_then_falls_to_zero():
    config = OptimizerConfig(learning_rate=0.4, schedule="linear", warmup_epochs=1)
    schedule = learning_rate_schedule(config, steps_per_epoch=10, total_steps=50)
    values = [float(schedule(step)) for step in (0, 4, 9, 10, 30, 50)]
    np.testing.assert_allclose(values, [0.04, 0.2, 0.4, 0.4, 0.2, 0.0], atol=1e-6)


def _flipped(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Which outputs are mirrors of their input (crop_padding=0: only flips change them)."""
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(out == images, axis=(1, 2, 3)))
    return mirrored


def test_alternating_flips_mirror_every_image_in_every_other_epoch():
    spec = InputSpec(global_batch=N, seed=4, augment=True, crop_padding=0, flip="alternating")
    indices = tf.range(N, dtype=tf.int64)
    epochs = [augment_batch(IMAGES, indices, tf.constant(e, tf.int64), spec, N).numpy() for e in range(4)]
    flips = [_flipped(out, IMAGES) for out in epochs]
    assert 0 < flips[0].sum() < N  # random in the first epoch
    for previous, current in zip(flips, flips[1:]):
        np.testing.assert_array_equal(current, ~previous)


def test_reflect_padding_crops_from_a_mirrored_border():
    spec = InputSpec(global_batch=N, seed=1, augment=True, crop_padding=2, pad_mode="reflect")
    out = augment_batch(IMAGES, tf.range(N, dtype=tf.int64), tf.constant(0, tf.int64), spec, N).numpy()
    padded = np.pad(IMAGES, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    shifted = 0
    for i in range(N):
        windows = [padded[i, y : y + 32, x : x + 32] for y in range(5) for x in range(5)]
        matches = [k for k, w in enumerate(windows) if np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1])]
        assert matches, i
        shifted += 12 not in matches  # window 12 is the uncropped image
    assert shifted > N // 2


def test_tta_averages_mirrored_and_shifted_views():
    model = build_model("paper_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
    x = tf.constant(IMAGES[:4], tf.float32)

    def logits(images):
        return model(tf.constant(images, tf.float32), training=False).numpy()

    def pair(images):
        return 0.5 * (logits(images) + logits(images[:, :, ::-1]))

    np.testing.assert_allclose(tta_logits(model, x, "none").numpy(), logits(x.numpy()), atol=1e-5)
    np.testing.assert_allclose(tta_logits(model, x, "flip").numpy(), pair(x.numpy()), atol=1e-5)
    padded = np.pad(x.numpy(), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    expected = 0.5 * pair(x.numpy()) + 0.25 * pair(padded[:, :32, :32]) + 0.25 * pair(padded[:, 2:, 2:])
    np.testing.assert_allclose(tta_logits(model, x, "flip_translate").numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_averaged_weights_are_swapped_in_for_evaluation_and_kept_at_the_end(replicas):
    strategy = cached_strategy("mirrored", tuple(f"/cpu:{i}" for i in range(replicas)))
    batches = np.stack([IMAGES[:8]] * 6)
    labels = np.tile(np.arange(8, dtype=np.int32), (6, 1))
    model, optimizer, loop, iterator = tiny_loop(
        strategy, batches, labels, optimizer_options={"ema_momentum": 0.5, "learning_rate": 1e-3}
    )
    loop(iterator, tf.constant(6), tf.zeros(NUM_SUMS))
    live = [v.numpy() for v in model.trainable_variables]
    average = [v.numpy() for v in optimizer._model_variables_moving_average]  # Keras keeps them here
    assert max(np.abs(a - b).max() for a, b in zip(live, average)) > 1e-4
    with averaged_weights(model, optimizer):
        for variable, expected in zip(model.trainable_variables, average):
            np.testing.assert_array_equal(variable.numpy(), expected)
    for variable, expected in zip(model.trainable_variables, live):
        np.testing.assert_array_equal(variable.numpy(), expected)
    finalize_averaged_weights(model, optimizer)
    for variable, expected in zip(model.trainable_variables, average):
        np.testing.assert_array_equal(variable.numpy(), expected)


def test_fast_recipe_trains_and_reports_accuracy_with_and_without_tta(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", "--config", SMOKE, "--workdir", str(workdir)]
    for override in (
        "model.name=airbench",
        "model.width=8",
        "train.epochs=2",
        "optimizer.schedule=linear",
        "optimizer.ema_momentum=0.9",
        "data.flip=alternating",
        "data.pad_mode=reflect",
        "eval.tta=flip_translate",
    ):
        args += ["--set", override]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Whitening layer initialised" in result.output
    assert "Eval at step 32 with eval.tta=flip_translate" in result.output
    tta_accuracy = json.loads((workdir / "metrics.json").read_text())["accuracy"]
    assert f"final test accuracy  {tta_accuracy:.2%} with eval.tta=flip_translate" in result.output
    # `launch evaluate` gives the same two numbers from the final (averaged) checkpoint.
    with_tta = CliRunner().invoke(cli, ["evaluate", "--workdir", str(workdir)])
    single = CliRunner().invoke(cli, ["evaluate", "--workdir", str(workdir), "--set", "eval.tta=none"])
    assert f"Test accuracy {tta_accuracy:.2%}" in with_tta.output
    single_view = single.output.split("Test accuracy ")[1].split("%")[0]
    assert f"{single_view}% single view" in result.output


def test_shipped_fast_config_and_bad_values():
    config = load_config(REPO / "configs" / "cifar10_fast.yaml")
    assert (config.model.name, config.data.flip, config.eval.tta) == ("airbench", "alternating", "flip_translate")
    with pytest.raises(ConfigError, match="eval.tta must be one of none, flip, flip_translate; got 'flips'"):
        smoke_config("eval.tta=flips")
    with pytest.raises(ConfigError, match="optimizer.ema_momentum must be < 1"):
        smoke_config("optimizer.ema_momentum=1")
