"""Model FLOPs per example and device peaks, for model FLOPs utilisation (MFU).

Counted once from the layer shapes: 2 FLOPs (a multiply and an add) per weight use in
Conv2D, DepthwiseConv2D and Dense layers, descending into nested models (a Keras
Applications backbone is one layer of ours); the rest is a rounding error for CNNs.
Training costs about 3x the forward pass (forward, gradient w.r.t. activations, gradient
w.r.t. weights).
"""

from __future__ import annotations

import math
import re

import keras

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, by GPU name (no sparsity), for
# mixed precision. Unknown devices (CPUs, other GPUs) get no MFU rather than a guess.
_MIXED_PRECISION_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is lower (756)
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def forward_flops_per_example(model: keras.Model) -> int:
    """FLOPs of one example's forward pass through the Conv2D, DepthwiseConv2D and Dense layers."""
    return int(sum(_layer_flops(layer) for layer in model.layers))


def _layer_flops(layer) -> int:
    if isinstance(layer, keras.Model):
        return forward_flops_per_example(layer)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel_h, kernel_w, _, _ = layer.kernel.shape  # (h, w, channels, multiplier)
        return 2 * _positions(layer.output.shape) * layer.output.shape[-1] * kernel_h * kernel_w
    if isinstance(layer, keras.layers.Conv2D):
        # The kernel's input axis is per group (ConvNeXt's depthwise Conv2D: 1).
        kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
        return 2 * _positions(layer.output.shape) * layer.output.shape[-1] * kernel_h * kernel_w * channels_in
    if isinstance(layer, keras.layers.Dense):
        inputs, outputs = layer.kernel.shape
        return 2 * _positions(layer.output.shape) * inputs * outputs  # ConvNeXt applies Dense per pixel
    return 0


def _positions(shape) -> int:
    """Spatial positions of an output (1 for a flat one)."""
    return int(math.prod(shape[1:-1]))


def training_flops_per_example(model: keras.Model) -> int:
    return 3 * forward_flops_per_example(model)


def _names(device_name: str, model: str) -> bool:
    """`model` as a whole word of the device name: "L4" is in "NVIDIA L4", not "NVIDIA L40S"."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(model)}(?![A-Za-z0-9])", device_name) is not None


def peak_flops(device_names: list[str], precision: str) -> float | None:
    """Total peak FLOP/s of the devices in use, when known."""
    if not device_names or precision not in ("mixed_float16", "mixed_bfloat16"):
        return None
    total = 0.0
    for name in device_names:
        peak = next((tflops for key, tflops in _MIXED_PRECISION_PEAK_TFLOPS.items() if _names(name, key)), None)
        if peak is None:
            return None
        total += peak * 1e12
    return total
