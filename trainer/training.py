"""The training loop: a compiled multi-step function and a Python controller around it.

The compiled part (`strategy.run` in a `tf.function`, `steps_per_loop` steps per call)
does the maths on every replica. The controller decides when: progress, TensorBoard,
evaluation and checkpoints happen between calls, at global-step boundaries, so that
training "up to step N" is the same whether it ran in one go or was resumed.
Keras 3 `model.fit` is not used: it fails under MultiWorkerMirroredStrategy and with
`steps_per_execution>1` under MirroredStrategy.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from trainer.checkpoints import CheckpointStore
from trainer.config import Config, save_config
from trainer.data import Dataset, load_dataset
from trainer.data.pipeline import InputSpec, check_batch_divides, normalization_stats, steps_per_epoch, train_dataset_fn
from trainer.evaluation import EvalMetrics, Evaluator, per_example_loss
from trainer.models import build_model
from trainer.optim import build_optimizer, current_learning_rate
from trainer.runtime import Runtime, setup_runtime
from trainer.workdir import DatasetInfo, Workdir

Echo = Callable[[str], None]


@dataclass
class TrainResult:
    step: int
    total_steps: int
    seconds: float
    images_per_second: float
    final_eval: EvalMetrics | None
    workdir: Path


def train(config: Config, workdir: str | Path, *, fresh: bool = False, echo: Echo = print) -> TrainResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint unless `fresh`."""
    started = time.perf_counter()
    wd = Workdir(Path(workdir))
    if fresh:
        wd.clear_training_state()
    runtime = setup_runtime(config.runtime)
    echo(f"Strategy: {runtime.reason}; {runtime.num_replicas} replica(s)")
    check_batch_divides(config.data.batch_size, runtime.num_replicas)
    keras.utils.set_random_seed(config.seed)  # weight initialisation

    dataset = load_dataset(config.data, config.seed)
    echo(
        f"Data: {dataset.origin}: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{len(dataset.class_names)} classes ({time.perf_counter() - started:.1f}s)"
    )
    info = _dataset_info(dataset)
    wd.root.mkdir(parents=True, exist_ok=True)
    save_config(config, wd.config_path)
    wd.write_dataset_info(info)

    per_epoch = steps_per_epoch(len(dataset.train), config.data.batch_size)
    total_steps = config.train.epochs * per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    with runtime.strategy.scope():
        model = build_model(
            config.model.name,
            input_shape=info.image_shape,
            num_classes=len(info.class_names),
            mean=info.mean,
            std=info.std,
            width=config.model.width,
        )
        optimizer = build_optimizer(config.optimizer, per_epoch, config.train.epochs * per_epoch, runtime.loss_scaling)
        optimizer.build(model.trainable_variables)
    store = CheckpointStore(wd.checkpoints, model=model, optimizer=optimizer, keep=config.checkpoint.keep)
    start_step = store.restore_latest() or 0
    if start_step:
        echo(
            f"Resuming from {store.latest} at step {start_step} (epoch {start_step // per_epoch + 1}, "
            f"step {start_step % per_epoch}/{per_epoch} of it); use --fresh to start over"
        )
    if start_step >= total_steps:
        echo(
            f"Already trained to step {start_step} of {total_steps}; nothing to do (raise train.epochs or use --fresh)"
        )
        return TrainResult(start_step, total_steps, 0.0, 0.0, None, wd.root)

    loop = TrainingLoop(config, runtime, model, optimizer, dataset, per_epoch, total_steps, wd, store, echo)
    return loop.run(start_step, started)


def _dataset_info(dataset: Dataset) -> DatasetInfo:
    mean, std = normalization_stats(dataset.train.images)
    return DatasetInfo(
        class_names=list(dataset.class_names),
        image_shape=list(dataset.image_shape),
        mean=mean,
        std=std,
        origin=dataset.origin,
    )


def make_train_loop(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    *,
    global_batch: int,
    num_classes: int,
    label_smoothing: float,
):
    """A compiled function running `num_steps` steps; returns summed [loss, correct, count]."""

    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(tf.cast(images, tf.float32), training=True)
            losses = per_example_loss(labels, logits, num_classes, label_smoothing)
            # Divide by the GLOBAL batch: the optimizer sums gradients over replicas.
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled_loss = optimizer.scale_loss(loss)  # identity unless LossScaleOptimizer
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        return tf.stack(
            [
                tf.reduce_sum(losses),
                tf.reduce_sum(tf.cast(correct, tf.float32)),
                tf.cast(tf.size(labels), tf.float32),
            ]
        )

    @tf.function
    def train_loop(iterator, num_steps):
        totals = tf.zeros([3])
        for _ in tf.range(num_steps):
            per_replica = strategy.run(train_step, args=next(iterator))
            totals += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals

    return train_loop


class TrainingLoop:
    """The controller: owns when to log, evaluate and checkpoint."""

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        model,
        optimizer,
        dataset: Dataset,
        per_epoch: int,
        total_steps: int,
        wd: Workdir,
        store: CheckpointStore,
        echo: Echo,
    ) -> None:
        self.config, self.runtime, self.model, self.optimizer = config, runtime, model, optimizer
        self.per_epoch, self.total_steps, self.wd, self.store, self.echo = per_epoch, total_steps, wd, store, echo
        self.global_batch = config.data.batch_size
        strategy = runtime.strategy
        self.train_loop = make_train_loop(
            strategy,
            model,
            optimizer,
            global_batch=self.global_batch,
            num_classes=len(dataset.class_names),
            label_smoothing=config.optimizer.label_smoothing,
        )
        self.dataset = dataset
        self.evaluator = Evaluator(strategy, model, dataset.test, self.global_batch, dataset.class_names)
        self.train_writer = tf.summary.create_file_writer(str(wd.tensorboard / "train"))
        self.eval_writer = tf.summary.create_file_writer(str(wd.tensorboard / "eval"))

    def _iterator(self, start_step: int):
        spec = InputSpec(
            global_batch=self.global_batch,
            seed=self.config.seed,
            augment=self.config.data.augment,
            crop_padding=self.config.data.crop_padding,
        )
        fn = train_dataset_fn(self.dataset.train.images, self.dataset.train.labels, spec, start_step, self.total_steps)
        return iter(self.runtime.strategy.distribute_datasets_from_function(fn))

    def _next_stop(self, step: int) -> int:
        """The next step at which the controller must act."""
        epoch_end = (step // self.per_epoch + 1) * self.per_epoch
        stops = [self.total_steps, epoch_end, step + self.config.train.steps_per_loop]
        every = self.config.checkpoint.every_steps
        if every:
            stops.append((step // every + 1) * every)
        return min(stops)

    def run(self, start_step: int, started: float) -> TrainResult:
        iterator = self._iterator(start_step)
        step, last_eval = start_step, None
        trained_images, train_seconds, traced = 0, 0.0, False
        progress, epoch_sums = None, [0.0, 0.0, 0.0]
        epochs = -(-self.total_steps // self.per_epoch)
        while step < self.total_steps:
            epoch = step // self.per_epoch
            if progress is None:
                self.echo(f"Epoch {epoch + 1}/{epochs}")
                progress = progress_bar(min(self.per_epoch, self.total_steps - epoch * self.per_epoch), self.echo)
                epoch_start, epoch_sums = epoch * self.per_epoch, [0.0, 0.0, 0.0]
            num_steps = self._next_stop(step) - step
            tick = time.perf_counter()
            sums = self.train_loop(iterator, tf.constant(num_steps)).numpy()
            seconds = time.perf_counter() - tick
            step += num_steps
            images_per_second = num_steps * self.global_batch / seconds
            if traced:  # the first call includes tracing; keep it out of the speed
                trained_images += num_steps * self.global_batch
                train_seconds += seconds
            traced = True
            epoch_sums = [a + b for a, b in zip(epoch_sums, sums)]
            self._log_train(step, sums, images_per_second)
            progress.update(
                step - epoch_start,
                values=[
                    ("loss", epoch_sums[0] / epoch_sums[2]),
                    ("accuracy", epoch_sums[1] / epoch_sums[2]),
                    ("img/s", round(images_per_second)),
                ],
            )
            epoch_done = step % self.per_epoch == 0 or step == self.total_steps
            if epoch_done:
                progress = None
                if (epoch + 1) % self.config.train.eval_every_epochs == 0 or step == self.total_steps:
                    last_eval = self._evaluate(step)
            every = self.config.checkpoint.every_steps
            if epoch_done or (every and step % every == 0):
                self.store.save(step, step // self.per_epoch)
        self.train_writer.flush()
        self.eval_writer.flush()
        if last_eval is not None:
            last_eval.write(self.wd.metrics_path)
        speed = trained_images / train_seconds if train_seconds else 0.0
        total = time.perf_counter() - started
        self.echo(
            f"Done: step {step}, {total:.0f}s in all, {speed:.0f} img/s; checkpoints in {self.wd.checkpoints}; "
            f"TensorBoard: tensorboard --logdir {self.wd.tensorboard}"
        )
        return TrainResult(step, self.total_steps, total, speed, last_eval, self.wd.root)

    def _log_train(self, step: int, sums, images_per_second: float) -> None:
        with self.train_writer.as_default(step=step):
            tf.summary.scalar("loss", sums[0] / sums[2])
            tf.summary.scalar("accuracy", sums[1] / sums[2])
            tf.summary.scalar("learning_rate", current_learning_rate(self.optimizer))
            tf.summary.scalar("images_per_second", images_per_second)
            tf.summary.scalar("epoch", step / self.per_epoch)

    def _evaluate(self, step: int) -> EvalMetrics:
        tick = time.perf_counter()
        metrics = self.evaluator(step)
        with self.eval_writer.as_default(step=step):
            tf.summary.scalar("loss", metrics.loss)
            tf.summary.scalar("accuracy", metrics.accuracy)
        self.echo(
            f"Eval at step {step}: accuracy {metrics.accuracy:.2%}, loss {metrics.loss:.4f} "
            f"({metrics.examples} images, {time.perf_counter() - tick:.1f}s)"
        )
        return metrics


class PlainProgress:
    """Progress for logs (CI, pipes, `--workers` prefixes): a whole line every `interval` s."""

    def __init__(self, target: int, echo: Echo, interval: float = 15.0) -> None:
        self.target, self.echo, self.interval = target, echo, interval
        self.start = self.last = time.perf_counter()

    def update(self, current: int, values: list[tuple[str, float]]) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and current < self.target:
            return
        self.last = now
        eta = (now - self.start) / max(current, 1) * (self.target - current)
        shown = " - ".join(f"{name}: {value:.4g}" for name, value in values)
        self.echo(f"  step {current}/{self.target} - {shown} - ETA {eta:.0f}s")


def progress_bar(target: int, echo: Echo):
    """Keras' Progbar in a terminal; plain periodic lines otherwise (it assumes a terminal)."""
    if sys.stdout.isatty():
        return keras.utils.Progbar(target, unit_name="step", stateful_metrics=["loss", "accuracy", "img/s"])
    return PlainProgress(target, echo)
