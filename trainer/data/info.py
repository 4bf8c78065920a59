"""What inference needs to know about the training data, without the data itself.

Written to WORKDIR/dataset.json by `launch train`; evaluate, predict and export rebuild
the model from it (input shape, class names, the normalisation the model starts with).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.sources import Dataset


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
    from trainer.data.pipeline import normalization_stats  # needs TensorFlow

    mean, std = normalization_stats(sample)
    return DatasetInfo(
        class_names=list(dataset.class_names),
        image_shape=list(dataset.image_shape),
        mean=mean,
        std=std,
        origin=dataset.origin,
    )
