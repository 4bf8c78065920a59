"""RandAugment, MixUp and CutMix (data.randaugment_ops, data.mixup_alpha, data.cutmix_alpha).

Keras' own layers, applied in the train step with draws keyed by (seed, global step,
replica): what each makes of a batch is checked by numbers, and a run with them on that
is stopped mid-epoch resumes bit for bit.
"""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import smoke_config
from tests.test_fault_tolerance import _assert_same_run
from trainer.config import DataConfig
from trainer.data.augment import KeyedSeeds, MixedTargets, batch_augmentation, step_key
from trainer.loop.step import StepOptions, example_losses_fn
from trainer.training import train

CLASSES = 10


def _batch(size: int = 16, seed: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
    return tf.constant(images), tf.constant(np.arange(size) % CLASSES, tf.int32)


def _augmentation(**keys):
    return batch_augmentation(DataConfig(**keys), seed=3, num_classes=CLASSES)


def test_every_key_is_off_by_default_and_then_the_step_is_unchanged():
    assert batch_augmentation(DataConfig(), seed=0, num_classes=CLASSES) is None
    assert StepOptions(global_batch=8, num_classes=CLASSES).augmentation is None


def test_mixup_is_the_convex_combination_with_the_step_seeds_lambda_and_repeats_for_that_step():
    images, labels = _batch()
    mixup = _augmentation(mixup_alpha=0.4)
    mixed, targets = mixup(images, labels, tf.constant(7, tf.int64), 0)
    assert isinstance(targets, MixedTargets)
    # The layer's own draw from the same key: the permutation and lambda of this step and replica.
    drawn = mixup.mixup.get_random_transformation(
        tf.cast(images, tf.float32), training=True, seed=KeyedSeeds(step_key(3, tf.constant(7, tf.int64), 0))
    )
    weight = drawn["mix_weight"].numpy()
    partner = drawn["permutation_order"].numpy()
    assert weight.min() > 0 and weight.max() < 1 and len(set(weight.tolist())) == len(weight)
    x = images.numpy().astype(np.float32)
    expected = weight[:, None, None, None] * x + (1 - weight[:, None, None, None]) * x[partner]
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6, atol=1e-4)
    onehot = np.eye(CLASSES)[labels.numpy()]
    np.testing.assert_allclose(
        targets.soft.numpy(), weight[:, None] * onehot + (1 - weight[:, None]) * onehot[partner], atol=1e-6
    )
    np.testing.assert_array_equal(targets.dominant.numpy(), targets.soft.numpy().argmax(axis=1))
    # The same step gives the same batch; another step or another replica, another one.
    again, again_targets = mixup(images, labels, tf.constant(7, tf.int64), 0)
    np.testing.assert_array_equal(again.numpy(), mixed.numpy())
    np.testing.assert_array_equal(again_targets.soft.numpy(), targets.soft.numpy())
    for step, replica in ((8, 0), (7, 1)):
        other, _ = mixup(images, labels, tf.constant(step, tf.int64), replica)
        assert not np.array_equal(other.numpy(), mixed.numpy())


def test_cutmix_pastes_a_partners_patch_and_weighs_the_labels_by_its_area():
    images, labels = _batch(seed=1)
    cutmix = _augmentation(cutmix_alpha=1.0)
    mixed, targets = cutmix(images, labels, tf.constant(11, tf.int64), 0)
    drawn = cutmix.cutmix.get_random_transformation(
        tf.cast(images, tf.float32), training=True, seed=KeyedSeeds(step_key(3, tf.constant(11, tf.int64), 0))
    )
    partner = drawn["permutation_order"].numpy()
    weight = drawn["mix_weight"].numpy().reshape(-1)
    x, out = images.numpy().astype(np.float32), mixed.numpy()
    from_partner = np.all(out == x[partner], axis=-1) & np.any(x != x[partner], axis=-1)
    # Every pixel is its own image's or its partner's (a patch), the labels in Keras' proportions.
    assert np.all((out == x) | (out == x[partner]))
    assert from_partner.any()
    onehot = np.eye(CLASSES)[labels.numpy()]
    np.testing.assert_allclose(
        targets.soft.numpy(), weight[:, None] * onehot + (1 - weight[:, None]) * onehot[partner], atol=1e-6
    )
    # The patch's share of the pixels is the label's partner share, up to the box's whole pixels.
    share = from_partner.mean(axis=(1, 2))
    differs = partner != np.arange(len(partner))
    assert np.all(np.abs(share[differs] - (1 - weight[differs])) < 0.2)


def test_both_mixings_choose_one_per_batch_and_randaugment_is_keyed_and_per_image():
    images, labels = _batch(size=32, seed=2)
    both = _augmentation(mixup_alpha=0.4, cutmix_alpha=1.0)
    kinds = set()
    for step in range(8):
        mixed, _ = both(images, labels, tf.constant(step, tf.int64), 0)
        x, out = images.numpy().astype(np.float32), mixed.numpy()
        kinds.add("cutmix" if np.mean(np.isclose(out, x)) > 0.3 else "mixup")
    assert kinds == {"cutmix", "mixup"}
    rand = _augmentation(randaugment_ops=2, randaugment_magnitude=0.8)
    first, same_labels = rand(images, labels, tf.constant(5, tf.int64), 0)
    assert same_labels is labels  # no mixing: the integer labels, and the plain loss
    second, _ = rand(images, labels, tf.constant(5, tf.int64), 0)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    third, _ = rand(images, labels, tf.constant(6, tf.int64), 0)
    assert not np.array_equal(first.numpy(), third.numpy())
    changed = np.any(first.numpy() != images.numpy().astype(np.float32), axis=(1, 2, 3))
    assert changed.sum() > len(changed) // 2


def test_the_mixed_loss_is_the_cross_entropy_of_the_soft_labels():
    logits = tf.constant(np.random.default_rng(4).normal(size=(4, CLASSES)), tf.float32)
    a, b, lam = np.array([0, 1, 2, 3]), np.array([5, 1, 7, 9]), np.array([0.7, 0.4, 0.5, 0.05], np.float32)
    soft = lam[:, None] * np.eye(CLASSES)[a] + (1 - lam[:, None]) * np.eye(CLASSES)[b]
    targets = MixedTargets(tf.constant(soft, tf.float32), tf.constant(soft.argmax(axis=1), tf.int32))
    log_p = tf.nn.log_softmax(logits).numpy()
    expected = -(lam * log_p[np.arange(4), a] + (1 - lam) * log_p[np.arange(4), b])
    losses = example_losses_fn(StepOptions(global_batch=4, num_classes=CLASSES))(targets, logits)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)
    smoothed = example_losses_fn(StepOptions(global_batch=4, num_classes=CLASSES, label_smoothing=0.1))
    uniform = -log_p.mean(axis=1)
    np.testing.assert_allclose(smoothed(targets, logits).numpy(), 0.9 * expected + 0.1 * uniform, rtol=1e-5)


MIXED = ("data.mixup_alpha=0.4", "data.cutmix_alpha=1")


@pytest.mark.parametrize(
    "keys",
    [MIXED, pytest.param((*MIXED, "data.randaugment_ops=2"), marks=pytest.mark.slow)],
    ids=["mixup-cutmix", "mixup-cutmix-randaugment"],
)
def test_a_mixed_run_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, monkeypatch, keys):
    """MixUp and CutMix on (RandAugment too in the slow variant: its tracing costs ~10 s),
    with balanced class weights: a stop inside a compiled call, at step 7 of 16, then the
    rest equals a straight run, every checkpoint tensor and logged scalar."""
    config = smoke_config(
        "data.synthetic_train_size=256",
        "data.synthetic_test_size=64",
        "data.batch_size=32",
        "model.width=8",
        "train.epochs=2",
        "train.steps_per_loop=4",
        "checkpoint.every_steps=0",
        "runtime.deterministic=true",
        "data.class_weights=balanced",
        *keys,
    )
    assert train(config, tmp_path / "straight", echo=lambda _: None).step == 16
    monkeypatch.setenv("TRAINER_STOP_AT_STEP", "7")
    stopped = train(config, tmp_path / "interrupted", echo=lambda _: None)
    assert (stopped.stopped_by, stopped.step) == ("TRAINER_STOP_AT_STEP", 7)
    monkeypatch.delenv("TRAINER_STOP_AT_STEP")
    assert train(config, tmp_path / "interrupted", echo=lambda _: None).step == 16
    _assert_same_run(tmp_path / "straight", tmp_path / "interrupted", step=16)


def _checkpointed(workdir) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints"))
    names = [name for name in reader.get_variable_to_shape_map() if not name.startswith(("_CHECKPOINTABLE", "save_"))]
    return {name: reader.get_tensor(name) for name in names}


@pytest.mark.parametrize(
    "keys",
    [MIXED, pytest.param((*MIXED, "data.randaugment_ops=2"), marks=pytest.mark.slow)],
    ids=["mixup-cutmix", "mixup-cutmix-randaugment"],
)
def test_the_device_feed_mixes_on_two_replicas_exactly_as_the_host_pipeline(tmp_path, keys):
    """Mixing is in the step, after either feed: data.placement=host and device train the
    same run (so a run may resume with the other), each replica mixing its own slice."""
    overrides = (
        "runtime.deterministic=true",
        "runtime.cpu_replicas=2",
        "train.epochs=1",
        "data.synthetic_train_size=256",
        "data.synthetic_test_size=64",
        "data.batch_size=32",
        "model.width=8",
        *keys,
    )
    host = train(smoke_config(*overrides, "data.placement=host"), tmp_path / "host", echo=lambda _: None)
    device = train(smoke_config(*overrides, "data.placement=device"), tmp_path / "device", echo=lambda _: None)
    assert host.step == device.step == 8 and host.final_eval.loss == device.final_eval.loss
    expected, actual = _checkpointed(tmp_path / "host"), _checkpointed(tmp_path / "device")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
