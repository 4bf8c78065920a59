"""Datasets and the tf.data input pipeline: from `data.*` settings to distributed batches.

The modules, in the order data flows (each imports only those above it):

- `splits`: what a dataset is (Split in memory, FileSplit, RecordSplit, Dataset).
- `decode`, `records`: how an encoded image and a TFRecord example are read.
- `sources/`: one module per `data.source`, behind the table `sources.SOURCES`; a new
  source (TFDS, ...) goes there.
- `plan`: what global step s holds (epoch order, per-example draws, replica slices).
- `augment`: crops and flips keyed by those draws; `device`: the same on the accelerator.
- `loader`: slices of indices to uint8 batches; `pipeline`: the datasets a strategy
  distributes (a tf.data service or another way to feed them goes beside these).
- `diagnose`: which files or records do not decode, in one line each.
- `prepare`: size, bad files and cache decided once at start; `info`: what inference
  keeps of the data (dataset.json); `convert`: `launch data convert`.
"""

from trainer.data.sources import load_dataset
from trainer.data.splits import Dataset, FileSplit, RecordSplit, Split

__all__ = ["Dataset", "FileSplit", "RecordSplit", "Split", "load_dataset"]
