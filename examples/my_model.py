"""A network of your own, named in a config as `model.name: my_model:small_convnet`.

The contract (README "Python API"): the trainer calls `function(input_shape, num_classes,
config)` with the images' (height, width, channels), the number of classes and the run's
ModelConfig, inside the distribution strategy's scope, and again for every resume,
evaluation, prediction and export. It returns a new, uncompiled functional keras.Model:
one input of `input_shape` fed float32 pixels 0-255, one output of (batch, num_classes)
logits (no softmax: the loss has it, and exports add it).
"""

from __future__ import annotations

import keras
from keras import layers


def small_convnet(input_shape: tuple[int, int, int], num_classes: int, config) -> keras.Model:
    """Two conv-pool blocks of `model.width` and twice as many channels, then a linear head
    on a 4x4 grid of features (the synthetic classes are coarse colour patterns)."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)  # the pixels arrive as 0-255
    for block, filters in enumerate((config.width, 2 * config.width), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{block}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = layers.Flatten(name="flatten")(layers.MaxPooling2D(2, name="pool3")(x))
    x = layers.Dropout(config.head_dropout, name="dropout")(x)
    # Logits; float32 even under mixed precision, so the loss is computed in float32.
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="small_convnet")
