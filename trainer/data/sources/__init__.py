"""Dataset sources: each turns `data.*` settings into a listed `Dataset` (trainer.data.splits).

One module per `data.source`, one entry per module in `SOURCES`. A source lists (or, for
small in-memory sets, reads) its examples; it decodes no image files: what to decode, and
when, is trainer.data.prepare's. A new source (TFDS, a CSV of paths, ...) is a module here
with a `load(config, seed, say) -> Dataset` and a line in SOURCES (and its name among
`data.source`'s choices in trainer.config).
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.config import DataConfig
from trainer.data.sources import cifar10, folder, synthetic, tfrecord
from trainer.data.splits import Dataset
from trainer.say import Say

Load = Callable[[DataConfig, int, "Say | None"], Dataset]
SOURCES: dict[str, Load] = {
    "cifar10": cifar10.load,
    "folder": folder.load,
    "synthetic": synthetic.load,
    "tfrecord": tfrecord.load,
}


def load_dataset(config: DataConfig, seed: int, progress: Say | None = None) -> Dataset:
    """Find and list the dataset `config.source` names, limited to `*_examples` if set.
    Image files are not decoded here: see trainer.data.prepare."""
    dataset = SOURCES[config.source](config, seed, progress)
    dataset.train = dataset.train.limited(config.train_examples)
    dataset.test = dataset.test.limited(config.test_examples)
    return dataset
