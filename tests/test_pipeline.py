import numpy as np
import pytest
import tensorflow as tf

from trainer.data.augment import augment_batch
from trainer.data.pipeline import eval_dataset_fn, train_dataset_fn
from trainer.data.plan import InputSpec, check_batch_divides, steps_per_epoch
from trainer.data.splits import Split
from trainer.errors import ConfigError
from trainer.runtime import cached_strategy

N = 40
IMAGES = np.arange(N * 8 * 8 * 3, dtype=np.int64).reshape(N, 8, 8, 3).__mod__(251).astype(np.uint8)
LABELS = np.arange(N, dtype=np.int32)  # label == index, so batches reveal which examples they hold


def _augment(indices, epoch, seed=0, padding=2):
    return augment_batch(
        tf.gather(IMAGES, indices),
        tf.constant(indices, tf.int64),
        tf.constant(epoch, tf.int64),
        InputSpec(global_batch=1, seed=seed, augment=True, crop_padding=padding),
    ).numpy()


def _stream(replicas, spec, start=0, total=8):
    strategy = cached_strategy("mirrored", tuple(f"/cpu:{i}" for i in range(replicas)))
    dataset = strategy.distribute_datasets_from_function(train_dataset_fn(Split(IMAGES, LABELS), spec, start, total))
    steps = []
    for batch in dataset:
        labels = strategy.experimental_local_results(batch[1])
        images = strategy.experimental_local_results(batch[0])
        steps.append((np.concatenate([t.numpy() for t in labels]), np.concatenate([t.numpy() for t in images])))
    return steps


def test_augmentation_is_deterministic_given_seed_epoch_index():
    np.testing.assert_array_equal(_augment([3, 7, 9], 1), _augment([3, 7, 9], 1))


def test_augmentation_of_an_example_does_not_depend_on_its_batch():
    alone = _augment([7], 2)
    in_batch = _augment([1, 2, 7, 30], 2)[2:3]
    np.testing.assert_array_equal(alone, in_batch)


def test_augmentation_changes_with_epoch_and_seed():
    indices = list(range(16))
    base = _augment(indices, 0)
    assert not np.array_equal(base, _augment(indices, 1))
    assert not np.array_equal(base, _augment(indices, 0, seed=1))


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_augmentation_is_exactly_numpys_pad_crop_and_flip_at_the_drawn_offsets(pad_mode):
    from trainer.data.augment import augmentation_draws

    for padding in (1, 3, 7) if pad_mode == "reflect" else (1, 3, 9):  # 7: the widest mirror of 8 pixels
        spec = InputSpec(global_batch=1, seed=5, augment=True, crop_padding=padding, pad_mode=pad_mode)
        indices, epoch = tf.range(N, dtype=tf.int64), tf.constant(1, tf.int64)
        out = augment_batch(tf.constant(IMAGES), indices, epoch, spec).numpy()
        rows, columns, flips = (t.numpy() for t in augmentation_draws(indices, epoch, spec))
        mode = "reflect" if pad_mode == "reflect" else "constant"
        padded = np.pad(IMAGES, [(0, 0), (padding,) * 2, (padding,) * 2, (0, 0)], mode=mode)
        for i in range(N):
            crop = padded[i, rows[i] : rows[i] + 8, columns[i] : columns[i] + 8]
            np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)
        assert 0 < flips.sum() < N and len(set(rows)) > 1


def test_a_mirror_wider_than_the_image_is_one_error_line_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from launch.cli import cli

    workdir = tmp_path / "w"
    args = ["train", "--config", "configs/smoke.yaml", "--workdir", str(workdir)]
    result = CliRunner().invoke(cli, [*args, "--set", "data.pad_mode=reflect", "--set", "data.crop_padding=32"])
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    assert "data.crop_padding=32 with data.pad_mode=reflect needs images larger than 32 pixels (these are 32x32)" in (
        result.output
    )
    assert not workdir.exists()


def test_augmentation_is_a_crop_of_the_padded_image_or_its_mirror():
    out = _augment(list(range(N)), 0, padding=2)
    padded = np.pad(IMAGES, [(0, 0), (2, 2), (2, 2), (0, 0)])
    shifted = 0
    for i in range(N):
        windows = {(y, x): padded[i, y : y + 8, x : x + 8] for y in range(5) for x in range(5)}
        offsets = [o for o, w in windows.items() if np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1])]
        assert offsets, i
        shifted += (2, 2) not in offsets  # (2, 2) is the uncropped image
    # 24 of the 25 offsets move the image: a pipeline that forgot to crop fails here.
    assert shifted >= 0.75 * N


def test_each_epoch_uses_every_example_once():
    spec = InputSpec(global_batch=8, seed=1)
    steps = _stream(1, spec, total=2 * steps_per_epoch(N, 8))
    for epoch in range(2):
        labels = np.concatenate([s[0] for s in steps[epoch * 5 : (epoch + 1) * 5]])
        assert sorted(labels.tolist()) == list(range(N))
    assert not np.array_equal(steps[0][0], steps[5][0])  # reshuffled per epoch


def test_replicas_share_the_same_global_batch():
    spec = InputSpec(global_batch=8, seed=5, augment=True, crop_padding=2)
    one, two = _stream(1, spec), _stream(2, spec)
    for (labels1, images1), (labels2, images2) in zip(one, two, strict=True):
        np.testing.assert_array_equal(labels1, labels2)
        np.testing.assert_array_equal(images1, images2)


def test_stream_rebuilt_at_a_step_matches_the_uninterrupted_stream():
    spec = InputSpec(global_batch=8, seed=2, augment=True, crop_padding=2)
    full, resumed = _stream(1, spec, total=12), _stream(1, spec, start=7, total=12)
    assert len(resumed) == 5
    for (labels_a, images_a), (labels_b, images_b) in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(images_a, images_b)


@pytest.mark.parametrize("replicas", [1, 2])
def test_eval_sees_every_example_exactly_once(replicas):
    strategy = cached_strategy("mirrored", tuple(f"/cpu:{i}" for i in range(replicas)))
    dataset = strategy.distribute_datasets_from_function(eval_dataset_fn(Split(IMAGES[:37], LABELS[:37]), 8))
    seen, shapes = [], set()
    for _, labels, mask in dataset:
        for replica_labels, replica_mask in zip(
            strategy.experimental_local_results(labels), strategy.experimental_local_results(mask)
        ):
            shapes.add(tuple(replica_labels.shape))
            seen += replica_labels.numpy()[replica_mask.numpy() > 0].tolist()
    assert sorted(seen) == list(range(37))
    assert shapes == {(8 // replicas,)}  # the last batch is padded: static shapes for XLA/TPU


def test_batch_must_divide_over_replicas():
    with pytest.raises(ConfigError, match="data.batch_size=10 must be divisible by the 4 replicas"):
        check_batch_divides(10, 4)


def test_batch_larger_than_dataset():
    with pytest.raises(ConfigError, match="larger than the 40 training examples"):
        steps_per_epoch(40, 64)
