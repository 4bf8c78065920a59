"""Model registry: `model.name` -> a Keras functional model that maps raw pixels to logits.

Or the user's own network: `model.name=package.module:function` (`build_user_model`).

Every model starts with a fixed Normalization layer (the training set's per-channel
mean/std), so exported models take plain 0-255 pixels, and ends with a float32 Dense
head, so logits and the loss stay float32 under mixed precision. Only built-in layers
are used: an exported `.keras` file loads in plain Keras without custom objects.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import layers

from trainer.backbones import BACKBONES, build_backbone_model, is_backbone, load_weights_file
from trainer.config import ModelConfig
from trainer.errors import ConfigError, DataError, TrainerError
from trainer.files import short
from trainer.flops import forward_flops_per_example
from trainer.user_code import failure, is_import_path, resolve

if TYPE_CHECKING:
    from trainer.data.info import DatasetInfo

ModelBuilder = Callable[..., keras.Model]
_REGISTRY: dict[str, ModelBuilder] = {}
# The layers of every user model built in this process: one returned again is refused.
_USER_LAYERS: weakref.WeakSet = weakref.WeakSet()


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return decorator


def model_names() -> list[str]:
    """Our own nets, then the Keras Applications backbones."""
    return sorted(_REGISTRY) + list(BACKBONES)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    head_dropout: float = 0.2,
    weights: str = "none",
    batchnorm_momentum: float = 0.0,
) -> keras.Model:
    """Build `name` from the registry; call inside `strategy.scope()` to place its variables.

    Backbones take their own preprocessing instead of `mean`/`std`, and `weights`
    ("imagenet" is loaded here; a file path is for `load_initial_weights`). An import path
    is the user's function (`build_user_model`), which scales its pixels itself.
    """
    if is_import_path(name):
        config = ModelConfig(name=name, width=width, head_dropout=head_dropout)
        return build_user_model(name, input_shape=input_shape, num_classes=num_classes, config=config)
    if is_backbone(name):
        return build_backbone_model(
            name,
            input_shape=input_shape,
            num_classes=num_classes,
            head_dropout=head_dropout,
            weights=weights,
            batchnorm_momentum=batchnorm_momentum,
        )
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not registered; choose one of {', '.join(model_names())}")
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(inputs)
    try:
        features = _REGISTRY[name](x, width=width)
    except ValueError as err:  # a pooling or valid convolution left nothing of the image
        height, width_px = input_shape[0], input_shape[1]
        raise DataError(
            f"images of {width_px}x{height} pixels are too small for model.name={name}, whose pooling needs "
            f"larger inputs ({short(str(err), 100)}); use larger images (32x32 works for every model)"
        ) from None
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def build_for_dataset(model_config: ModelConfig, info: DatasetInfo, *, pretrained: bool = False) -> keras.Model:
    """`model_config` (config.model) sized for the data `info` describes (a DatasetInfo).

    `pretrained`: start from `model.weights` (training a new run). Without it the
    weights are random, for a checkpoint to restore: evaluate, predict and export never
    download or read the starting weights again.
    """
    if is_import_path(model_config.name):  # the user's function gets the run's own ModelConfig
        num_classes = len(info.class_names)
        return build_user_model(
            model_config.name, input_shape=info.image_shape, num_classes=num_classes, config=model_config
        )
    return build_model(
        model_config.name,
        input_shape=info.image_shape,
        num_classes=len(info.class_names),
        mean=info.mean,
        std=info.std,
        width=model_config.width,
        head_dropout=model_config.head_dropout,
        batchnorm_momentum=model_config.batchnorm_momentum,
        weights="imagenet" if pretrained and model_config.weights == "imagenet" else "none",
    )


def load_initial_weights(model: keras.Model, model_config: ModelConfig) -> str | None:
    """Load `model.weights` when it names a file; returns what was loaded, for the console."""
    if model_config.weights == "imagenet":
        return f"{model_config.name} ImageNet weights (Keras)"
    if model_config.weights in ("none", ""):
        return None
    return load_weights_file(model, model_config.weights)


def build_user_model(path: str, *, input_shape: Sequence[int], num_classes: int, config: ModelConfig) -> keras.Model:
    """`model.name=package.module:function`: the user's network, built and checked.

    The contract: `function(input_shape, num_classes, config)` is called with the images'
    (height, width, channels) as a tuple of ints, the number of classes and the run's
    ModelConfig (a copy; model.width and model.head_dropout are the user's to read). It returns a
    new, uncompiled functional keras.Model (or a Sequential that starts with keras.Input):
    one input of `input_shape`, fed float32 pixels 0-255 (as exports take them; the model
    scales them itself), one output of shape (batch, num_classes): logits, the softmax is
    in the loss and in exports. It is called again, inside the strategy's scope, by every
    resume, evaluation, prediction and export, so it must build the same network each time.
    A fault is a ConfigError naming `path` and what is wrong.
    """
    function = resolve(path, "model.name")
    policy = keras.mixed_precision.global_policy()
    try:
        model = function(tuple(int(size) for size in input_shape), num_classes, copy.deepcopy(config))
    except TrainerError:
        raise
    except (Exception, SystemExit) as err:  # the user's code, whatever it raises (sys.exit too): named
        raise ConfigError(f"model.name={path} raised {failure(err)}") from err
    finally:  # a policy the function set would outlive it: exports, the next run in this process
        changed = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy(policy)
    if changed != policy.name:
        raise ConfigError(
            f"model.name={path} set Keras' global dtype policy to {changed} (it is {policy.name} here); leave "
            "it to the trainer: runtime.precision sets it for training, and exports build in float32"
        )
    model = _checked_user_model(path, model, tuple(input_shape), num_classes)
    _USER_LAYERS.update(model.layers)
    return model


def _checked_user_model(path: str, model: Any, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The contract's checks, each a message that names the fix; a Sequential made functional."""
    where = f"model.name={path}"
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{where} returned {type(model).__name__}, not a keras.Model; return the model it builds")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):  # a subclassed model, or a Sequential without keras.Input
        raise ConfigError(
            f"{where} returned a model without defined inputs ({type(model).__name__}); build a functional "
            "model, keras.Model(inputs, outputs), or start a Sequential with keras.Input(shape), so that "
            "exports load without your code"
        ) from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"{where} returned a model of {len(inputs)} inputs and {len(outputs)} outputs; it needs 1 and 1"
        )
    _check_shapes(where, tuple(inputs[0].shape), tuple(outputs[0].shape), input_shape, num_classes)
    _check_dtypes(where, str(inputs[0].dtype), str(outputs[0].dtype))
    if any(layer in _USER_LAYERS for layer in model.layers):
        raise ConfigError(
            f"{where} returned layers of a model it built before (made once, at module level?); create every "
            "layer inside the function: each call must build a new model, or a run starts from another's weights"
        )
    if _ends_in_softmax(model):
        raise ConfigError(f"{where} ends in a softmax; return logits (no activation): the loss applies the softmax")
    if is_backbone(model.name):
        raise ConfigError(f"{where} returned a model named {model.name!r}, a backbone's name; give it another name")
    if isinstance(model, keras.Sequential):  # .input/.output, which exports and histograms read
        return keras.Model(inputs[0], outputs[0], name=model.name)
    return model


def _check_shapes(where: str, given: tuple, output: tuple, input_shape: tuple[int, ...], num_classes: int) -> None:
    expected = (None, *input_shape)
    if len(given) != len(expected) or any(size not in (None, want) for size, want in zip(given[1:], input_shape)):
        raise ConfigError(
            f"{where} returned a model whose input has shape {given}; the images are {expected} "
            "(batch, height, width, channels): use keras.Input(shape=input_shape)"
        )
    if output != (None, num_classes):
        raise ConfigError(
            f"{where} returned a model whose output has shape {output}; it must be (None, {num_classes}): "
            "one logit per class, e.g. a last layers.Dense(num_classes)"
        )


def _check_dtypes(where: str, given: str, output: str) -> None:
    if given != "float32" or not output.startswith(("float", "bfloat")):
        raise ConfigError(
            f"{where} returned a model of {given} input and {output} output; it takes float32 pixels "
            "(keras.Input(shape=input_shape)) and gives float logits"
        )


def _ends_in_softmax(model: keras.Model) -> bool:
    last = model.layers[-1] if model.layers else None
    return isinstance(last, keras.layers.Softmax) or getattr(last, "activation", None) is keras.activations.softmax


@register("paper_cnn")
def paper_cnn(x, *, width: int):
    """The seed paper's Keras CNN: two conv-conv-pool-dropout blocks, dense 512, dropout.

    (The classic `cifar10_cnn` example; the softmax lives in the loss and in exports.)
    """
    for block, filters in enumerate((width, 2 * width), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1")(x)
        x = layers.Conv2D(filters, 3, activation="relu", name=f"block{block}_conv2")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(0.25, name=f"block{block}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    return layers.Dropout(0.5, name="dense_dropout")(x)


def _conv_bn(x, filters: int, name: str, pool: bool = False):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # Synchronized BN: statistics over the global batch, so N replicas train like one.
    x = layers.BatchNormalization(momentum=0.9, synchronized=True, name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    return x


@register("resnet_small")
def resnet_small(x, *, width: int):
    """ResNet-9 in the style of David Page's fast CIFAR-10 recipe (widths w, 2w, 4w, 8w)."""
    x = _conv_bn(x, width, "prep")
    for stage, (filters, residual) in enumerate(((2 * width, True), (4 * width, False), (8 * width, True)), 1):
        x = _conv_bn(x, filters, f"stage{stage}", pool=True)
        if residual:
            shortcut = x
            x = _conv_bn(x, filters, f"stage{stage}_res1")
            x = _conv_bn(x, filters, f"stage{stage}_res2")
            x = layers.Add(name=f"stage{stage}_add")([shortcut, x])
    return layers.GlobalMaxPooling2D(name="pool")(x)


# airbench: the fastest known CIFAR-10 recipe (Keller Jordan, arXiv 2404.00498), written
# from its description. A frozen 2x2 patch-whitening conv, then three conv groups.
WHITEN_LAYER = "whiten"
WHITEN_FILTERS = 24  # 12 eigen-directions of 2x2x3 patches, each with both signs


def _torch_default() -> keras.initializers.Initializer:
    """PyTorch's default conv initialisation, U(+/- 1/sqrt(fan_in)), which airbench was
    tuned with. A new one per layer, made when the model is built: an unseeded Keras
    initializer draws its seed when it is made, so one made at import would ignore the
    run's `seed`: two runs of one command would start from different weights."""
    return keras.initializers.VarianceScaling(1 / 3, mode="fan_in", distribution="uniform")


def _pass_inputs_through(conv: layers.Conv2D) -> None:
    """Identity ("dirac") start for the first in_channels filters, as airbench does: each of
    them begins by copying one input channel, so early training sees the whitened input."""
    kernel = keras.ops.convert_to_numpy(conv.kernel)
    size, _, inputs, outputs = kernel.shape
    passed = min(inputs, outputs)
    kernel[:, :, :, :passed] = 0.0
    kernel[size // 2, size // 2, np.arange(passed), np.arange(passed)] = 1.0
    conv.kernel.assign(kernel)


def _conv_group(x, filters: int, name: str):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU; BN learns a bias only."""
    for index in (1, 2):
        conv = layers.Conv2D(
            filters, 3, padding="same", use_bias=False, kernel_initializer=_torch_default(), name=f"{name}_conv{index}"
        )
        x = conv(x)
        _pass_inputs_through(conv)
        if index == 1:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        # Scale frozen at 1 (scale=False), fast-moving statistics, as airbench does.
        x = layers.BatchNormalization(
            momentum=0.6, epsilon=1e-5, scale=False, synchronized=True, name=f"{name}_bn{index}"
        )(x)
        x = layers.Activation("gelu", name=f"{name}_gelu{index}")(x)
    return x


@register("airbench")
def airbench(x, *, width: int):
    """airbench94's network for model.width=64 (groups of 64/256/256 channels).

    The whitening conv starts at zero and is frozen: `init_from_data` fills it from the
    training images' patch covariance before the first step (checkpoints carry it after).
    """
    x = layers.Conv2D(WHITEN_FILTERS, 2, padding="valid", use_bias=True, trainable=False, name=WHITEN_LAYER)(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for index, filters in enumerate((width, 4 * width, 4 * width), start=1):
        x = _conv_group(x, filters, f"group{index}")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    # airbench scales the head's input by 1/9: smaller initial logits train better.
    return layers.Rescaling(1 / 9, name="head_scale")(x)


def patch_whitening_kernel(images: np.ndarray, mean, std, eps: float = 5e-4) -> np.ndarray:
    """A 2x2 conv kernel that whitens patches of the normalised `images` (uint8, NHWC).

    Eigen-decomposition of the 12x12 covariance of all 2x2x3 patches; each eigenvector
    divided by sqrt(eigenvalue + eps) is one filter, used with both signs (so GELU after it
    loses nothing): shape (2, 2, channels, 2 * 2 * 2 * channels).
    """
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    channels = x.shape[-1]
    patches = np.concatenate(
        [x[:, dy : x.shape[1] - 1 + dy, dx : x.shape[2] - 1 + dx, :] for dy in (0, 1) for dx in (0, 1)], axis=-1
    )  # (n, h-1, w-1, 4*c): the four pixels of every 2x2 patch, in (dy, dx, c) order
    flat = patches.reshape(-1, 4 * channels).astype(np.float64)
    flat -= flat.mean(axis=0)
    covariance = flat.T @ flat / len(flat)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(eigenvalues + eps)  # column k: filter k
    filters = filters.reshape(2, 2, channels, 4 * channels)  # rows follow (dy, dx, c)
    return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def init_from_data(model: keras.Model, images: np.ndarray, mean, std, max_images: int = 5000) -> bool:
    """Data-dependent initialisation (the whitening conv); False if the model has none."""
    try:
        layer = model.get_layer(WHITEN_LAYER)
    except ValueError:
        return False
    kernel = patch_whitening_kernel(images[:max_images], mean, std)
    layer.kernel.assign(kernel)
    layer.bias.assign(np.zeros(kernel.shape[-1], np.float32))
    return True


@dataclass(frozen=True)
class ModelDescription:
    """One row of `launch models`."""

    name: str
    origin: str  # "ours" or the keras.applications constructor
    parameters: int
    forward_flops: int  # per image at the size described


def describe_models(image_size: int = 224, num_classes: int = 10) -> Iterator[ModelDescription]:
    """Every `model.name`, built at `image_size` (random weights) and measured."""
    for name in model_names():
        model = build_model(
            name, input_shape=(image_size, image_size, 3), num_classes=num_classes, mean=[0.0] * 3, std=[1.0] * 3
        )
        origin = f"keras.applications.{BACKBONES[name].application}" if is_backbone(name) else "ours"
        yield ModelDescription(name, origin, model.count_params(), forward_flops_per_example(model))
        keras.backend.clear_session(free_memory=False)


def model_summary(model: keras.Model, name: str) -> str:
    """`paper_cnn, 612,122 parameters (612,122 trainable), 2.4 MB float32`: the model as a
    run's start line and the dry run's plan name it (its trainable part as it is now)."""
    weights = list(model.weights)
    total = model.count_params()
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    size = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in weights) / 1e6
    dtypes = "/".join(sorted({str(w.dtype) for w in weights})) or "no weights"
    return f"{name}, {total:,} parameters ({trainable:,} trainable), {size:.1f} MB {dtypes}"
