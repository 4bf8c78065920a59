"""Keras Applications backbones as `model.name`: built, preprocessed, initialised, frozen.

A backbone model is: our raw 0-255 pixels -> the backbone's own input preprocessing (as
built-in layers, so exports keep taking raw pixels and load in plain Keras) -> the Keras
Applications network with `include_top=False` at the training size, nested as one layer
named like `model.name` -> global average pooling -> dropout -> a float32 Dense head.

Nesting the backbone keeps three things simple: freezing it (`backbone.trainable`),
finding it again in one of our exports for transfer learning, and telling our own layers
(preprocessing, head) from Keras'.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer import storage
from trainer.config import BACKBONE_NAMES
from trainer.errors import ConfigError, DataError
from trainer.files import COMPLETE_MARKER, folder_in_flux, short

# ImageNet statistics of the two preprocessing modes that are not built into the networks.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """One offered backbone.

    application: the `keras.applications` constructor.
    preprocessing: what `keras.applications.<module>.preprocess_input` does to 0-255 RGB:
        "builtin" (the network starts with its own Rescaling/Normalization layers), "caffe"
        (RGB -> BGR, minus the ImageNet mean), "tf" (to [-1, 1]), "torch" (to [0, 1],
        then the ImageNet mean/std).
    """

    name: str
    application: str
    family: str
    preprocessing: str


# How each backbone is built. Which names are offered, and in what order, is trainer.config's
# BACKBONE_NAMES (config is below this module, so it cannot ask here); an offered name
# without its entry fails here, at import.
_BUILDS: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("resnet50", "ResNet50", "ResNet", "caffe"),
        Backbone("resnet50_v2", "ResNet50V2", "ResNet", "tf"),
        Backbone("densenet121", "DenseNet121", "DenseNet", "torch"),
        Backbone("efficientnetv2_b0", "EfficientNetV2B0", "EfficientNetV2", "builtin"),
        Backbone("mobilenet_v3_small", "MobileNetV3Small", "MobileNetV3", "builtin"),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", "MobileNetV3", "builtin"),
        Backbone("convnext_tiny", "ConvNeXtTiny", "ConvNeXt", "builtin"),
    )
}
BACKBONES: dict[str, Backbone] = {name: _BUILDS[name] for name in BACKBONE_NAMES}


def is_backbone(name: str) -> bool:
    return name in BACKBONES


def build_backbone_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    head_dropout: float = 0.2,
    weights: str = "none",
    batchnorm_momentum: float = 0.0,
) -> keras.Model:
    """The backbone `name` with its preprocessing and a classification head.

    `weights="imagenet"` has Keras load (and if needed download) its ImageNet weights;
    anything else builds random weights (a file is loaded afterwards by `load_weights_file`).
    Call inside `strategy.scope()`.
    """
    spec = BACKBONES[name]
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = _preprocess(inputs, spec.preprocessing)
    backbone = _application(spec, tuple(input_shape), imagenet=weights == "imagenet")
    _configure_batchnorm(backbone, batchnorm_momentum)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(head_dropout, name="head_dropout")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, logits, name=name)
    if spec.preprocessing == "caffe":
        _set_channel_reversal(model.get_layer("rgb_to_bgr"))
    return model


def _preprocess(x, mode: str):
    """The backbone's `preprocess_input` as built-in float32 layers on 0-255 RGB pixels."""
    if mode == "caffe":
        # A fixed 1x1 convolution reverses the channels (no built-in layer does, and a
        # Lambda would not load in plain Keras); set by _set_channel_reversal.
        x = layers.Conv2D(3, 1, use_bias=False, trainable=False, dtype="float32", name="rgb_to_bgr")(x)
        return layers.Normalization(mean=list(_CAFFE_BGR_MEAN), variance=[1.0] * 3, dtype="float32", name="caffe")(x)
    if mode == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name="to_unit_range")(x)
    if mode == "torch":
        mean = [255 * m for m in _TORCH_MEAN]
        variance = [(255 * s) ** 2 for s in _TORCH_STD]
        return layers.Normalization(mean=mean, variance=variance, dtype="float32", name="imagenet_normalize")(x)
    return x  # "builtin": the network starts with its own Rescaling/Normalization


def _set_channel_reversal(conv: layers.Conv2D) -> None:
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, [0, 1, 2], [2, 1, 0]] = 1.0
    conv.kernel.assign(kernel)


def _application(spec: Backbone, input_shape: tuple[int, ...], imagenet: bool) -> keras.Model:
    constructor = getattr(keras.applications, spec.application)
    try:
        with warnings.catch_warnings():
            # "input_shape is undefined or non-square, or rows is not 224": expected, ours is ours.
            warnings.filterwarnings("ignore", message=".*input_shape.*", category=UserWarning)
            with storage.download_deadline():  # ImageNet weights may be downloaded: never wait forever
                backbone = constructor(
                    include_top=False, weights="imagenet" if imagenet else None, input_shape=input_shape
                )
    except ValueError as err:
        raise DataError(
            f"model.name={spec.name} cannot be built for {input_shape[1]}x{input_shape[0]}x{input_shape[2]} images: "
            f"{short(str(err), 200)}"
        ) from None
    except Exception as err:  # Keras' get_file raises a bare Exception when it cannot download
        # TimeoutError: the server went silent mid-file (download_deadline), after the URL answered.
        if imagenet and ("URL fetch failure" in str(err) or isinstance(err, TimeoutError)):
            raise _offline_error(spec, err) from None
        raise
    # Named like model.name, to be found again in our exports. (Not through the
    # constructor: EfficientNetV2 looks its block layout up by that name.)
    backbone.name = spec.name
    return backbone


def _offline_error(spec: Backbone, err: Exception) -> ConfigError:
    """One line naming the file Keras wanted and where a copy brought by hand must go."""
    url = next(iter(re.findall(r"https?://\S+?\.h5", str(err))), "")
    file_name = url.rsplit("/", 1)[-1] or "<the weights file>"
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    reason = short(str(err).split(" -- ")[-1], 80)
    return ConfigError(
        f"model.weights=imagenet: Keras could not download {url or file_name} ({reason}). Without a network, copy "
        f"that file from a machine that has one to {os.path.join(keras_home, 'models', file_name)}, or use "
        "model.weights=none or a weights file"
    )


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model`, descending into nested models (ConvNeXt's stem is a Sequential)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _batchnorm_layers(backbone: keras.Model) -> Iterator[layers.BatchNormalization]:
    return (layer for layer in _all_layers(backbone) if isinstance(layer, layers.BatchNormalization))


def _configure_batchnorm(backbone: keras.Model, momentum: float) -> None:
    """Batch statistics over the global batch, so N replicas train like one (as our nets do),
    and `momentum` for the moving statistics (0: the network's own).

    Keras reads both when the layer runs (and saves them in the layer's config); with one
    replica the synchronized computation is the plain one.
    """
    for layer in _batchnorm_layers(backbone):
        layer.synchronized = True
        if momentum:
            layer.momentum = momentum


# --- starting weights from a file --------------------------------------------------------


def load_weights_file(model: keras.Model, path: str) -> str:
    """Load `model.weights=path` into the backbone of `model`; returns what was loaded, for the console.

    Accepted: a `.keras` model (one of our exports, which holds the backbone as a layer of
    the same name, or a saved backbone alone), or a `.h5`/`.weights.h5` file of the
    backbone's weights (Keras' own ImageNet files are such). Only the backbone's weights
    are taken: the head is new (other classes, usually). Mismatches are one error line.
    """
    if folder_in_flux(storage.parent_of(path)):
        raise ConfigError(
            f"model.weights={path}: its folder is being exported, or an export of it was interrupted "
            f"(no {COMPLETE_MARKER} in it); wait for the export to finish, or run launch export again"
        )
    if not tf.io.gfile.exists(path):
        raise ConfigError(f"model.weights={path}: no such file (use none, imagenet, or a .keras/.h5 file)")
    if not path.endswith((".keras", ".h5")):
        raise ConfigError(f"model.weights={path}: expected a .keras, .weights.h5 or .h5 file")
    backbone = backbone_of(model)
    kind = storage.special_kind(path)  # h5py/zipfile would open a pipe and wait for a writer forever
    if kind:
        raise ConfigError(f"model.weights={path} is not a regular file ({kind}); name a .keras or .h5 file")
    try:
        _load_strictly(backbone, path)
    except (ValueError, KeyError, OSError) as err:
        raise DataError(
            f"model.weights={path} does not fit model.name={backbone.name}: {short(str(err), 160)}; "
            "use a file saved from the same backbone"
        ) from None
    return f"{backbone.name} weights from {path}"


def _load_strictly(backbone: keras.Model, path: str) -> None:
    """Load every weight of `backbone` from `path`, or raise: Keras only warns when it skips
    parts of a .weights.h5 ("Affected layers will retain their freshly-initialized weights")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if path.endswith(".keras"):
            backbone.set_weights(_backbone_in(_load_keras_file(path), backbone.name).get_weights())
        else:
            backbone.load_weights(path)
    messages = [str(warning.message) for warning in caught]
    skipped = [text for text in messages if "could not be loaded" in text or "Skipping" in text]
    if skipped:
        raise ValueError(f"{len(skipped)} part(s) of it do not match ({skipped[0]})")


def _load_keras_file(path: str) -> keras.Model:
    # safe_mode (the default) refuses to deserialize code: the file is untrusted input.
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def _backbone_in(source: keras.Model, name: str) -> keras.Model:
    """The layer called `name` in `source` (our models and exports), or `source` itself."""
    names = [layer.name for layer in source.layers]
    if name in names:
        return source.get_layer(name)
    nested = [layer.name for layer in source.layers if isinstance(layer, keras.Model)]
    if nested:
        raise ValueError(f"it holds no {name} backbone (its nested models: {', '.join(nested)})")
    return source


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone of one of our backbone models."""
    return model.get_layer(model.name)


# --- fine-tuning: what trains when -----------------------------------------------------------


@dataclass(frozen=True)
class FreezePlan:
    """Which weights train at which global step.

    unfreeze_step: the backbone trains from this step on; None: it never does (frozen for
    the whole run), 0: it always does (no fine-tuning schedule).
    """

    unfreeze_step: int | None

    @classmethod
    def of(cls, model_config, steps_per_epoch: int) -> FreezePlan:
        if not model_config.freeze_backbone:
            return cls(0)
        if not model_config.unfreeze_at_epoch:
            return cls(None)
        return cls(model_config.unfreeze_at_epoch * steps_per_epoch)

    def frozen_at(self, step: int) -> bool:
        return self.unfreeze_step is None or step < self.unfreeze_step

    @property
    def ever_frozen(self) -> bool:
        return self.unfreeze_step != 0

    @property
    def final_frozen(self) -> bool:
        return self.unfreeze_step is None

    def description(self, model_config) -> str:
        """The plan in one line for the run's start (only when the backbone is ever frozen).

        Said because fine-tuning changes what trains and at which rate: a run that looks
        stuck in its first epochs is often a head training alone, as planned.
        """
        if self.final_frozen:
            return "Fine-tuning: the backbone stays frozen (its BatchNorm in inference mode); only the head trains"
        rate = model_config.backbone_lr_multiplier
        at_rate = f" at {rate:g}x the learning rate" if rate != 1.0 else ""
        return (
            f"Fine-tuning: the head trains alone for {model_config.unfreeze_at_epoch} epoch(s), then the backbone "
            f"too{at_rate} (its BatchNorm stays in inference mode)"
        )


def set_backbone_frozen(model: keras.Model, frozen: bool, keep_batchnorm_frozen: bool) -> None:
    """Freeze or unfreeze the backbone of `model` (a no-op for our own nets).

    A frozen layer's BatchNorm runs in inference mode (Keras 3). Unfrozen after a frozen
    phase (`keep_batchnorm_frozen`), BatchNorm stays in inference mode: its statistics are
    the pretrained ones, which a small dataset's batches would only disturb (the Keras
    transfer-learning guide's rule).
    """
    if not is_backbone(model.name):
        return
    backbone = backbone_of(model)
    backbone.trainable = not frozen
    if not frozen and keep_batchnorm_frozen:
        for layer in _batchnorm_layers(backbone):
            layer.trainable = False


def backbone_variable_ids(model: keras.Model) -> frozenset[int]:
    """ids of the backbone's variables (for per-variable learning rates)."""
    if not is_backbone(model.name):
        return frozenset()
    return frozenset(id(variable) for variable in backbone_of(model).variables)
