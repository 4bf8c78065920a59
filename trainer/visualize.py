"""The seed paper's "plot some images", as a labelled PNG grid (Pillow, no plotting stack)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer import storage
from trainer.config import Config
from trainer.data.pipeline import first_views
from trainer.data.prepare import prepare_for_inference
from trainer.errors import DataError
from trainer.files import short

_LABEL_HEIGHT = 14


def sample_grid(images: np.ndarray, labels: Sequence[str], columns: int = 8, scale: int = 3) -> Image.Image:
    """Tile uint8 images [N, H, W, 3] with a caption under each, upscaled `scale` times."""
    count, height, width = images.shape[0], images.shape[1] * scale, images.shape[2] * scale
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    cell_h = height + _LABEL_HEIGHT
    grid = Image.new("RGB", (columns * width, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, (i // columns) * cell_h
        grid.paste(Image.fromarray(pixels).resize((width, height), Image.NEAREST), (x, y))
        draw.text((x + 2, y + height + 1), label[: max(4, width // 6)], fill="black")
    return grid


# Classes drawn in the confusion-matrix image at most: its memory grows with classes
# squared (600 MiB at 400 classes, 3.7 GB at 1,000). Beyond this, the most confused classes
# are drawn; metrics.json keeps the whole matrix.
MAX_DRAWN_CLASSES = 40


def most_confused_classes(counts: np.ndarray, limit: int = MAX_DRAWN_CLASSES) -> np.ndarray:
    """Indices (ascending) of the `limit` classes with the most errors, as truth or as guess."""
    errors = counts.sum(axis=0) + counts.sum(axis=1) - 2 * np.diag(counts)
    chosen = np.argsort(-errors, kind="stable")[:limit]
    return np.sort(chosen)


def confusion_matrix_image(matrix: Sequence[Sequence[int]], class_names: Sequence[str], cell: int = 36) -> Image.Image:
    """Rows = true class, columns = predicted; each row shaded by its share, counts written in.

    At most MAX_DRAWN_CLASSES classes are drawn (the most confused ones), so the image
    stays under ~10 MB whatever the class count.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    title = "predicted ->"
    if len(class_names) > MAX_DRAWN_CLASSES:
        keep = most_confused_classes(counts)
        counts, shares = counts[np.ix_(keep, keep)], shares[np.ix_(keep, keep)]
        title = f"predicted -> ({len(keep)} most confused of {len(class_names)} classes)"
        class_names = [class_names[i] for i in keep]
    return _draw_matrix(counts, shares, class_names, cell, title)


def _draw_matrix(counts: np.ndarray, shares: np.ndarray, class_names: Sequence[str], cell: int, title: str):
    size = len(class_names)
    margin = 84
    image = Image.new("RGB", (margin + size * cell, margin + size * cell), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 4), title, fill="black")
    draw.text((4, 4), "true", fill="black")
    for i, name in enumerate(class_names):
        draw.text((4, margin + i * cell + cell // 3), name[:12], fill="black")
        draw.text((margin + i * cell + 2, margin - 16 - (i % 3) * 14), name[:7], fill="black")
        for j in range(size):
            # Correct cells in blue, confusions in red, darker for a larger share of the row.
            shade = int(255 * (1 - shares[i, j]))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour, outline=(200, 200, 200))
            text_colour = "white" if shares[i, j] > 0.6 else "black"
            draw.text((box[0] + 3, box[1] + cell // 3), str(int(counts[i, j])), fill=text_colour)
    return image


def show_samples(config: Config, out: str | Path, count: int = 32, augmented: bool = False) -> Path:
    """Write a grid of the first `count` training images (after augmentation if asked).

    --out is checked before any data is loaded (a typo costs nothing), and written
    atomically: a failed or killed write leaves no half image under that name."""
    out = Path(out)
    image_format = _check_out(out)
    dataset, spec = prepare_for_inference(config)
    images, labels = first_views(dataset.train, spec if augmented else replace(spec, augment=False), count, True)
    names = [dataset.class_names[label] for label in labels]
    _save(sample_grid(images, names), out, image_format)
    return out


def _check_out(out: Path) -> str:
    """The Pillow format that --out's extension names; a DataError for an extension Pillow
    cannot write, a pipe or device, a file in the way, or a name too long."""
    Image.init()
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:
        raise DataError(
            f"--out {_shown(out)}: {out.suffix or 'no extension'} is not an image format Pillow can write; "
            "name a .png file (or .jpg, .webp, ...)"
        )
    if any(len(os.fsencode(part)) > 255 for part in out.parts):
        raise DataError(f"--out {_shown(out)}: a name in it is longer than 255 bytes; choose a shorter name")
    kind = storage.special_kind(out)
    if kind or out.is_dir():
        raise DataError(f"--out {_shown(out)} is {kind or 'a folder'}, not a regular file; name a new or existing file")
    above = out.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise DataError(f"--out {_shown(out)}: {above} is a file, not a folder; choose another --out")
    return image_format


def _save(image: Image.Image, out: Path, image_format: str) -> None:
    """Through a temporary file beside `out`, then os.replace; a refusal is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name[:80]}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(out, err) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            image.save(handle, format=image_format)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600
        os.replace(temporary, out)
    except (OSError, ValueError, io.UnsupportedOperation) as err:
        raise _write_error(out, err) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # gone after the replace; left by a failure


def _write_error(out: Path, err: BaseException) -> DataError:
    reason = getattr(err, "strerror", None) or short(str(err)) or type(err).__name__
    return DataError(f"cannot write --out {_shown(out)}: {reason}; choose another --out")


def _shown(out: Path) -> str:
    return short(str(out), 120)
