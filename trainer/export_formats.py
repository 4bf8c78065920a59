"""The formats `launch export` writes, each into the export's temporary folder.

keras and saved_model (the default) need only TensorFlow; tflite is written by Keras'
LiteRT exporter, which uses the TFLite converter inside TensorFlow; onnx needs tf2onnx
from the `export` extra. Their runtimes (ai-edge-litert, onnxruntime) are in that extra
too, so the exports can be checked where they are made.

TensorFlow and the converters are imported by the functions that write, not here: the
CLI checks `--format` before it starts TensorFlow, so a typo costs no seconds.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import ConfigError

if TYPE_CHECKING:
    import keras

# Format name -> what it writes inside WORKDIR/export/.
FORMATS = {
    "keras": "model.keras",
    "saved_model": "saved_model",
    "tflite": "model.tflite",
    "onnx": "model.onnx",
}
DEFAULT_FORMATS = ("keras", "saved_model")
INSTALL_EXTRA = "pip install -e '.[export]'"
# The modules a format needs beyond TensorFlow and Keras, to write it.
_NEEDS = {"onnx": ("tf2onnx", "onnx")}


def parse_formats(text: str) -> tuple[str, ...]:
    """`keras,onnx` -> ("keras", "onnx"): known names, in the order given, each once."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        problem = (
            f"unknown export format {', '.join(repr(name) for name in unknown)}" if unknown else "no export format"
        )
        raise ConfigError(
            f"{problem}; choose one or more of {', '.join(FORMATS)}, comma-separated (e.g. --format keras,onnx)"
        )
    return tuple(dict.fromkeys(names))


def require_packages(formats: Sequence[str]) -> None:
    """Fail before the model is loaded when a requested format's converter is not installed."""
    for name in formats:
        for module in _NEEDS.get(name, ()):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"--format {name} needs the {module} package, which is not installed; "
                    f"install the export extra: {INSTALL_EXTRA}"
                ) from None


def require_float32(serving: keras.Model) -> None:
    """tflite and onnx exports take and give float32, as `launch predict` does.

    load_trained_model builds every model in float32 whatever its training precision;
    a model built under a mixed policy would export half-precision math (and, for onnx,
    fail in tf2onnx), so it is refused by name instead.
    """
    mixed = [layer.name for layer in _all_layers(serving) if layer.dtype_policy.compute_dtype != "float32"]
    dtypes = {str(serving.input.dtype), str(serving.output.dtype)}
    if mixed or dtypes != {"float32"}:
        raise ConfigError(
            f"model {serving.name} is not float32 (layers {', '.join(mixed[:5]) or 'none'} compute in a mixed "
            f"precision; input/output {'/'.join(sorted(dtypes))}); tflite and onnx exports need a float32 model: "
            "load it with trainer.inference.load_trained_model, which rebuilds it in float32"
        )


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer but the inputs, those of nested models (a backbone) included."""
    import keras

    found = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):  # its dtype is the input's, checked apart
            found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def write_formats(serving: keras.Model, folder: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Write `serving` (0-255 pixels in, probabilities out) in each format into `folder`."""
    if {"tflite", "onnx"} & set(formats):
        require_float32(serving)
    writers = {"keras": _write_keras, "saved_model": _write_saved_model, "tflite": _write_tflite, "onnx": _write_onnx}
    written = {}
    for name in formats:
        path = folder / FORMATS[name]
        writers[name](serving, path)
        written[name] = path
    return written


def _write_keras(serving: keras.Model, path: Path) -> None:
    serving.save(path)


def _write_saved_model(serving: keras.Model, path: Path) -> None:
    """A SavedModel with a `serve` endpoint, for tf.saved_model.load and TF Serving."""
    serving.export(str(path), format="tf_saved_model", verbose=False)


def _write_tflite(serving: keras.Model, path: Path) -> None:
    """Keras' LiteRT exporter, limited to the TFLite builtin ops.

    Keras also allows SELECT_TF_OPS, which the plain LiteRT runtime (ai-edge-litert, a
    phone) cannot run; builtins only, so an op it lacks fails the export here, not there.
    """
    import tensorflow as tf

    serving.export(
        str(path),
        format="litert",
        verbose=False,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
    )


def _erfc_as_erf(graph, node, _name, _args):
    """tf2onnx handler for TensorFlow's Erfc, which it cannot convert: erfc(x) = 1 - erf(x),
    both in ONNX since opset 9. Within 1.2e-7 of Keras for exact GELU (the cancellation
    near erfc's tail costs at most ~1e-6 absolute on a GELU output)."""
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(graph.get_dtype(node.input[0]))
    erf = graph.make_node("Erf", [node.input[0]], op_name_scope=node.name)
    one = graph.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    graph.replace_inputs(node, [one.output[0], erf.output[0]])
    return node


def _write_onnx(serving: keras.Model, path: Path) -> None:
    """tf2onnx's from_keras: the converter Keras' own onnx export calls, by another door.

    `model.export(format="onnx")` (Keras 3.15, TensorFlow backend) goes through tf2onnx's
    from_function, which leaves every captured constant as a graph input: the
    Normalization layer's mean and variance, which all our models start with, become two
    more required inputs that onnxruntime asks for. from_keras freezes them into the graph.

    tf2onnx keeps a TensorFlow op it cannot convert as it is and logs it; such a file does
    not load anywhere, so it is refused here, its ops named. Exact GELU's Erfc (airbench,
    the quickstart's net) is one tf2onnx lacks: it is written as 1 - Erf (`_erfc_as_erf`).
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec(serving.input.shape, tf.float32, name=serving.input.name)]
    converter_log = logging.getLogger("tf2onnx")
    level = converter_log.level
    converter_log.setLevel(logging.CRITICAL)  # its per-op errors: the refusal below says it in one line
    try:
        proto, _ = tf2onnx.convert.from_keras(
            serving, input_signature=signature, custom_op_handlers={"Erfc": (_erfc_as_erf, [])}
        )
    finally:
        converter_log.setLevel(level)
    unknown = sorted(
        {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    )
    if unknown:
        model = serving.name.removesuffix("_inference")
        raise ConfigError(
            f"--format onnx cannot export model {model}: tf2onnx {tf2onnx.__version__} has no ONNX "
            f"conversion for the TensorFlow op(s) {', '.join(unknown)}; export it as tflite or saved_model instead"
        )
    onnx.save(proto, str(path))
