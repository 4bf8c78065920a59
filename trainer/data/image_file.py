"""One image file given by name (`launch predict`), decoded with PIL: any format and mode
PIL reads (16-bit grey, palettes, ...), refused in words when it is not an image or is
over the pixel limit, and JPEGs drafted at a reduced scale when only a small copy is needed.
Training's images go through TensorFlow instead (trainer.data.decode), inside tf.data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainer import storage
from trainer.data.decode import MAX_IMAGE_PIXELS
from trainer.errors import DataError
from trainer.files import short


def read_image(path: Path, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to uint8 RGB [H, W, 3], naming the file if it is unusable.

    The pixel count is checked from the header before anything is decoded. `draft_size`
    (width, height) lets JPEG decode at a reduced scale when only a small copy is needed.
    A pipe or device is refused first: open() on a FIFO waits for a writer forever.
    """
    kind = storage.special_kind(path)
    if kind:
        raise DataError(f"{path} is not a regular file ({kind}); name an image file")
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: our own limit, below, is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            _check_pixels(path, *image.size)
            if draft_size:
                image.draft("RGB", draft_size)
            return _rgb8(image)
    except Image.DecompressionBombError:
        raise DataError(
            f"{path} is over the {MAX_IMAGE_PIXELS / 2**20:.0f} MP limit for one image; shrink it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {short(str(err))}") from err


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path} is {width}x{height} pixels ({width * height / 2**20:.0f} MP), over the "
            f"{MAX_IMAGE_PIXELS / 2**20:.0f} MP limit for one image; shrink it first"
        )


def _rgb8(image: Image.Image) -> np.ndarray:
    """8-bit RGB. 16-bit grey ("I;16", "I") is scaled down, not clipped: PIL's own convert
    would turn every value above 255 (mid-grey is 32768) into white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return _grey_rgb8(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode == "F":
        return _grey_rgb8(np.asarray(image, dtype=np.float64))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _grey_rgb8(grey: np.ndarray) -> np.ndarray:
    """Grey values on the 0-255 scale as uint8 RGB (rounded, clipped, channel repeated)."""
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
