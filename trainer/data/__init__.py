"""Datasets (trainer.data.sources), their preparation and the tf.data input pipeline."""

from trainer.data.sources import Dataset, FileSplit, Split, load_dataset

__all__ = ["Dataset", "FileSplit", "Split", "load_dataset"]
