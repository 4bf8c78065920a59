"""What inference needs to know about the training data, without the data itself.

Written to WORKDIR/dataset.json by `launch train`; evaluate, predict and export rebuild
the model from it (input shape, class names, the normalisation the model starts with).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.sources import Dataset


@dataclass
class DatasetInfo:
    class_names: list[str]
    image_shape: list[int]
    mean: list[float]
    std: list[float]
    origin: str


def dataset_info(dataset: Dataset) -> DatasetInfo:
    """The info of a loaded dataset (normalisation statistics from its training split)."""
    from trainer.data.pipeline import normalization_stats  # needs TensorFlow

    mean, std = normalization_stats(dataset.train.images)
    return DatasetInfo(
        class_names=list(dataset.class_names),
        image_shape=list(dataset.image_shape),
        mean=mean,
        std=std,
        origin=dataset.origin,
    )
