"""data.class_weights: `balanced` or name:weight pairs, applied in the loss as Keras'
fit(class_weight=...) applies them: each example's loss times its class's weight, the sum
divided by the batch (not by the weights' sum)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import smoke_config
from trainer.data.augment import MixedTargets
from trainer.data.info import class_weights
from trainer.data.splits import RecordSplit, Split
from trainer.errors import ConfigError
from trainer.loop.step import StepOptions, example_losses_fn
from trainer.training import train

NAMES = ["cat", "dog", "bird"]
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], np.float32)
LABELS = np.array([0, 1, 1, 2])
WEIGHTS = [0.5, 2.0, 4.0]


def _split(labels) -> Split:
    labels = np.asarray(labels, np.int32)
    return Split(np.zeros((len(labels), 2, 2, 3), np.uint8), labels)


def test_the_weighted_loss_is_the_hand_computed_one_and_keras_fits():
    options = StepOptions(global_batch=4, num_classes=3, class_weights=WEIGHTS)
    losses = example_losses_fn(options)(tf.constant(LABELS, tf.int32), tf.constant(LOGITS)).numpy()
    log_p = LOGITS - np.log(np.exp(LOGITS).sum(axis=1, keepdims=True))
    by_hand = -np.array(WEIGHTS)[LABELS] * log_p[np.arange(4), LABELS]
    np.testing.assert_allclose(losses, by_hand, rtol=1e-5)
    # The step's loss divides the weighted sum by the (global) batch: Keras' sum_over_batch_size.
    batch_loss = tf.nn.compute_average_loss(losses, global_batch_size=4).numpy()
    assert batch_loss == pytest.approx(by_hand.sum() / 4, rel=1e-6)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert batch_loss == pytest.approx(float(keras_loss(LABELS, LOGITS, sample_weight=np.array(WEIGHTS)[LABELS])))
    # A mixed example weighs as its dominant class, as Keras weighs soft labels (their argmax).
    soft = np.array([[0.7, 0.3, 0], [0, 0.4, 0.6], [0.2, 0.8, 0], [0, 0, 1]], np.float32)
    mixed = MixedTargets(tf.constant(soft), tf.constant(soft.argmax(axis=1), tf.int32))
    mixed_losses = example_losses_fn(options)(mixed, tf.constant(LOGITS)).numpy()
    dominant = np.array(WEIGHTS)[soft.argmax(axis=1)]
    np.testing.assert_allclose(mixed_losses, -dominant * (soft * log_p).sum(axis=1), rtol=1e-5)
    keras_soft = keras.losses.CategoricalCrossentropy(from_logits=True)
    assert mixed_losses.sum() / 4 == pytest.approx(float(keras_soft(soft, LOGITS, sample_weight=dominant)), rel=1e-5)


def test_balanced_weights_come_from_the_training_labels():
    # 6 cats, 3 dogs, 1 bird: n / (classes * count) = 10/18, 10/9, 10/3, as scikit-learn's.
    weights = class_weights("balanced", NAMES, _split([0] * 6 + [1] * 3 + [2]))
    np.testing.assert_allclose(weights, [10 / 18, 10 / 9, 10 / 3])
    # A class without examples is not counted among the classes and never weighs a loss.
    assert class_weights("balanced", NAMES, _split([0, 0, 0, 2])) == pytest.approx([4 / 6, 1.0, 4 / 2])
    assert class_weights("", NAMES, _split([0, 1])) is None


def test_named_weights_default_to_one_and_a_wrong_name_or_value_is_one_line():
    assert class_weights("cat:2, bird:0.5", NAMES, _split([0])) == [2.0, 1.0, 0.5]
    assert class_weights("{'dog': 3}", NAMES, _split([0])) == [1.0, 3.0, 1.0]
    with pytest.raises(ConfigError, match=r"names class 'cow', which this dataset does not have; its classes are: cat"):
        class_weights("cat:2, cow:1", NAMES, _split([0]))
    for bad in ("cat", "cat:-1", "cat:x", "cat:1, cat:2", "cat:nan"):
        with pytest.raises(ConfigError, match="data.class_weights must be balanced, or class:weight pairs"):
            class_weights(bad, NAMES, _split([0]))
    records = RecordSplit(shards=["a.tfrecord"], counts=[4])
    with pytest.raises(ConfigError, match="TFRecord shards do not record"):
        class_weights("balanced", NAMES, records)
    assert class_weights("dog:2", NAMES, records) == [1.0, 2.0, 1.0]  # names need no counts


def test_an_unknown_class_is_refused_before_the_workdir_is_made(tmp_path):
    with pytest.raises(ConfigError) as refused:
        train(smoke_config("data.class_weights=class_1:2, kitten:3"), tmp_path / "run", echo=lambda _: None)
    assert "names class 'kitten'" in str(refused.value) and "class_0, class_1, class_2" in str(refused.value)
    assert not (tmp_path / "run").exists()
