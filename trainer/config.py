"""Experiment configuration: nested dataclasses loaded from YAML, overridden by `--set`.

Every key has one home here, with its default and meaning, so that configs, the CLI and
the README agree. Unknown keys and wrong types fail early with the key's name, the value
received and what would be valid, before any TensorFlow work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainer import files, storage
from trainer.errors import ConfigError


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    """Where the images come from and how they are fed."""

    source: str = _choice("cifar10", "cifar10", "folder", "tfrecord", "synthetic")
    # Dataset folder (local or any tf.io.gfile URL: gs://, ram://). cifar10: searched first,
    # then $CIFAR10_DIR, then the Keras cache. folder: root/train/<class>/ + root/test/<class>/,
    # or one root/<class>/ tree split by validation_split. tfrecord: a folder of shards or a
    # glob (root/train-*.tfrecord), with labels.txt beside them.
    path: str = ""
    # Training resolution (square, pixels). 0 = the dataset's own size when its images share
    # one (32 for CIFAR-10); required for photos of mixed sizes. Other sizes are resized.
    image_size: int = 0
    # folder source with one root/<class>/ tree: this fraction of each class (chosen by the
    # seed) is held out as the test split, as keras.utils.image_dataset_from_directory does.
    validation_split: float = 0.0
    # memory: decode every image once and keep the uint8 pixels in RAM (fastest). none:
    # stream, decoding each image each epoch (any dataset size). auto: memory when the
    # decoded images fit in cache_budget_gb and the crop recipe loses nothing by it.
    cache: str = _choice("auto", "auto", "memory", "none")
    cache_budget_gb: float = 4.0
    # An image that cannot be decoded: error (stop, naming the file) or skip (it is left out,
    # counted and reported; the same files are left out on every worker and after a resume).
    on_bad_image: str = _choice("error", "error", "skip")
    # The GLOBAL batch: split evenly over all replicas, so results do not depend on them.
    batch_size: int = 128
    # Random crops and horizontal flips of training images.
    augment: bool = True
    # The crop recipe. pad: pad-and-random-crop at the training size (CIFAR's). random_resized:
    # a random area (crop_min_area..1 of the photo, aspect 3/4..4/3) resized to image_size for
    # training, a central 87.5% crop for evaluation (the ImageNet recipe). auto: pad up to
    # 64 pixels, random_resized above.
    crop: str = _choice("auto", "auto", "pad", "random_resized")
    crop_min_area: float = 0.08
    # Pixels of padding before the random crop (0 = flip only).
    crop_padding: int = 4
    # How the crop's border is filled: zeros, or a mirror of the image (airbench's way;
    # no flat borders, which also keeps max pooling away from ties).
    pad_mode: str = _choice("zeros", "zeros", "reflect")
    # random: each image flipped with p=0.5 each epoch. alternating (airbench): random in
    # the first epoch, then each image is flipped in every other epoch, so consecutive
    # epochs always see both orientations.
    flip: str = _choice("random", "random", "alternating")
    # Where training batches are made. host: a tf.data pipeline on the CPU. device: the
    # training set kept on every accelerator, each batch gathered and augmented there, in
    # the compiled step (airbench's way). auto: device on GPUs, host on CPUs and TPUs.
    # The batches are the same either way, so a run may resume with the other one.
    placement: str = _choice("auto", "auto", "host", "device")
    # Use only the first N training / test examples (0 = all): for tests and smoke runs.
    train_examples: int = 0
    test_examples: int = 0
    # Synthetic source only: examples per split and number of classes.
    synthetic_train_size: int = 2048
    synthetic_test_size: int = 512
    synthetic_classes: int = 10


# Keras Applications backbones offered as model.name (trainer.models.BACKBONES says how
# each is built; a test checks that the two lists agree).
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

    name: str = _choice("paper_cnn", "paper_cnn", "resnet_small", "airbench", *BACKBONE_NAMES)
    # Our nets: channels of the first convolution; later stages scale from it. Backbones
    # have their own widths and ignore it.
    width: int = 32
    # Backbones only. Where the backbone's starting weights come from: none (random, works
    # offline), imagenet (Keras downloads them once into ~/.keras/models), or a file: a
    # .keras model (one of our exports, or a saved backbone) or a backbone's .h5/.weights.h5.
    weights: str = "none"
    # Dropout before the classification head (backbones only).
    head_dropout: float = 0.2
    # Momentum of the backbone's BatchNorm statistics (0 = the Keras network's own). Keras'
    # MobileNetV3 uses 0.999, made for ImageNet's million-step runs: after a few thousand
    # steps its statistics are still mostly the initial ones, and evaluations show chance.
    batchnorm_momentum: float = 0.9
    # Fine-tuning: train only the head while the backbone stays fixed (its BatchNorm in
    # inference mode)...
    freeze_backbone: bool = False
    # ...until this many epochs are done (0 = frozen for the whole run); from then on the
    # backbone trains too, its BatchNorm still in inference mode (Keras' transfer-learning rule)...
    unfreeze_at_epoch: int = 0
    # ...at this fraction (or multiple) of the learning rate (sgd only: a gradient multiplier,
    # which Adam's normalisation would cancel).
    backbone_lr_multiplier: float = 1.0


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and loss regularisation."""

    name: str = _choice("sgd", "sgd", "adam", "adamw")
    # Peak learning rate for the global batch.
    learning_rate: float = 0.05
    # After the warm-up: constant, cosine to 0, or linear to 0 (airbench's triangle).
    schedule: str = _choice("cosine", "constant", "cosine", "linear")
    # Linear warm-up to learning_rate, in epochs (fractions allowed)...
    warmup_epochs: float = 0.0
    # ...from this fraction of it (airbench: 0.2)...
    initial_lr_fraction: float = 0.0
    # ...and, for cosine and linear, down to this fraction at the last step (airbench: 0.07).
    final_lr_fraction: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    # Decoupled weight decay (Keras optimizers' `weight_decay`), per step, times the LR.
    weight_decay: float = 0.0
    # BatchNorm shifts (beta) learn this many times faster than the other weights (their
    # gradients are multiplied before the update; they are never decayed). airbench: 64.
    bias_lr_multiplier: float = 1.0
    label_smoothing: float = 0.0
    # Exponential moving average of the weights (Keras `use_ema`), 0 = off. Evaluations,
    # the final checkpoint and exports use the averaged weights; e.g. 0.99.
    ema_momentum: float = 0.0
    # airbench's lookahead: every N steps (0 = off) from `lookahead_start_epochs` on, a slow
    # copy of the weights moves toward the live ones, which are then reset to it (and at
    # each epoch's end). Its decay is lookahead_decay**N * (step / total steps)**3: weak
    # early, strong as training ends. airbench: 5, 3, 0.95.
    lookahead_every_steps: int = 0
    lookahead_start_epochs: float = 3.0
    lookahead_decay: float = 0.95


@dataclass
class EvalConfig:
    """How the test set is evaluated."""

    # Test-time augmentation for the final evaluation and `launch evaluate`: none, flip
    # (average the logits of each image and its mirror) or flip_translate (airbench's
    # 6 views: those two, each also shifted by one pixel up-left and down-right).
    # Evaluations during training stay single-view: they are for the curve, not the score.
    tta: str = _choice("none", "none", "flip", "flip_translate")


@dataclass
class TrainConfig:
    """How long to train and how often the controller looks up."""

    epochs: int = 10
    # Stop after this many global steps (0 = no limit): for tests and smoke runs.
    max_steps: int = 0
    # Steps run inside one compiled call; logging and checkpoints happen between calls.
    steps_per_loop: int = 20
    # Evaluate on the test split every N epochs (and always at the end).
    eval_every_epochs: int = 1
    # A non-finite loss: `stop` the run (keeping the last good checkpoint) or `skip_step`
    # (drop that step's update, as loss scaling does for overflowing gradients).
    nan_policy: str = _choice("stop", "stop", "skip_step")


@dataclass
class RuntimeConfig:
    """Devices, distribution strategy and numeric precision."""

    strategy: str = _choice("auto", "auto", "cpu", "gpu", "mirrored", "multi_worker", "tpu")
    precision: str = _choice("auto", "auto", "float32", "mixed_float16", "mixed_bfloat16")
    # XLA for the forward/backward pass: auto = on for GPU/TPU, off on CPU (slower there).
    jit_compile: str = _choice("auto", "auto", "true", "false")
    # Split the CPU into N logical devices and mirror across them (tests, no GPU needed).
    cpu_replicas: int = 1
    # TPU to connect to: "" (auto: the local TPU VM if any), "local", a name or grpc://host:port.
    tpu: str = ""
    # Multi-worker all-reduce: auto (NCCL on GPUs, ring elsewhere), ring or nccl.
    collective: str = _choice("auto", "auto", "ring", "nccl")
    # Turn on TensorFlow op determinism (bit-identical reruns on CPU; slower on GPU).
    deterministic: bool = False
    # How long a worker waits for the rest of its cluster (or a grpc:// TPU) to answer
    # before it gives up with one line; pods of a job may take minutes to be scheduled.
    connect_timeout_s: float = 900.0


@dataclass
class CheckpointConfig:
    """When checkpoints are written under WORKDIR/checkpoints."""

    # Save every N global steps as well as at each epoch end (0 = epoch ends only).
    every_steps: int = 0
    # Also save when this many minutes passed since the last save (0 = off).
    every_minutes: float = 0.0
    # How many recent checkpoints to keep on disk.
    keep: int = 3
    # Keep the checkpoint with the best eval accuracy in checkpoints/best/.
    keep_best: bool = True
    # Workdirs on gs:// and other stores without file locks: the trainer's lease is renewed
    # every quarter of this and taken over by another trainer this long after its holder
    # died (SIGKILL, a vanished VM). Local workdirs use flock, which needs no expiry.
    lease_seconds: float = 120.0


@dataclass
class TensorBoardConfig:
    """What goes to WORKDIR/tensorboard beyond the basic scalars."""

    # Training scalars every N steps: a multiple of train.steps_per_loop (0 = every loop).
    every_steps: int = 0
    # Histograms of weights and activations every N steps (0 = off; they cost time and disk).
    histogram_every_steps: int = 0
    # Global steps "START:END" to trace with the TensorFlow profiler ("" = off).
    profile_steps: str = ""
    # Input grid at the start; confusion matrix and misclassified images at each eval.
    images: bool = True


@dataclass
class Config:
    """One experiment: everything `launch train` needs besides the workdir."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


# Lower bounds checked after loading: key -> (minimum, inclusive).
_MINIMUMS: dict[str, tuple[float, bool]] = {
    "seed": (0, True),
    "data.batch_size": (1, True),
    "data.crop_padding": (0, True),
    "data.image_size": (0, True),
    "data.validation_split": (0, True),
    "data.cache_budget_gb": (0, True),
    "data.crop_min_area": (0, False),
    "data.train_examples": (0, True),
    "data.test_examples": (0, True),
    "data.synthetic_train_size": (1, True),
    "data.synthetic_test_size": (1, True),
    "data.synthetic_classes": (2, True),
    "model.width": (1, True),
    "model.head_dropout": (0, True),
    "model.batchnorm_momentum": (0, True),
    "model.unfreeze_at_epoch": (0, True),
    "model.backbone_lr_multiplier": (0, False),
    "optimizer.learning_rate": (0, False),
    "optimizer.warmup_epochs": (0, True),
    "optimizer.momentum": (0, True),
    "optimizer.weight_decay": (0, True),
    "optimizer.bias_lr_multiplier": (0, False),
    "optimizer.label_smoothing": (0, True),
    "optimizer.ema_momentum": (0, True),
    "optimizer.lookahead_every_steps": (0, True),
    "optimizer.lookahead_start_epochs": (0, True),
    "optimizer.lookahead_decay": (0, False),
    "train.epochs": (1, True),
    "train.max_steps": (0, True),
    "train.steps_per_loop": (1, True),
    "train.eval_every_epochs": (1, True),
    "runtime.cpu_replicas": (1, True),
    "runtime.connect_timeout_s": (1, True),
    "checkpoint.every_steps": (0, True),
    "checkpoint.every_minutes": (0, True),
    "checkpoint.keep": (1, True),
    "checkpoint.lease_seconds": (2, True),
    "tensorboard.every_steps": (0, True),
    "tensorboard.histogram_every_steps": (0, True),
}
# Inclusive upper bounds: sizes past these are typos (1e8 for 128), not experiments, and
# would only fail later, deep inside TensorFlow, after minutes of work.
_MAXIMUMS: dict[str, float] = {
    "seed": 2**31 - 1,
    "data.batch_size": 2**20,
    "data.crop_padding": 1024,
    "data.image_size": 8192,
    "data.cache_budget_gb": 2**20,
    "data.crop_min_area": 1,
    "data.synthetic_train_size": 10_000_000,
    "data.synthetic_test_size": 10_000_000,
    "data.synthetic_classes": 100_000,
    "model.width": 4096,
    "model.backbone_lr_multiplier": 10**6,
    "model.unfreeze_at_epoch": 100_000,
    # Tests make runs diverge on purpose with 1e12; past it a value is no experiment, and
    # 1e300 is infinite once the optimizer casts it to float32.
    "optimizer.learning_rate": 10**12,
    "optimizer.warmup_epochs": 100_000,
    "optimizer.bias_lr_multiplier": 10**6,
    "optimizer.lookahead_every_steps": 10**9,
    "optimizer.lookahead_start_epochs": 100_000,
    "train.epochs": 100_000,
    "train.max_steps": 10**12,
    "train.steps_per_loop": 10**6,
    "train.eval_every_epochs": 100_000,
    "runtime.cpu_replicas": 256,
    "runtime.connect_timeout_s": 7 * 86_400,
    "checkpoint.every_steps": 10**12,
    "checkpoint.every_minutes": 10**6,
    "checkpoint.keep": 10_000,
    "checkpoint.lease_seconds": 86_400,
    "tensorboard.every_steps": 10**12,
    "tensorboard.histogram_every_steps": 10**12,
}
# Exclusive upper bounds: momenta and decays of averages, and label smoothing, stop below 1.
_BELOW: dict[str, float] = {
    "optimizer.momentum": 1,  # 1 never forgets a gradient; more grows every update
    "model.head_dropout": 1,
    "model.batchnorm_momentum": 1,
    "optimizer.label_smoothing": 1,
    "data.validation_split": 1,
    "optimizer.ema_momentum": 1,
    "optimizer.lookahead_decay": 1,
}


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `key=value` overrides, validate.

    Args:
        path: YAML file; None starts from the dataclass defaults.
        overrides: strings like `"data.batch_size=256"`, applied in order.
    """
    raw = {} if path is None else _read_yaml(str(path))
    config = _from_dict(Config, raw, prefix="")
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def _read_yaml(path: str) -> dict[str, Any]:
    """The mapping a YAML config holds; anything else (hostile input included) is one line."""
    kind = storage.special_kind(path)  # /dev/null, a pipe: isfile() says no, yet they exist
    if kind:
        raise ConfigError(f"{path} is not a regular file ({kind}); a config is a YAML file, e.g. configs/smoke.yaml")
    if not storage.isfile(path):
        raise ConfigError(f"config file not found: {path} (the shipped ones are in configs/)")
    try:
        raw = yaml.safe_load(storage.read_text(path)) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {files.short(str(err).replace(chr(10), ' '), 300)}") from None
    except RecursionError:  # PyYAML composes nested [ and { recursively: 5,000 of them exhaust the stack
        raise ConfigError(f"{path} nests lists or mappings thousands of levels deep; a config is two levels") from None
    except ValueError as err:  # a value PyYAML cannot build: a 5,000-digit integer, February 30th
        raise ConfigError(f"{path} holds a value that cannot be read ({files.short(str(err), 100)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(config: Config, override: str) -> None:
    """Apply one `section.key=value`, coercing the text to the field's type."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {shown(override)}")
    target: Any = config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        prefix = ".".join(parts[:depth])
        f = _field_named(target, name, prefix)
        full_key = ".".join(parts[: depth + 1])
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(_resolved_type(target, f)):
                example = f"{full_key}.{_first_key(target, f)}"
                raise ConfigError(f"{full_key} is a section; set one of its keys, e.g. {example}=...")
            setattr(target, name, _coerce_text(full_key, text.strip(), _resolved_type(target, f), f))
        else:
            target = getattr(target, name)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"{full_key} is a key, not a section; use --set {full_key}=VALUE")


def _flat_value(flat: dict[str, Any], key: str):
    if "." not in key:
        return flat[key]
    section, name = key.split(".")
    return flat[section][name]


class _Brief(reprlib.Repr):
    """reprlib, and an integer's digits are not even produced when there are too many of
    them: repr() of a 5,000-digit integer raises ValueError (Python's 4,300-digit limit),
    and YAML reads hexadecimal ones of any length."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 512:
            return super().repr_int(x, level)
        digits = int((x.bit_length() - 1) * math.log10(2)) + 1
        digits += abs(x) >= 10**digits
        return f"<{'a negative' if x < 0 else 'an'} integer of {digits} digits>"


_BRIEF = _Brief()
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong, _BRIEF.maxlevel = 60, 60, 60, 2


def shown(value: Any, limit: int = 80) -> str:
    """A repr of `value` of at most `limit` characters, built without expanding it.

    Error messages stay one short line even for hostile input: a YAML alias bomb is a few
    hundred bytes that `repr` would expand to megabytes.
    """
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(config: Config) -> None:
    """Check ranges and cross-key rules that single fields cannot express."""
    _check_ranges(to_dict(config))
    _check_cross_keys(config)


def _check_ranges(flat: dict[str, Any]) -> None:
    """Values are echoed through `shown`: `--set seed=<4,000 nines>` is one short line too."""
    for key, (minimum, inclusive) in _MINIMUMS.items():
        value = _flat_value(flat, key)
        if value < minimum or (not inclusive and value == minimum):
            raise ConfigError(f"{key} must be {'>=' if inclusive else '>'} {minimum}, got {shown(value)}")
    for key, maximum in _MAXIMUMS.items():
        value = _flat_value(flat, key)
        if value > maximum:
            minimum = _MINIMUMS.get(key, (0, True))[0]
            raise ConfigError(f"{key} must be between {minimum} and {maximum}, got {shown(value)}")
    for key, maximum in _BELOW.items():
        value = _flat_value(flat, key)
        if value >= maximum:
            minimum = _MINIMUMS.get(key, (0, True))[0]
            raise ConfigError(f"{key} must be < {maximum}, got {shown(value)} (the range is [{minimum}, {maximum}))")


def _check_cross_keys(config: Config) -> None:
    if config.optimizer.lookahead_every_steps and config.optimizer.ema_momentum:
        raise ConfigError(
            "optimizer.lookahead_every_steps and optimizer.ema_momentum both average the weights; set one of them to 0"
        )
    _check_weight_decay(config.optimizer)
    for key in ("initial_lr_fraction", "final_lr_fraction"):
        if not 0 <= getattr(config.optimizer, key) <= 1:
            raise ConfigError(
                f"optimizer.{key} must be between 0 and 1 (a fraction of optimizer.learning_rate), "
                f"got {getattr(config.optimizer, key)}"
            )
    spl, every = config.train.steps_per_loop, config.tensorboard.every_steps
    if every % spl:
        raise ConfigError(
            f"tensorboard.every_steps={every} must be a multiple of train.steps_per_loop={spl} "
            "(scalars are written between compiled calls)"
        )
    if config.tensorboard.profile_steps:
        profile_range(config.tensorboard.profile_steps)
    _check_fine_tuning(config)
    if config.data.source in ("folder", "tfrecord") and not config.data.path:
        what = "train/<class>/ and test/<class>/, or <class>/" if config.data.source == "folder" else "TFRecord shards"
        raise ConfigError(f"data.source={config.data.source} needs data.path (a folder with {what})")


def _check_weight_decay(optimizer: OptimizerConfig) -> None:
    """Keras' decoupled decay takes learning_rate * weight_decay of every weight at each
    step: at 1 or more it zeroes (or flips) all the weights at the peak of the schedule."""
    limit = 1 / optimizer.learning_rate
    if optimizer.weight_decay >= limit:
        raise ConfigError(
            f"optimizer.weight_decay must be < {limit:g} (1/optimizer.learning_rate: each step removes "
            f"learning_rate * weight_decay of every weight), got {shown(optimizer.weight_decay)}; "
            f"the range is [0, {limit:g})"
        )


def _check_fine_tuning(config: Config) -> None:
    """Backbone-only keys on our own nets, and fine-tuning settings that would do nothing."""
    model = config.model
    if model.name not in BACKBONE_NAMES:
        used = [key for key, idle in _BACKBONE_ONLY.items() if getattr(model, key) != idle]
        if used:
            raise ConfigError(
                f"model.{used[0]} is for Keras Applications backbones, not model.name={model.name}; "
                f"choose one of {', '.join(BACKBONE_NAMES)}, or leave it out"
            )
    if model.unfreeze_at_epoch and not model.freeze_backbone:
        raise ConfigError("model.unfreeze_at_epoch needs model.freeze_backbone=true (the backbone is never frozen)")
    if model.unfreeze_at_epoch >= config.train.epochs:
        raise ConfigError(
            f"model.unfreeze_at_epoch={model.unfreeze_at_epoch} is not before the last epoch "
            f"(train.epochs={config.train.epochs}): the backbone would never train; lower it, "
            "or use 0 to keep it frozen"
        )
    if model.backbone_lr_multiplier != 1.0 and config.optimizer.name != "sgd":
        raise ConfigError(
            f"model.backbone_lr_multiplier works with optimizer.name=sgd only, got {config.optimizer.name} (it "
            "multiplies the backbone's gradients, which Adam's normalisation cancels); set it to 1 or use sgd"
        )


# Backbone-only model keys and their values that mean "not used".
_BACKBONE_ONLY = {
    "weights": "none",
    "freeze_backbone": False,
    "unfreeze_at_epoch": 0,
    "backbone_lr_multiplier": 1.0,
    "batchnorm_momentum": 0.9,
}


def profile_range(text: str) -> tuple[int, int]:
    """Parse "START:END" global steps for the profiler."""
    start, sep, end = text.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        first = last = -1
    if not sep or first < 0 or last <= first:
        raise ConfigError(
            f"tensorboard.profile_steps must look like START:END with 0 <= START < END, got {shown(text)}"
        )
    return first, last


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically), so a run can be understood and repeated later."""
    files.write_text(path, to_yaml(config))


def config_differences(before: Config, after: Config) -> list[tuple[str, str, str]]:
    """(key, old value, new value) of every leaf key that differs, values shown briefly."""
    old, new = hyperparameter_items(before), hyperparameter_items(after)
    return [(key, shown(old[key], 40), shown(new[key], 40)) for key in old if old[key] != new[key]]


def hyperparameter_items(config: Config) -> dict[str, Any]:
    """Every leaf key as a flat `section.key` -> value."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def describe_keys() -> list[tuple[str, str, Any]]:
    """(key, type name, default) for every leaf key: used by `launch config keys`."""
    rows = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                rows.append((f"{section.name}.{f.name}", _type_name(value, f), getattr(value, f.name)))
        else:
            rows.append((section.name, _type_name(Config(), section), value))
    return rows


# --- helpers ---------------------------------------------------------------------------


def _from_dict(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix or "the config"
        raise ConfigError(f"{where} must be a mapping of keys, got {shown(raw)}")
    instance = cls()
    for name, value in raw.items():
        f = _field_named(instance, str(name), prefix)
        key = f"{prefix}.{name}" if prefix else str(name)
        ftype = _resolved_type(instance, f)
        if dataclasses.is_dataclass(ftype):
            setattr(instance, f.name, _from_dict(ftype, value or {}, key))
        else:
            setattr(instance, f.name, _coerce_value(key, value, ftype, f))
    return instance


def _field_named(instance: Any, name: str, prefix: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(instance)}
    if name in fields:
        return fields[name]
    where = f"in section '{prefix}'" if prefix else "at the top level"
    name = shown(name, 60).strip("'")
    full = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown key '{full}' {where}: {hint}valid keys: {', '.join(fields)}")


def _resolved_type(instance: Any, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(type(instance))
    return hints[f.name]


def _first_key(instance: Any, f: dataclasses.Field) -> str:
    return dataclasses.fields(getattr(instance, f.name))[0].name


def _type_name(instance: Any, f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return " | ".join(choices)
    t = _resolved_type(instance, f)
    return getattr(t, "__name__", str(t))


def _check_choice(key: str, value: Any, f: dataclasses.Field) -> Any:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {shown(value)}{hint}")
    return value


def _coerce_value(key: str, value: Any, ftype: Any, f: dataclasses.Field) -> Any:
    """Check a YAML value against the field type; ints are accepted where floats are."""
    if ftype is bool:
        ok = isinstance(value, bool)
    elif ftype is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ftype is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = _as_float(key, value) if ok else value
    elif ftype is str:
        ok = isinstance(value, str)
        if value is None:
            value, ok = "", True
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {ftype} for {key}")
    if not ok:
        raise ConfigError(f"{key} must be {_article(ftype)}, got {shown(value)}")
    _check_finite(key, value)
    return _check_choice(key, value, f)


def _as_float(key: str, value: float) -> float:
    """An int from YAML as a float; one of 400 digits is beyond any float (OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{key} must be a finite number, got {shown(value)}") from None


def _check_finite(key: str, value: Any) -> None:
    """nan and inf pass every range check (comparisons with nan are false): refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce_text(key: str, text: str, ftype: Any, f: dataclasses.Field) -> Any:
    """Turn `--set` text into the field's type."""
    try:
        if ftype is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if ftype is int:
            return int(text)
        if ftype is float:
            value = float(text)
            _check_finite(key, value)
            return value
    except ValueError:
        raise ConfigError(f"{key} must be {_article(ftype)}, got {shown(text)}") from None
    return _check_choice(key, text, f)


def _article(ftype: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(ftype, str(ftype))
