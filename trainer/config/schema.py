"""The config's keys: one dataclass per section, each field with its default, meaning and limits.

A key is declared once, here: its type, its default, its meaning (one line in the field's
metadata under "help", printed by `launch config keys`; a comment above it where there is
more to say), and what values are valid (`bounded` for numbers, `choice` for words, `setting`
for a key without limits). trainer.config.loading reads that metadata to check a config and
to describe it; the rules that tie keys together are in trainer.config.rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config.fields import bounded, choice, section, setting


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    source: str = choice(
        "cifar10", "cifar10", "folder", "tfrecord", "synthetic", help="Where the images come from (see data.path)."
    )
    # Local or any tf.io.gfile URL (gs://, ram://). cifar10: searched first, then
    # $CIFAR10_DIR, then the Keras cache. folder: root/train/<class>/ + root/test/<class>/,
    # or one root/<class>/ tree split by validation_split. tfrecord: a folder of shards or a
    # glob (root/train-*.tfrecord), with labels.txt beside them.
    path: str = setting("", help="Dataset folder, local or a tf.io.gfile URL (gs://...).")
    # 32 for CIFAR-10; required for photos of mixed sizes. Other sizes are resized.
    image_size: int = bounded(
        0,
        minimum=0,
        maximum=8192,
        help="Training resolution in pixels (square); 0 = the images' own size when they share one.",
    )
    # Chosen by the seed, as keras.utils.image_dataset_from_directory does.
    validation_split: float = bounded(
        0.0,
        minimum=0,
        below=1,
        help="A folder source of one <class>/ tree: the fraction of each class held out as the test split.",
    )
    # memory: decode every image once and keep the uint8 pixels in RAM (fastest). none:
    # stream, decoding each image each epoch (any dataset size). auto: memory when the
    # decoded images fit in cache_budget_gb and the crop recipe loses nothing by it.
    cache: str = choice(
        "auto",
        "auto",
        "memory",
        "none",
        help="Decoded images kept in RAM (memory), decoded each epoch (none), or chosen by size (auto).",
    )
    cache_budget_gb: float = bounded(
        4.0, minimum=0, maximum=2**20, help="The memory (GB) data.cache=auto may use for decoded images."
    )
    # skip: the image is left out, counted and reported; the same files are left out on
    # every worker and after a resume.
    on_bad_image: str = choice(
        "error", "error", "skip", help="An image that cannot be decoded: stop, naming the file, or leave it out."
    )
    # So results do not depend on the number of replicas.
    batch_size: int = bounded(128, minimum=1, maximum=2**20, help="The GLOBAL batch, split evenly over all replicas.")
    augment: bool = setting(True, help="Random crops and horizontal flips of training images.")
    # pad: pad-and-random-crop at the training size (CIFAR's). random_resized: a random area
    # (crop_min_area..1 of the photo, aspect 3/4..4/3) resized to image_size for training, a
    # central 87.5% crop for evaluation (the ImageNet recipe). auto: pad up to 64 pixels,
    # random_resized above.
    crop: str = choice(
        "auto", "auto", "pad", "random_resized", help="The crop recipe: CIFAR's pad-and-crop or ImageNet's."
    )
    crop_min_area: float = bounded(
        0.08, above=0, maximum=1, help="Smallest crop area of random_resized, as a fraction of the image."
    )
    crop_padding: int = bounded(
        4, minimum=0, maximum=1024, help="Pixels of padding before the random crop (0 = flips only)."
    )
    # reflect: airbench's way; no flat borders, which also keeps max pooling away from ties.
    pad_mode: str = choice(
        "zeros", "zeros", "reflect", help="How the crop's padding is filled: zeros or a mirror of the image."
    )
    # random: each image flipped with p=0.5 each epoch. alternating (airbench): random in
    # the first epoch, then each image is flipped in every other epoch, so consecutive
    # epochs always see both orientations.
    flip: str = choice(
        "random", "random", "alternating", help="Horizontal flips: at random, or each image every other epoch."
    )
    # Keras' own layers (RandAugment, MixUp, CutMix), applied to each replica's batch in the
    # train step, their draws keyed by (seed, global step, replica): a resumed run mixes the
    # same pairs. Independent of data.augment. With both mixup and cutmix, each batch gets one
    # of them (p=1/2). Mixed labels are soft: the training accuracy counts the dominant class.
    randaugment_ops: int = bounded(
        0, minimum=0, maximum=11, help="RandAugment: operations per image, of Keras' 11 (0 = off; 2 is usual)."
    )
    # Keras' factor: each operation's strength is drawn from [0, magnitude].
    randaugment_magnitude: float = bounded(
        0.5, above=0, maximum=1, help="RandAugment: the strongest operation, as a fraction of Keras' range."
    )
    mixup_alpha: float = bounded(
        0.0, minimum=0, maximum=1, help="MixUp: pairs blended by a Beta(alpha, alpha) weight (0 = off; e.g. 0.2)."
    )
    cutmix_alpha: float = bounded(
        0.0, minimum=0, maximum=1, help="CutMix: a patch pasted over a Beta(alpha, alpha) share (0 = off; paper: 1)."
    )
    # balanced: n_samples / (n_classes * count of the class), as scikit-learn and Keras define
    # it, from the training split's labels. Or name:weight pairs, e.g. "cat:2, dog:0.5";
    # classes left out weigh 1. Each example's loss is multiplied by its class's weight and
    # the sum divided by the batch, as Keras' fit(class_weight=...) does.
    class_weights: str = setting("", help='Per-class loss weights: balanced, or "name:weight, ..." ("" = off).')
    # host: a tf.data pipeline on the CPU. device: the training set kept on every
    # accelerator, each batch gathered and augmented there, in the compiled step (airbench's
    # way). auto: device on GPUs, host on CPUs and TPUs. The batches are the same either
    # way, so a run may resume with the other one.
    placement: str = choice(
        "auto", "auto", "host", "device", help="Where training batches are made: by tf.data or on the device."
    )
    # A tf.data service dispatcher (`launch data serve --dispatcher`); placement=host only.
    service: str = setting("", help="tf.data service dispatcher host:port for training batches ('' = this process).")
    service_timeout_s: float = bounded(
        600.0, above=0, maximum=86_400, help="data.service: a call waiting longer for batches stops the run (exit 75)."
    )
    train_examples: int = bounded(
        0, minimum=0, help="Use only the first N training examples (0 = all): for tests and smoke runs."
    )
    test_examples: int = bounded(
        0, minimum=0, help="Use only the first N test examples (0 = all): for tests and smoke runs."
    )
    synthetic_train_size: int = bounded(
        2048, minimum=1, maximum=10_000_000, help="Synthetic source: training examples."
    )
    synthetic_test_size: int = bounded(512, minimum=1, maximum=10_000_000, help="Synthetic source: test examples.")
    synthetic_classes: int = bounded(10, minimum=2, maximum=100_000, help="Synthetic source: number of classes.")


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

    # Or the user's own: `package.module:function`, imported when the model is built
    # (trainer.user_code; its contract in trainer.models.build_user_model).
    name: str = field(
        default="paper_cnn",
        metadata={
            "choices": ("paper_cnn", "resnet_small", "airbench", *BACKBONE_NAMES),
            "import_path": True,
            "help": "The network: one of ours, a Keras Applications backbone, or your own as package.module:function.",
        },
    )
    width: int = bounded(
        32, minimum=1, maximum=4096, help="Our nets: channels of the first convolution (backbones ignore it)."
    )
    # none works offline; imagenet: Keras downloads them once into ~/.keras/models; a file:
    # a .keras model (one of our exports, or a saved backbone) or a backbone's .h5/.weights.h5.
    weights: str = setting("none", help="Backbones: starting weights: none (random), imagenet or a file.")
    head_dropout: float = bounded(0.2, minimum=0, below=1, help="Backbones: dropout before the classification head.")
    # Keras' MobileNetV3 uses 0.999, made for ImageNet's million-step runs: after a few
    # thousand steps its statistics are still mostly the initial ones, and evaluations show chance.
    batchnorm_momentum: float = bounded(
        0.9,
        minimum=0,
        below=1,
        help="Backbones: momentum of the BatchNorm statistics (0 = the Keras network's own).",
    )
    # Fine-tuning: the backbone's BatchNorm stays in inference mode (Keras' transfer-learning
    # rule), also once unfreeze_at_epoch lets its weights train.
    freeze_backbone: bool = setting(False, help="Backbones: train only the head; the backbone stays fixed.")
    unfreeze_at_epoch: int = bounded(
        0,
        minimum=0,
        maximum=100_000,
        help="With freeze_backbone: the backbone trains too after this many epochs (0 = never).",
    )
    # A gradient multiplier, which Adam's normalisation would cancel: sgd only.
    backbone_lr_multiplier: float = bounded(
        1.0, above=0, maximum=10**6, help="The backbone's learning rate as a multiple of the head's (sgd only)."
    )


# The model keys only backbones read, in the order an error names them: on our own nets
# each must keep its ModelConfig default (trainer.config.rules).
BACKBONE_ONLY_KEYS = ("weights", "freeze_backbone", "unfreeze_at_epoch", "backbone_lr_multiplier", "batchnorm_momentum")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and loss regularisation."""

    name: str = choice("sgd", "sgd", "adam", "adamw", help="The optimizer.")
    # Tests make runs diverge on purpose with 1e12; past it a value is no experiment, and
    # 1e300 is infinite once the optimizer casts it to float32.
    learning_rate: float = bounded(0.05, above=0, maximum=10**12, help="Peak learning rate for the global batch.")
    schedule: str = choice(
        "cosine",
        "constant",
        "cosine",
        "linear",
        "plateau",
        help="The LR after the warm-up: constant, a cosine or linear decay, or cut on plateaus.",
    )
    warmup_epochs: float = bounded(
        0.0, minimum=0, maximum=100_000, help="Linear warm-up to learning_rate, in epochs (fractions allowed)."
    )
    # Both fractions are checked with the rules: their message names learning_rate.
    initial_lr_fraction: float = setting(0.0, help="Where the warm-up starts, as a fraction of learning_rate.")
    final_lr_fraction: float = setting(0.0, help="Where cosine and linear end, as a fraction of learning_rate.")
    # Below 1: 1 never forgets a gradient; more grows every update.
    momentum: float = bounded(0.9, minimum=0, below=1, help="SGD momentum.")
    nesterov: bool = setting(True, help="Nesterov momentum (SGD).")
    # Its upper bound, 1/learning_rate, is one of the rules.
    weight_decay: float = bounded(
        0.0, minimum=0, help="Decoupled weight decay (Keras weight_decay), per step, times the learning rate."
    )
    # Their gradients are multiplied before the update; they are never decayed. airbench: 64.
    bias_lr_multiplier: float = bounded(
        1.0, above=0, maximum=10**6, help="BatchNorm shifts (beta) learn this many times faster."
    )
    label_smoothing: float = bounded(0.0, minimum=0, below=1, help="Label smoothing of the cross-entropy.")
    # Keras `use_ema`. Evaluations, the final checkpoint and exports use the averaged weights.
    ema_momentum: float = bounded(
        0.0, minimum=0, below=1, help="Exponential moving average of the weights (0 = off; e.g. 0.99)."
    )
    # airbench's lookahead: every N steps from `lookahead_start_epochs` on, a slow copy of
    # the weights moves toward the live ones, which are then reset to it (and at each
    # epoch's end). Its decay is lookahead_decay**N * (step / total steps)**3: weak early,
    # strong as training ends. airbench: 5, 3, 0.95.
    lookahead_every_steps: int = bounded(
        0, minimum=0, maximum=10**9, help="Lookahead: reset the weights to a slow copy every N steps (0 = off)."
    )
    lookahead_start_epochs: float = bounded(3.0, minimum=0, maximum=100_000, help="Lookahead: the epoch it starts at.")
    lookahead_decay: float = bounded(
        0.95, above=0, below=1, help="Lookahead: the slow copy's decay (closer to 1: it follows more slowly)."
    )
    # data.batch_size stays the batch of one update (so steps, epochs and the LR schedule
    # count updates); each replica's share goes through the model as N micro-batches,
    # unrolled in the compiled step: 64 at most (k=64 already triples a smoke run's tracing).
    gradient_accumulation_steps: int = bounded(
        1,
        minimum=1,
        maximum=64,
        help="Sum the gradients of N micro-batches per update (1 = off); steps and the LR count updates.",
    )
    # schedule=plateau (Keras' ReduceLROnPlateau, on the test accuracy): after `patience`
    # evaluations in a row without a rise over the best so far, the LR is multiplied by
    # `factor`, never below `min_lr`; the count starts again after each cut. The checkpoint
    # holds the cut LR and the count, so a resumed run goes on with both.
    plateau_factor: float = bounded(
        0.1, above=0, below=1, help="schedule=plateau: the LR is multiplied by this on a plateau."
    )
    plateau_patience: int = bounded(
        5, minimum=1, maximum=100_000, help="schedule=plateau: evaluations in a row without a gain that cut the LR."
    )
    plateau_min_lr: float = bounded(0.0, minimum=0, help="schedule=plateau: the LR is never cut below this.")


@dataclass
class EvalConfig:
    """How the test set is evaluated."""

    # none, flip (average the logits of each image and its mirror) or flip_translate
    # (airbench's 6 views: those two, each also shifted by one pixel up-left and down-right).
    # Evaluations during training stay single-view: they are for the curve, not the score.
    tta: str = choice(
        "none",
        "none",
        "flip",
        "flip_translate",
        help="Test-time augmentation of the final evaluation and `launch evaluate`.",
    )


@dataclass
class TrainConfig:
    """How long to train and how often the controller looks up."""

    epochs: int = bounded(10, minimum=1, maximum=100_000, help="Epochs to train (the schedule spans them).")
    max_steps: int = bounded(
        0, minimum=0, maximum=10**12, help="Stop after this many global steps (0 = no limit): for smoke runs."
    )
    steps_per_loop: int = bounded(
        20, minimum=1, maximum=10**6, help="Steps per compiled call; logs and checkpoints happen between calls."
    )
    eval_every_epochs: int = bounded(
        1, minimum=1, maximum=100_000, help="Evaluate on the test split every N epochs (and always at the end)."
    )
    # skip_step: as loss scaling does for overflowing gradients.
    nan_policy: str = choice(
        "stop", "stop", "skip_step", help="A non-finite loss: stop (keeping the last good checkpoint) or skip it."
    )
    early_stopping_patience: int = bounded(
        0, minimum=0, maximum=100_000, help="Stop after N evaluations in a row without a test accuracy gain (0 = off)."
    )
    # A fraction, as accuracies are: 0.005 is half a percentage point.
    early_stopping_min_delta: float = bounded(
        0.0, minimum=0, maximum=1, help="The smallest rise over the best accuracy so far that counts as a gain."
    )
    # Each a factory, called once per run, whose action the chief calls at every logging
    # window (trainer.loop.user_actions); `--set train.actions=a.b:f,c:g`. Read-only: they
    # see numbers, never the model or the loop's state, so a resume stays exact.
    actions: list[str] = field(
        default_factory=list,
        metadata={"help": "Your own actions, as package.module:factory paths, run at every logging window."},
    )


@dataclass
class RuntimeConfig:
    """Devices, distribution strategy and numeric precision."""

    strategy: str = choice(
        "auto", "auto", "cpu", "gpu", "mirrored", "multi_worker", "tpu", help="The distribution strategy."
    )
    precision: str = choice(
        "auto", "auto", "float32", "mixed_float16", "mixed_bfloat16", help="Numeric precision of the layers."
    )
    jit_compile: str = choice(
        "auto", "auto", "true", "false", help="XLA for the forward/backward pass (auto: on for GPU/TPU, off on CPU)."
    )
    cpu_replicas: int = bounded(
        1, minimum=1, maximum=256, help="Split the CPU into N logical devices and mirror across them."
    )
    tpu: str = setting("", help='TPU to use: "" (the local TPU VM if any), "local", a name or grpc://host:port.')
    collective: str = choice(
        "auto", "auto", "ring", "nccl", help="Multi-worker all-reduce (auto: NCCL on GPUs, ring elsewhere)."
    )
    deterministic: bool = setting(False, help="TensorFlow op determinism (bit-identical reruns on CPU).")
    # Pods of a job may take minutes to be scheduled.
    connect_timeout_s: float = bounded(
        900.0,
        minimum=1,
        maximum=7 * 86_400,
        help="Seconds to wait for the rest of the cluster (or a grpc:// TPU) before giving up.",
    )


@dataclass
class CheckpointConfig:
    """When checkpoints are written under WORKDIR/checkpoints."""

    every_steps: int = bounded(
        0, minimum=0, maximum=10**12, help="Also save every N global steps (0 = at epoch ends only)."
    )
    every_minutes: float = bounded(
        0.0, minimum=0, maximum=10**6, help="Also save when this many minutes passed since the last save (0 = off)."
    )
    keep: int = bounded(3, minimum=1, maximum=10_000, help="How many recent checkpoints to keep on disk.")
    keep_best: bool = setting(True, help="Keep the checkpoint with the best eval accuracy in checkpoints/best/.")
    # The lease is renewed every quarter of this and taken over by another trainer this long
    # after its holder died (SIGKILL, a vanished VM). Local workdirs use flock, which needs
    # no expiry.
    lease_seconds: float = bounded(
        120.0, minimum=2, maximum=86_400, help="gs:// workdirs: a dead trainer's lease expires after this long."
    )


@dataclass
class TensorBoardConfig:
    """What goes to WORKDIR/tensorboard beyond the basic scalars."""

    every_steps: int = bounded(
        0, minimum=0, maximum=10**12, help="Training scalars every N steps (0 = every train.steps_per_loop)."
    )
    # They cost time and disk.
    histogram_every_steps: int = bounded(
        0, minimum=0, maximum=10**12, help="Weight and activation histograms every N steps (0 = off)."
    )
    profile_steps: str = setting("", help='Global steps "START:END" to trace with the profiler ("" = off).')
    images: bool = setting(True, help="Input grid, confusion matrix and misclassified images.")


@dataclass
class Config:
    """One experiment: everything `launch train` needs besides the workdir."""

    seed: int = bounded(
        0, minimum=0, maximum=2**31 - 1, help="Seeds weight initialisation, the shuffle and augmentation."
    )
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    train: TrainConfig = section(TrainConfig)
    eval: EvalConfig = section(EvalConfig)
    runtime: RuntimeConfig = section(RuntimeConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    tensorboard: TensorBoardConfig = section(TensorBoardConfig)
