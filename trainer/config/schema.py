"""The config's keys: one dataclass per section, each field with its default, meaning and limits.

A key is declared once, here: its type, its default, the comment that says what it does,
and, in the field's metadata, what values are valid (`bounded` for numbers, `choice` for
words). trainer.config.loading reads that metadata to check a config; the rules that tie
keys together are in trainer.config.rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric key, kept in its field's metadata under "bounds".

    Declared with `bounded`; a value outside is refused once the whole config is read,
    naming the key, the value and the range.
    """

    minimum: float | None = None  # None: no lower bound
    inclusive: bool = True  # whether `minimum` itself is valid
    maximum: float | None = None  # inclusive
    below: float | None = None  # exclusive: for rates and fractions that must stay under 1


def bounded(
    default: float,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
) -> Any:
    """A numeric field whose value must be >= minimum (or > above) and <= maximum (or < below).

    Upper bounds are there because sizes past them are typos (1e8 for 128), not experiments,
    and would only fail later, deep inside TensorFlow, after minutes of work.
    """
    if minimum is not None and above is not None:
        raise TypeError("give minimum (inclusive) or above (exclusive), not both")
    bounds = Bounds(
        minimum=above if above is not None else minimum, inclusive=above is None, maximum=maximum, below=below
    )
    return field(default=default, metadata={"bounds": bounds})


def choice(default: str, *choices: str) -> Any:
    """A word field: one of `choices` (kept in its metadata, listed by `launch config keys`)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    source: str = choice("cifar10", "cifar10", "folder", "tfrecord", "synthetic")
    # Dataset folder (local or any tf.io.gfile URL: gs://, ram://). cifar10: searched first,
    # then $CIFAR10_DIR, then the Keras cache. folder: root/train/<class>/ + root/test/<class>/,
    # or one root/<class>/ tree split by validation_split. tfrecord: a folder of shards or a
    # glob (root/train-*.tfrecord), with labels.txt beside them.
    path: str = ""
    # Training resolution (square, pixels). 0 = the dataset's own size when its images share
    # one (32 for CIFAR-10); required for photos of mixed sizes. Other sizes are resized.
    image_size: int = bounded(0, minimum=0, maximum=8192)
    # folder source with one root/<class>/ tree: this fraction of each class (chosen by the
    # seed) is held out as the test split, as keras.utils.image_dataset_from_directory does.
    validation_split: float = bounded(0.0, minimum=0, below=1)
    # memory: decode every image once and keep the uint8 pixels in RAM (fastest). none:
    # stream, decoding each image each epoch (any dataset size). auto: memory when the
    # decoded images fit in cache_budget_gb and the crop recipe loses nothing by it.
    cache: str = choice("auto", "auto", "memory", "none")
    cache_budget_gb: float = bounded(4.0, minimum=0, maximum=2**20)
    # An image that cannot be decoded: error (stop, naming the file) or skip (it is left out,
    # counted and reported; the same files are left out on every worker and after a resume).
    on_bad_image: str = choice("error", "error", "skip")
    # The GLOBAL batch: split evenly over all replicas, so results do not depend on them.
    batch_size: int = bounded(128, minimum=1, maximum=2**20)
    # Random crops and horizontal flips of training images.
    augment: bool = True
    # The crop recipe. pad: pad-and-random-crop at the training size (CIFAR's). random_resized:
    # a random area (crop_min_area..1 of the photo, aspect 3/4..4/3) resized to image_size for
    # training, a central 87.5% crop for evaluation (the ImageNet recipe). auto: pad up to
    # 64 pixels, random_resized above.
    crop: str = choice("auto", "auto", "pad", "random_resized")
    crop_min_area: float = bounded(0.08, above=0, maximum=1)
    # Pixels of padding before the random crop (0 = flip only).
    crop_padding: int = bounded(4, minimum=0, maximum=1024)
    # How the crop's border is filled: zeros, or a mirror of the image (airbench's way;
    # no flat borders, which also keeps max pooling away from ties).
    pad_mode: str = choice("zeros", "zeros", "reflect")
    # random: each image flipped with p=0.5 each epoch. alternating (airbench): random in
    # the first epoch, then each image is flipped in every other epoch, so consecutive
    # epochs always see both orientations.
    flip: str = choice("random", "random", "alternating")
    # Where training batches are made. host: a tf.data pipeline on the CPU. device: the
    # training set kept on every accelerator, each batch gathered and augmented there, in
    # the compiled step (airbench's way). auto: device on GPUs, host on CPUs and TPUs.
    # The batches are the same either way, so a run may resume with the other one.
    placement: str = choice("auto", "auto", "host", "device")
    # Use only the first N training / test examples (0 = all): for tests and smoke runs.
    train_examples: int = bounded(0, minimum=0)
    test_examples: int = bounded(0, minimum=0)
    # Synthetic source only: examples per split and number of classes.
    synthetic_train_size: int = bounded(2048, minimum=1, maximum=10_000_000)
    synthetic_test_size: int = bounded(512, minimum=1, maximum=10_000_000)
    synthetic_classes: int = bounded(10, minimum=2, maximum=100_000)


# Keras Applications backbones offered as model.name: the one list of them. trainer.backbones
# builds its registry from it (how each is built), in this order.
BACKBONE_NAMES = (
    "resnet50",
    "resnet50_v2",
    "densenet121",
    "efficientnetv2_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
)


@dataclass
class ModelConfig:
    """Which network to build (see trainer.models for the registry)."""

    name: str = choice("paper_cnn", "paper_cnn", "resnet_small", "airbench", *BACKBONE_NAMES)
    # Our nets: channels of the first convolution; later stages scale from it. Backbones
    # have their own widths and ignore it.
    width: int = bounded(32, minimum=1, maximum=4096)
    # Backbones only. Where the backbone's starting weights come from: none (random, works
    # offline), imagenet (Keras downloads them once into ~/.keras/models), or a file: a
    # .keras model (one of our exports, or a saved backbone) or a backbone's .h5/.weights.h5.
    weights: str = "none"
    # Dropout before the classification head (backbones only).
    head_dropout: float = bounded(0.2, minimum=0, below=1)
    # Momentum of the backbone's BatchNorm statistics (0 = the Keras network's own). Keras'
    # MobileNetV3 uses 0.999, made for ImageNet's million-step runs: after a few thousand
    # steps its statistics are still mostly the initial ones, and evaluations show chance.
    batchnorm_momentum: float = bounded(0.9, minimum=0, below=1)
    # Fine-tuning: train only the head while the backbone stays fixed (its BatchNorm in
    # inference mode)...
    freeze_backbone: bool = False
    # ...until this many epochs are done (0 = frozen for the whole run); from then on the
    # backbone trains too, its BatchNorm still in inference mode (Keras' transfer-learning rule)...
    unfreeze_at_epoch: int = bounded(0, minimum=0, maximum=100_000)
    # ...at this fraction (or multiple) of the learning rate (sgd only: a gradient multiplier,
    # which Adam's normalisation would cancel).
    backbone_lr_multiplier: float = bounded(1.0, above=0, maximum=10**6)


# The model keys only backbones read, in the order an error names them: on our own nets
# each must keep its ModelConfig default (trainer.config.rules).
BACKBONE_ONLY_KEYS = ("weights", "freeze_backbone", "unfreeze_at_epoch", "backbone_lr_multiplier", "batchnorm_momentum")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and loss regularisation."""

    name: str = choice("sgd", "sgd", "adam", "adamw")
    # Peak learning rate for the global batch. Tests make runs diverge on purpose with 1e12;
    # past it a value is no experiment, and 1e300 is infinite once the optimizer casts it
    # to float32.
    learning_rate: float = bounded(0.05, above=0, maximum=10**12)
    # After the warm-up: constant, cosine to 0, or linear to 0 (airbench's triangle).
    schedule: str = choice("cosine", "constant", "cosine", "linear")
    # Linear warm-up to learning_rate, in epochs (fractions allowed)...
    warmup_epochs: float = bounded(0.0, minimum=0, maximum=100_000)
    # ...from this fraction of it (airbench: 0.2)...
    initial_lr_fraction: float = 0.0
    # ...and, for cosine and linear, down to this fraction at the last step (airbench: 0.07).
    # (Both fractions are checked with the rules: their message names learning_rate.)
    final_lr_fraction: float = 0.0
    # Below 1: 1 never forgets a gradient; more grows every update.
    momentum: float = bounded(0.9, minimum=0, below=1)
    nesterov: bool = True
    # Decoupled weight decay (Keras optimizers' `weight_decay`), per step, times the LR
    # (its upper bound, 1/learning_rate, is one of the rules).
    weight_decay: float = bounded(0.0, minimum=0)
    # BatchNorm shifts (beta) learn this many times faster than the other weights (their
    # gradients are multiplied before the update; they are never decayed). airbench: 64.
    bias_lr_multiplier: float = bounded(1.0, above=0, maximum=10**6)
    label_smoothing: float = bounded(0.0, minimum=0, below=1)
    # Exponential moving average of the weights (Keras `use_ema`), 0 = off. Evaluations,
    # the final checkpoint and exports use the averaged weights; e.g. 0.99.
    ema_momentum: float = bounded(0.0, minimum=0, below=1)
    # airbench's lookahead: every N steps (0 = off) from `lookahead_start_epochs` on, a slow
    # copy of the weights moves toward the live ones, which are then reset to it (and at
    # each epoch's end). Its decay is lookahead_decay**N * (step / total steps)**3: weak
    # early, strong as training ends. airbench: 5, 3, 0.95.
    lookahead_every_steps: int = bounded(0, minimum=0, maximum=10**9)
    lookahead_start_epochs: float = bounded(3.0, minimum=0, maximum=100_000)
    lookahead_decay: float = bounded(0.95, above=0, below=1)


@dataclass
class EvalConfig:
    """How the test set is evaluated."""

    # Test-time augmentation for the final evaluation and `launch evaluate`: none, flip
    # (average the logits of each image and its mirror) or flip_translate (airbench's
    # 6 views: those two, each also shifted by one pixel up-left and down-right).
    # Evaluations during training stay single-view: they are for the curve, not the score.
    tta: str = choice("none", "none", "flip", "flip_translate")


@dataclass
class TrainConfig:
    """How long to train and how often the controller looks up."""

    epochs: int = bounded(10, minimum=1, maximum=100_000)
    # Stop after this many global steps (0 = no limit): for tests and smoke runs.
    max_steps: int = bounded(0, minimum=0, maximum=10**12)
    # Steps run inside one compiled call; logging and checkpoints happen between calls.
    steps_per_loop: int = bounded(20, minimum=1, maximum=10**6)
    # Evaluate on the test split every N epochs (and always at the end).
    eval_every_epochs: int = bounded(1, minimum=1, maximum=100_000)
    # A non-finite loss: `stop` the run (keeping the last good checkpoint) or `skip_step`
    # (drop that step's update, as loss scaling does for overflowing gradients).
    nan_policy: str = choice("stop", "stop", "skip_step")


@dataclass
class RuntimeConfig:
    """Devices, distribution strategy and numeric precision."""

    strategy: str = choice("auto", "auto", "cpu", "gpu", "mirrored", "multi_worker", "tpu")
    precision: str = choice("auto", "auto", "float32", "mixed_float16", "mixed_bfloat16")
    # XLA for the forward/backward pass: auto = on for GPU/TPU, off on CPU (slower there).
    jit_compile: str = choice("auto", "auto", "true", "false")
    # Split the CPU into N logical devices and mirror across them (tests, no GPU needed).
    cpu_replicas: int = bounded(1, minimum=1, maximum=256)
    # TPU to connect to: "" (auto: the local TPU VM if any), "local", a name or grpc://host:port.
    tpu: str = ""
    # Multi-worker all-reduce: auto (NCCL on GPUs, ring elsewhere), ring or nccl.
    collective: str = choice("auto", "auto", "ring", "nccl")
    # Turn on TensorFlow op determinism (bit-identical reruns on CPU; slower on GPU).
    deterministic: bool = False
    # How long a worker waits for the rest of its cluster (or a grpc:// TPU) to answer
    # before it gives up with one line; pods of a job may take minutes to be scheduled.
    connect_timeout_s: float = bounded(900.0, minimum=1, maximum=7 * 86_400)


@dataclass
class CheckpointConfig:
    """When checkpoints are written under WORKDIR/checkpoints."""

    # Save every N global steps as well as at each epoch end (0 = epoch ends only).
    every_steps: int = bounded(0, minimum=0, maximum=10**12)
    # Also save when this many minutes passed since the last save (0 = off).
    every_minutes: float = bounded(0.0, minimum=0, maximum=10**6)
    # How many recent checkpoints to keep on disk.
    keep: int = bounded(3, minimum=1, maximum=10_000)
    # Keep the checkpoint with the best eval accuracy in checkpoints/best/.
    keep_best: bool = True
    # Workdirs on gs:// and other stores without file locks: the trainer's lease is renewed
    # every quarter of this and taken over by another trainer this long after its holder
    # died (SIGKILL, a vanished VM). Local workdirs use flock, which needs no expiry.
    lease_seconds: float = bounded(120.0, minimum=2, maximum=86_400)


@dataclass
class TensorBoardConfig:
    """What goes to WORKDIR/tensorboard beyond the basic scalars."""

    # Training scalars every N steps: a multiple of train.steps_per_loop (0 = every loop).
    every_steps: int = bounded(0, minimum=0, maximum=10**12)
    # Histograms of weights and activations every N steps (0 = off; they cost time and disk).
    histogram_every_steps: int = bounded(0, minimum=0, maximum=10**12)
    # Global steps "START:END" to trace with the TensorFlow profiler ("" = off).
    profile_steps: str = ""
    # Input grid at the start; confusion matrix and misclassified images at each eval.
    images: bool = True


@dataclass
class Config:
    """One experiment: everything `launch train` needs besides the workdir."""

    seed: int = bounded(0, minimum=0, maximum=2**31 - 1)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
