"""A distributed, accelerator-aware Keras trainer for CIFAR-10-style image classification.

The public API is declared here once (README "Python API", examples/python_api.py). Names
resolve lazily (PEP 562), so that importing `trainer` (as the CLI does for its error types)
does not start TensorFlow.
"""

import importlib
import warnings

# distribute_datasets_from_function inspects dataset options in graph mode; the warning
# it triggers is about TensorFlow internals, not about anything a user can change.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")

_PUBLIC = {
    "Config": "trainer.config",
    "ModelConfig": "trainer.config",
    "load_config": "trainer.config",
    "load_dataset": "trainer.data",
    "build_model": "trainer.models",
    "model_names": "trainer.models",
    "setup_runtime": "trainer.runtime",
    "train": "trainer.training",
    "TrainResult": "trainer.training",
    "evaluate": "trainer.inference",
    "predict": "trainer.inference",
    "export": "trainer.inference",
    "load_trained_model": "trainer.inference",
    "RunInfo": "trainer.loop.user_actions",
    "StepMetrics": "trainer.loop.user_actions",
    "run_local_workers": "trainer.launcher",
    "TrainerError": "trainer.errors",
    "ConfigError": "trainer.errors",
    "DataError": "trainer.errors",
    "CheckpointError": "trainer.errors",
    "RuntimeSetupError": "trainer.errors",
    "DivergedError": "trainer.errors",
    "WorkdirBusyError": "trainer.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
