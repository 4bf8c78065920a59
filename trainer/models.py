"""Model registry: `model.name` -> a Keras functional model that maps raw pixels to logits.

Every model starts with a fixed Normalization layer (the training set's per-channel
mean/std), so exported models take plain 0-255 pixels, and ends with a float32 Dense
head, so logits and the loss stay float32 under mixed precision. Only built-in layers
are used: an exported `.keras` file loads in plain Keras without custom objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
from keras import layers

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.config import ModelConfig
    from trainer.workdir import DatasetInfo

ModelBuilder = Callable[..., keras.Model]
_REGISTRY: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return decorator


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
) -> keras.Model:
    """Build `name` from the registry; call inside `strategy.scope()` to place its variables."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not registered; choose one of {', '.join(model_names())}")
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(inputs)
    features = _REGISTRY[name](x, width=width)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def build_for_dataset(model_config: ModelConfig, info: DatasetInfo) -> keras.Model:
    """`model_config` (config.model) sized for the data `info` describes (a DatasetInfo)."""
    return build_model(
        model_config.name,
        input_shape=info.image_shape,
        num_classes=len(info.class_names),
        mean=info.mean,
        std=info.std,
        width=model_config.width,
    )


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
