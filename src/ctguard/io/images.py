"""PNG and JPG images for the paper's 2D pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctguard.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: str | Path) -> np.ndarray:
    """Reads a PNG/JPG as a 2D grayscale array.

    8-bit images come back as uint8, 16-bit PNGs as uint16 (what ``export-slices`` writes for
    a lossless HU window); colour images are converted to luminance.

    Raises:
        InputError: the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(im, dtype=np.uint16 if im.mode.startswith("I;16") else np.int32)
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"not a readable image ({e})", path) from None
