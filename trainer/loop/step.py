"""The compiled part of training: up to `steps_per_loop` steps in one `tf.function` call.

`strategy.run` does the maths on every replica; the call returns the sums of what the
controller reports (`StepSums`) and whether the workers agreed to stop or to save. It
knows nothing of epochs, logging or files: the controller (trainer.loop.controller)
decides those between calls.

Keras 3 `model.fit` is not used: it fails under MultiWorkerMirroredStrategy and with
`steps_per_execution>1` under MirroredStrategy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import tensorflow as tf

from trainer.data.augment import BatchAugmentation, MixedTargets
from trainer.data.device import DeviceFeed
from trainer.evaluation import per_example_loss
from trainer.optim import Lookahead, unwrapped
from trainer.sums import StepSums

_NONFINITE = StepSums._fields.index("nonfinite")


@dataclass
class StepOptions:
    """How each step computes and what ends a call early.

    stop_on_nonfinite: end the call after a step with a NaN/Inf loss (or NaN/Inf gradients
        where `check_gradients`; off under float16 loss scaling, which skips such steps).
    skip_nonfinite: the optimizer skips non-finite steps (train.nan_policy=skip_step); its
        loss scale is put back to 1 after each step, so skips never shrink later updates.
    jit_compile: XLA for the forward and backward pass; the optimizer update and its
        cross-replica reduction stay outside the compiled cluster.
    gradient_multipliers: one per trainable variable, applied before the update
        (per-variable learning rates, see trainer.optim.gradient_multipliers).
    lookahead: run after every step with the global step.
    device_feed: data.placement=device: batches are made on the replicas.
    agree_on_save: reduce the chief's time-based save vote at the end of each call.
    accumulation_steps: optimizer.gradient_accumulation_steps: each replica's batch is cut
        into this many micro-batches, whose gradients are summed and applied once.
    class_weights: data.class_weights, one per class: each example's loss is multiplied by
        its class's weight (the dominant class of a mixed one), the sum divided by the
        global batch, as Keras' fit(class_weight=...) does.
    augmentation: RandAugment/MixUp/CutMix on each replica's batch before the forward pass,
        keyed by the global step (trainer.data.augment).
    """

    global_batch: int
    num_classes: int
    label_smoothing: float = 0.0
    stop_on_nonfinite: bool = True
    skip_nonfinite: bool = False
    check_gradients: bool = True
    jit_compile: bool = False
    gradient_multipliers: list[float] | None = None
    lookahead: Lookahead | None = None
    device_feed: DeviceFeed | None = None
    agree_on_save: bool = False
    accumulation_steps: int = 1
    class_weights: list[float] | None = None
    augmentation: BatchAugmentation | None = None


class Votes(NamedTuple):
    """Host flags that every worker must agree on: any worker's True wins."""

    stop: tf.Variable
    save: tf.Variable

    @classmethod
    def create(cls) -> Votes:
        # Read inside the compiled loop; plain (non-mirrored) variables on the host.
        with tf.init_scope():
            return cls(
                tf.Variable(False, trainable=False, name="stop_requested"),
                tf.Variable(False, trainable=False, name="save_requested"),
            )


def make_train_loop(strategy: tf.distribute.Strategy, model, optimizer, votes: Votes, options: StepOptions):
    """A compiled `train_loop(batches, first_step, num_steps, sums, stop_at) -> (sums, steps, stopped, save)`.

    `batches` is a distributed iterator, or with a device feed its `plan(step)`;
    `first_step` (int64) is the global step the call starts at. `sums` (a StepSums
    vector) is carried in and out, so a logging window split over two calls adds up
    exactly as in one. The call ends early when any worker voted to stop (all workers
    agree before every step, so their collectives stay in step) or after a non-finite
    step when `options.stop_on_nonfinite`. `stop_at` (int64, -1 = never) is a test seam:
    this worker votes to stop before that global step, as a signal would make it.
    `save` is the workers' agreement on the chief's time-based save vote.
    """
    train_step = _train_step_fn(model, optimizer, options)

    def agreed(flag: tf.Variable) -> tf.Tensor:
        votes_per_replica = strategy.run(lambda: tf.cast(flag.read_value(), tf.float32))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, votes_per_replica, axis=None) > 0

    run_step = _step_runner(strategy, train_step, options)

    @tf.function
    def train_loop(batches, first_step, num_steps, sums, stop_at):
        steps = tf.constant(0)
        diverged = tf.constant(False)
        stopped = vote_and_agree(first_step, steps, stop_at)
        while steps < num_steps and not stopped and not diverged:
            per_replica = run_step(batches, steps, first_step)
            steps += 1
            _after_step(optimizer, options, first_step + tf.cast(steps, tf.int64))
            step_sums = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            sums += step_sums
            if options.stop_on_nonfinite:
                diverged = step_sums[_NONFINITE] > 0
            stopped = vote_and_agree(first_step, steps, stop_at)
        save = tf.constant(False)
        if options.agree_on_save:
            # Read the vote after the steps, here in cross-replica context: inside
            # strategy.run (replica threads) the control dependency would not hold.
            with tf.control_dependencies([sums]):
                vote = tf.cast(votes.save.read_value(), tf.float32)
            copies = strategy.run(tf.identity, args=(vote,))
            save = strategy.reduce(tf.distribute.ReduceOp.SUM, copies, axis=None) > 0
        return sums, steps, stopped, save

    def vote_and_agree(first_step, steps, stop_at):
        """The test seam's vote (stop before global step `stop_at`), then everyone's."""
        if first_step + tf.cast(steps, tf.int64) == stop_at:
            votes.stop.assign(True)
        return agreed(votes.stop)

    return train_loop


def _step_runner(strategy: tf.distribute.Strategy, train_step, options: StepOptions):
    """`run_step(batches, steps_done, first_step)`: one step on every replica, fed by the
    device feed or the distributed iterator."""

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
    def run_step(batches, steps_done, first_step):
        step_fn = train_step
        if options.augmentation is not None:  # its draws are keyed by the global step
            step_fn = functools.partial(train_step, step=first_step + tf.cast(steps_done, tf.int64))
        if options.device_feed is not None:
            return options.device_feed.run(strategy, step_fn, batches, steps_done)
        return strategy.run(step_fn, args=next(batches))

    return run_step


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: tracing needs no AutoGraph
def _after_step(optimizer, options: StepOptions, global_step: tf.Tensor) -> None:
    """Cross-replica work after each step: the skip policy's scale reset, the lookahead."""
    if options.skip_nonfinite:
        optimizer.dynamic_scale.assign(1.0)  # a skip halved it: later updates keep their size
    if options.lookahead is not None:
        options.lookahead.after_step(global_step)  # the global step, not optimizer.iterations


def _train_step_fn(model, optimizer, options: StepOptions):
    """One replica's step: forward, backward, update; returns its StepSums as a vector."""
    compute = _batch_gradients_fn(model, optimizer, options)
    reduction = _OneReduction(optimizer)

    def train_step(images, labels, step=None):
        context = tf.distribute.get_replica_context()
        targets = labels
        if options.augmentation is not None:
            images, targets = options.augmentation(images, labels, step, context.replica_id_in_sync_group)
        gradients, loss_sum, correct, losses_finite = compute(images, targets)
        summed, norm = reduction.sum_gradients(context, gradients, _loss_scale(optimizer))
        updates = summed
        if options.gradient_multipliers is not None:
            updates = [g if k == 1.0 else g * k for g, k in zip(summed, options.gradient_multipliers)]
        # A non-finite step is stopped on (controller) or skipped (LossScaleOptimizer).
        optimizer.apply_gradients(zip(updates, model.trainable_variables))
        local_bad = tf.stack(
            [
                tf.cast(~losses_finite, tf.float32),
                tf.cast(~tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients]), tf.float32),
            ]
        )
        # Every replica must agree on the verdict, as the optimizer does on the update.
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, local_bad) > 0
        bad_loss = bad[0]
        # Overflowing float16 gradients are routine under loss scaling: not a divergence.
        flagged = bad_loss | (bad[1] & options.check_gradients)
        once = 1.0 / context.num_replicas_in_sync  # summed over replicas: counts the step once
        sums = StepSums(
            loss=tf.where(bad_loss, 0.0, loss_sum),
            correct=tf.where(bad_loss, 0.0, correct),
            examples=tf.where(bad_loss, 0.0, tf.cast(tf.size(labels), tf.float32)),
            nonfinite=tf.cast(flagged, tf.float32) * once,
            gradient_norm=tf.where(bad[1], 0.0, norm),
            steps=tf.constant(once),
        )
        return tf.stack(list(sums))

    return train_step


def _batch_gradients_fn(model, optimizer, options: StepOptions):
    """(gradients, loss sum, correct count, every loss finite) of one replica's batch.

    With `accumulation_steps` k > 1 the batch goes through the model as k micro-batches,
    one after the other, and their gradients are summed: each micro-batch's loss is
    divided by the global batch, so the sum is the gradient of the whole batch's mean
    loss, applied in one update (steps and the LR schedule count updates). Micro-batch i
    holds rows i, i+k, i+2k... of this replica's slice: as each slice is a multiple of k
    long, across the replicas it is the global batch's rows i, i+k, ... whatever their
    number, so synchronized BatchNorm normalises over the same examples on 1 replica as
    on 2. Keras' own `gradient_accumulation_steps` is not used: under MirroredStrategy its
    update (a merge_call inside a cond) fails in this step, and its LR schedule counts
    micro-batches.

    `targets`: the integer labels, or MixedTargets; a mixed example counts as correct when
    the model's class is its dominant one (Keras' categorical accuracy on soft labels).
    """
    compute = _forward_backward_fn(model, optimizer, options)

    def one(images, targets):
        gradients, losses, logits = compute(images, targets)
        labels = targets.dominant if isinstance(targets, MixedTargets) else targets
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        finite = tf.reduce_all(tf.math.is_finite(losses))
        return [tf.convert_to_tensor(g) for g in gradients], tf.reduce_sum(losses), _count(correct), finite

    k = options.accumulation_steps
    if k == 1:
        return one

    def accumulated(images, targets):
        images, targets = _micro_batches(images, k), tf.nest.map_structure(lambda t: _micro_batches(t, k), targets)
        gradients, loss_sum, correct, finite = one(images[0], tf.nest.map_structure(lambda t: t[0], targets))
        # Unrolled, in order: a tf.while_loop cannot hold synchronized BatchNorm's
        # cross-replica reduction (a merge_call) under MirroredStrategy.
        for i in range(1, k):
            more, loss, right, ok = one(images[i], tf.nest.map_structure(lambda t, i=i: t[i], targets))
            gradients = [a + b for a, b in zip(gradients, more)]
            loss_sum, correct, finite = loss_sum + loss, correct + right, finite & ok
        return gradients, loss_sum, correct, finite

    return accumulated


def _micro_batches(values: tf.Tensor, k: int) -> tf.Tensor:
    """[n, ...] -> [k, n/k, ...], micro-batch i holding rows i, i+k, i+2k, ..."""
    rest = [size if size is not None else tf.shape(values)[axis] for axis, size in enumerate(values.shape) if axis]
    grouped = tf.reshape(values, [-1, k, *rest])
    return tf.transpose(grouped, [1, 0, *range(2, grouped.shape.rank)])


def _count(flags: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(flags, tf.float32))


def example_losses_fn(options: StepOptions):
    """(targets, logits) -> each example's loss: cross-entropy, on soft labels when mixed,
    times its class weight (data.class_weights; a mixed example: its dominant class's,
    as Keras weighs soft labels by their argmax)."""
    smoothing, num_classes = options.label_smoothing, options.num_classes

    def losses(targets, logits):
        if not isinstance(targets, MixedTargets):
            return per_example_loss(targets, logits, num_classes, smoothing)
        soft = targets.soft * (1.0 - smoothing) + smoothing / num_classes if smoothing else targets.soft
        return tf.nn.softmax_cross_entropy_with_logits(soft, tf.cast(logits, tf.float32))

    if options.class_weights is None:
        return losses

    def weighted(targets, logits):
        weights = tf.constant(options.class_weights, tf.float32)
        labels = targets.dominant if isinstance(targets, MixedTargets) else targets
        return losses(targets, logits) * tf.gather(weights, labels)

    return weighted


def _forward_backward_fn(model, optimizer, options: StepOptions):
    # Regularisation is the whole batch's once: each of k micro-batches carries 1/k of it.
    share = 1.0 / options.accumulation_steps
    example_losses = example_losses_fn(options)

    def forward_backward(images, targets):
        with tf.GradientTape() as tape:
            logits = model(tf.cast(images, tf.float32), training=True)
            losses = example_losses(targets, logits)
            # Divide by the GLOBAL batch: the optimizer sums gradients over replicas.
            loss = tf.nn.compute_average_loss(losses, global_batch_size=options.global_batch)
            if model.losses:
                regularisation = tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                loss += regularisation if share == 1.0 else regularisation * share
            scaled_loss = optimizer.scale_loss(loss)  # identity unless LossScaleOptimizer
        return tape.gradient(scaled_loss, model.trainable_variables), losses, logits

    return tf.function(forward_backward, jit_compile=True) if options.jit_compile else forward_backward


def _loss_scale(optimizer):
    scale = getattr(optimizer, "dynamic_scale", None)  # LossScaleOptimizer only
    return tf.cast(scale, tf.float32) if scale is not None else 1.0


class _OneReduction:
    """Sum the replicas' gradients once, here, and tell the optimizer they are summed.

    Keras' TensorFlow optimizer sums gradients across replicas inside `apply_gradients`
    (its `_all_reduce_sum_gradients`), where nothing else can see the sum. Doing that one
    all-reduce here instead gives the norm of the global gradient (the same number on
    every replica, whatever their count) at no extra communication; the optimizer's own
    reduction is replaced by a pass-through, for good, on this optimizer instance (it is
    built for this loop and applies nothing else; MirroredStrategy runs replicas in
    threads, so a patch that came and went around each call would race). A Keras version
    without that method keeps its own reduction, and the norm is then the sum of the
    replicas' norms (exact for one replica, an upper bound for several).
    """

    def __init__(self, optimizer) -> None:
        inner = unwrapped(optimizer)
        self.available = callable(getattr(inner, "_all_reduce_sum_gradients", None))
        if self.available:
            vars(inner)["_all_reduce_sum_gradients"] = list  # (gradient, variable) pairs, as given

    def sum_gradients(self, context, gradients: list, loss_scale) -> tuple[list, tf.Tensor]:
        """(gradients to apply, this replica's share of the gradient norm to report)."""
        if not self.available:
            return gradients, tf.linalg.global_norm(gradients) / loss_scale
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        once = 1.0 / context.num_replicas_in_sync  # every replica holds the same norm
        return summed, tf.linalg.global_norm(summed) / loss_scale * once
