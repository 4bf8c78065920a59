"""A distributed, accelerator-aware Keras trainer for CIFAR-10-style image classification."""

import warnings

# distribute_datasets_from_function inspects dataset options in graph mode; the warning
# it triggers is about TensorFlow internals, not about anything a user can change.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")
