"""What inference needs to know about the training data, without the data itself.

Written to WORKDIR/dataset.json by `launch train`; evaluate, predict and export rebuild
the model from it (input shape, class names, the normalisation the model starts with).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.splits import Dataset


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
