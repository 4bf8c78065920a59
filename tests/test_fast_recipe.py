"""The fast CIFAR-10 recipe's pieces: whitening init, schedule, weight averaging, flips, TTA."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from launch.cli import cli
from tests.conftest import REPO, smoke_config, tiny_loop
from trainer.config import OptimizerConfig, load_config
from trainer.data.augment import augment_batch
from trainer.data.plan import InputSpec
from trainer.errors import ConfigError
from trainer.evaluation import tta_logits
from trainer.models import build_model, init_from_data, patch_whitening_kernel
from trainer.optim import Lookahead, averaged_weights, finalize_averaged_weights, learning_rate_schedule
from trainer.runtime import cached_strategy
from trainer.sums import NUM_SUMS
from trainer.training import train

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


def test_linear_schedule_can_start_and_end_above_zero():
    config = OptimizerConfig(
        learning_rate=1.0, schedule="linear", warmup_epochs=2.3, initial_lr_fraction=0.2, final_lr_fraction=0.07
    )
    schedule = learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
    values = [float(schedule(step)) for step in (0, 22, 23, 100, 120)]
    np.testing.assert_allclose(values, [0.2 + 0.8 / 23, 1.0, 1.0, 0.07, 0.07], atol=1e-6)
    cosine = learning_rate_schedule(OptimizerConfig(**{**config.__dict__, "schedule": "cosine"}), 10, 100)
    np.testing.assert_allclose([float(cosine(0)), float(cosine(23)), float(cosine(100))], [0.2, 1.0, 0.07], atol=1e-6)


def test_airbench_convs_start_by_passing_their_inputs_through():
    model = build_model("airbench", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=16)
    first = model.get_layer("group1_conv1").kernel.numpy()  # 24 whitened channels in, 16 out
    np.testing.assert_array_equal(
        first[:, :, :16, :16], np.eye(16)[None, None] * np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]])[:, :, None, None]
    )
    assert np.abs(first[:, :, 16:, :16]).max() == 0  # the passed filters read one channel only
    wide = model.get_layer("group2_conv1").kernel.numpy()  # 16 in, 64 out: 16 identities, 48 random
    np.testing.assert_array_equal(wide[1, 1, :, :16], np.eye(16))
    assert 0 < np.abs(wide[..., 16:]).max() <= 1 / np.sqrt(9 * 16)  # PyTorch's U(+/- 1/sqrt(fan_in))


def test_airbench_starting_weights_follow_the_run_seed():
    """The quickstart's promise (same command, same figures) needs the kernels drawn from
    the run's seed, not from a seed fixed when trainer.models was imported."""

    def kernels(seed: int) -> dict[str, np.ndarray]:
        keras.utils.set_random_seed(seed)
        model = build_model("airbench", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
        return {layer.name: layer.kernel.numpy() for layer in model.layers if "conv" in layer.name}

    first, again, other = kernels(0), kernels(0), kernels(1)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    # group2_conv1 (4 -> 16 channels) is the one conv with random filters beyond its 4 identities.
    assert not np.array_equal(first["group2_conv1"], other["group2_conv1"])


def test_bias_lr_multiplier_scales_only_batchnorm_shift_updates_on_two_replicas():
    strategy = cached_strategy("mirrored", ("/cpu:0", "/cpu:1"))
    batches, labels = IMAGES[None, :8], np.arange(8, dtype=np.int32)[None]
    deltas = []
    start = None
    for multiplier in (1.0, 8.0):
        model, _, loop, iterator = tiny_loop(
            strategy, batches, labels, model_name="airbench", optimizer_options={"bias_lr_multiplier": multiplier}
        )
        if start is None:
            init_from_data(model, IMAGES, [0] * 3, [1] * 3)
            start = [v.numpy() for v in model.variables]
        for variable, value in zip(model.variables, start):
            variable.assign(value)
        loop(iterator, tf.constant(1), tf.zeros(NUM_SUMS))
        deltas.append({v.path: v.numpy() - s for v, s in zip(model.variables, start) if v.trainable})
    shifts = [path for path in deltas[0] if path.endswith("/beta")]
    assert len(shifts) == 6 and min(np.abs(delta).max() for delta in deltas[0].values()) > 0
    for path, delta in deltas[0].items():
        np.testing.assert_allclose(deltas[1][path], delta * (8.0 if path in shifts else 1.0), rtol=1e-4, atol=1e-7)


def _flipped(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Which outputs are mirrors of their input (crop_padding=0: only flips change them)."""
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(out == images, axis=(1, 2, 3)))
    return mirrored


def test_alternating_flips_mirror_every_image_in_every_other_epoch():
    spec = InputSpec(global_batch=N, seed=4, augment=True, crop_padding=0, flip="alternating")
    indices = tf.range(N, dtype=tf.int64)
    epochs = [augment_batch(IMAGES, indices, tf.constant(e, tf.int64), spec).numpy() for e in range(4)]
    flips = [_flipped(out, IMAGES) for out in epochs]
    assert 0 < flips[0].sum() < N  # random in the first epoch
    for previous, current in zip(flips, flips[1:]):
        np.testing.assert_array_equal(current, ~previous)


def test_reflect_padding_crops_from_a_mirrored_border():
    spec = InputSpec(global_batch=N, seed=1, augment=True, crop_padding=2, pad_mode="reflect")
    out = augment_batch(IMAGES, tf.range(N, dtype=tf.int64), tf.constant(0, tf.int64), spec).numpy()
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


@pytest.mark.parametrize("replicas", [1, 2])
def test_lookahead_copies_averages_and_resets_the_live_weights(replicas):
    strategy = cached_strategy("mirrored", tuple(f"/cpu:{i}" for i in range(replicas)))
    with strategy.scope():
        model = build_model("airbench", input_shape=(32, 32, 3), num_classes=10, mean=[0] * 3, std=[1] * 3, width=4)
        lookahead = Lookahead(model, every=5, start_step=3, per_epoch=12, total_steps=40, decay=0.9)
    assert lookahead.first_step == 5
    kernel = model.get_layer("logits").kernel
    index = next(i for i, v in enumerate(lookahead.fast) if v.path == kernel.path)
    assert any(v.path.endswith("moving_mean") for v in lookahead.fast)  # BatchNorm statistics too
    after_step = tf.function(lookahead.after_step)

    def step(number, live):
        kernel.assign(np.full(kernel.shape, live, np.float32))
        after_step(tf.constant(number, tf.int64))
        copies = [c.numpy() for c in getattr(kernel.value, "values", [kernel.value])]  # one per replica
        assert len(copies) == replicas and all(np.array_equal(c, copies[0]) for c in copies)
        return float(copies[0].flat[0]), float(lookahead.slow[index].numpy().flat[0])

    assert step(5, 1.0) == (1.0, 1.0)  # first beat: take the copy, leave the live weights
    assert step(7, 3.0) == (3.0, 1.0)  # between beats: nothing
    rho = 0.9**5 * (10 / 40) ** 3
    live, slow = step(10, 3.0)  # a beat: slow moves toward live, live is reset to it
    np.testing.assert_allclose([live, slow], [rho + (1 - rho) * 3.0] * 2, rtol=1e-6)
    assert step(12, 7.0) == (slow, slow)  # an epoch's end, between beats: live reset to slow
    assert step(13, 7.0) == (7.0, slow)


@pytest.mark.parametrize(
    "averaging",
    [("optimizer.ema_momentum=0.9",), ("optimizer.lookahead_every_steps=5", "optimizer.lookahead_start_epochs=0.5")],
    ids=["ema", "lookahead"],
)
def test_fast_recipe_trains_and_reports_accuracy_with_and_without_tta(tmp_path, averaging):
    # Batches of 16 of 256 images: 16 steps an epoch, as in the smoke run, so lookahead's beats
    # (from step 10, every 5) and the epoch ends fall on the same steps. Checkpoints at epoch
    # ends only, no TensorBoard images: nothing here reads them.
    workdir = tmp_path / "run"
    args = ["train", "--config", SMOKE, "--workdir", str(workdir)]
    for override in (
        "data.batch_size=16",
        "data.synthetic_train_size=256",
        "data.synthetic_test_size=64",
        "checkpoint.every_steps=0",
        "tensorboard.images=false",
        "model.name=airbench",
        "model.width=8",
        "train.epochs=2",
        "optimizer.schedule=linear",
        "optimizer.bias_lr_multiplier=64",
        *averaging,
        "data.flip=alternating",
        "data.pad_mode=reflect",
        "eval.tta=flip_translate",
    ):
        args += ["--set", override]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Whitening layer initialised" in result.output
    assert "Eval at step 32 with eval.tta=flip_translate" in result.output
    final = json.loads((workdir / "metrics.json").read_text())
    tta_accuracy = final["accuracy"]
    assert f"final test accuracy  {tta_accuracy:.2%} with eval.tta=flip_translate" in result.output
    # `launch evaluate` gives the same two numbers from the final (averaged) checkpoint (with
    # the TTA loss too: 64 test images, so the accuracy alone would match by chance more often).
    with_tta = CliRunner().invoke(cli, ["evaluate", "--workdir", str(workdir)])
    single = CliRunner().invoke(cli, ["evaluate", "--workdir", str(workdir), "--set", "eval.tta=none"])
    assert f"Test accuracy {tta_accuracy:.2%}  loss " in with_tta.output, with_tta.output
    assert float(with_tta.output.split("  loss ")[1].split()[0]) == pytest.approx(final["loss"], abs=1e-4)
    single_view = single.output.split("Test accuracy ")[1].split("%")[0]
    assert f"{single_view}% single view" in result.output


def test_shipped_fast_config_and_bad_values():
    config = load_config(REPO / "configs" / "cifar10_fast.yaml")
    assert (config.model.name, config.data.flip, config.eval.tta) == ("airbench", "alternating", "flip_translate")
    with pytest.raises(ConfigError, match="eval.tta must be one of none, flip, flip_translate; got 'flips'"):
        smoke_config("eval.tta=flips")
    with pytest.raises(ConfigError, match="optimizer.ema_momentum must be < 1"):
        smoke_config("optimizer.ema_momentum=1")
    with pytest.raises(ConfigError, match="optimizer.lookahead_decay must be < 1, got 1"):
        smoke_config("optimizer.lookahead_decay=1")
    with pytest.raises(ConfigError, match="optimizer.label_smoothing must be < 1, got 1.5"):
        smoke_config("optimizer.label_smoothing=1.5")
    with pytest.raises(ConfigError, match="optimizer.final_lr_fraction must be between 0 and 1 .* got 1.5"):
        smoke_config("optimizer.final_lr_fraction=1.5")
    with pytest.raises(ConfigError, match="lookahead_every_steps and optimizer.ema_momentum both average"):
        smoke_config("optimizer.lookahead_every_steps=5", "optimizer.ema_momentum=0.9")
    with pytest.raises(ConfigError, match="optimizer.bias_lr_multiplier"):
        smoke_config("optimizer.bias_lr_multiplier=0")
    wide = load_config(REPO / "configs" / "cifar10_airbench94.yaml")
    assert (wide.model.width, wide.optimizer.bias_lr_multiplier) == (64, 64)


def test_the_gpu_settings_of_the_recipe_run_together_on_a_cpu(tmp_path):
    # What bench/gpu.py's `auto` settings resolve to on one GPU (batches made on the device,
    # float16 with loss scaling, XLA) with the recipe's TTA, plus lookahead, all at once: checked
    # here so that a session with a GPU does not spend it on debugging.
    lines: list[str] = []
    # 16 steps an epoch of batches of 32 (float16 is emulated on a CPU, each op slow), 64 test images.
    config = smoke_config(
        "data.batch_size=32",
        "data.synthetic_train_size=512",
        "data.synthetic_test_size=64",
        "model.name=airbench",
        "train.epochs=2",
        "data.placement=device",
        "runtime.precision=mixed_float16",
        "runtime.jit_compile=true",
        "optimizer.lookahead_every_steps=5",
        "optimizer.lookahead_start_epochs=0.5",
        "data.flip=alternating",
        "data.pad_mode=reflect",
        "data.crop_padding=2",
        "eval.tta=flip_translate",
    )
    result = train(config, tmp_path, echo=lines.append)
    assert "precision mixed_float16" in lines[0] and "XLA on" in lines[0]
    assert any(line.startswith("Input: the training set is kept on each replica's device") for line in lines)
    assert any("with eval.tta=flip_translate" in line for line in lines)
    assert result.step == 32 and np.isfinite(result.final_eval.loss)
    assert result.final_eval.accuracy > 0.3  # chance is 0.1
