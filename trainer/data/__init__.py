"""Data: sources (files -> uint8 arrays) and the tf.data pipeline (arrays -> batches)."""

from trainer.data.sources import Dataset, Split, load_dataset

__all__ = ["Dataset", "Split", "load_dataset"]
