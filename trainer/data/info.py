"""What inference needs to know about the training data, without the data itself, and the
per-class loss weights (data.class_weights) that training reads from the same class names.

Written to WORKDIR/dataset.json by `launch train`; evaluate, predict and export rebuild
the model from it (input shape, class names, the normalisation the model starts with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainer.config.brief import shown
from trainer.data.splits import Dataset, Examples, RecordSplit
from trainer.errors import ConfigError


@dataclass
class DatasetInfo:
    class_names: list[str]
    image_shape: list[int]
    mean: list[float]
    std: list[float]
    origin: str


# Training images the normalisation statistics are computed from (spread over the split).
STATS_SAMPLE = 5000


def dataset_info(dataset: Dataset, sample: np.ndarray) -> DatasetInfo:
    """The info of a prepared dataset; normalisation statistics from `sample` (training
    images at the training size, see pipeline.sample_images)."""
    mean, std = normalization_stats(sample)
    return DatasetInfo(
        class_names=list(dataset.class_names),
        image_shape=list(dataset.image_shape),
        mean=mean,
        std=std,
        origin=dataset.origin,
    )


def normalization_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training pixels (0-255 scale), computed in chunks."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    return mean.tolist(), std.tolist()


def class_weights(setting: str, class_names: list[str], train: Examples) -> list[float] | None:
    """data.class_weights as one weight per class (None: off), checked against the dataset.

    `balanced` is n_samples / (n_classes * count_c) over the training split's labels, as
    scikit-learn's compute_class_weight and Keras' docs define it, n_classes counting the
    classes that have examples (a class without any never weighs a loss: it gets 1).
    Otherwise "name:weight, ..." pairs: classes not named weigh 1, as in Keras'
    `class_weight`; a name the dataset lacks is refused, naming the valid ones, before
    anything is written.
    """
    text = setting.strip()
    if not text:
        return None
    if text == "balanced":
        counts = class_counts(train, len(class_names))
        total, present = counts.sum(), int(np.count_nonzero(counts))  # sklearn's classes: those in y
        return [float(total / (present * count)) if count else 1.0 for count in counts]
    named = parse_class_weights(text)
    unknown = [name for name in named if name not in class_names]
    if unknown:
        raise ConfigError(
            f"data.class_weights names class {shown(unknown[0])}, which this dataset does not have; its classes "
            f"are: {', '.join(class_names) if len(class_names) <= 50 else ', '.join(class_names[:50]) + ', ...'}"
        )
    return [named.get(name, 1.0) for name in class_names]


def parse_class_weights(text: str) -> dict[str, float]:
    """ "cat:2, dog:0.5" (or in braces, as YAML writes a mapping) -> {"cat": 2.0, "dog": 0.5}."""
    body = text[1:-1] if text.startswith("{") and text.endswith("}") else text
    weights: dict[str, float] = {}
    for pair in body.split(","):
        name, sep, value = pair.rpartition(":")
        name = name.strip().strip("'\"")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight) or weight < 0 or name in weights:
            raise ConfigError(
                f"data.class_weights must be balanced, or class:weight pairs with weights >= 0, each class once "
                f"(e.g. cat:2, dog:0.5); {shown(pair.strip())} is not one (in {shown(text)})"
            )
        weights[name] = weight
    return weights


def class_counts(train: Examples, num_classes: int) -> np.ndarray:
    """Training examples per class, from the split's labels (listed at start, nothing decoded)."""
    if isinstance(train, RecordSplit):
        raise ConfigError(
            "data.class_weights=balanced needs each class's count, which TFRecord shards do not record (counting "
            "means reading every record); name the weights instead (data.class_weights=cat:2, dog:0.5), or train "
            "from the image folder"
        )
    return np.bincount(np.asarray(train.labels, np.int64), minlength=num_classes)
