"""Opening image files with errors that name the file (and, when given, what it belongs to)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes of more than 8 bits per channel, and the largest value each holds (Pillow's convert("RGB") would clip them
# at 255, turning a 16-bit image almost white).
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image; 16-bit (and 32-bit integer or float) greyscale is rescaled, not clipped."""
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    pixels = np.asarray(image, dtype=np.float64)
    # 32-bit integer images ("I") from 16-bit files hold 0..65535; wider values keep their own maximum.
    top = max(WIDE_MODES[image.mode], float(pixels.max(initial=0.0)))
    grey = np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_image(path: str | Path, owner: str = "") -> Image.Image:
    """An RGB image; a missing or unreadable file, or one too large to decode safely (Pillow's decompression-bomb
    limit), is an error naming it, followed by `owner` if given."""
    path = Path(path)
    described = f"{path} {owner}".rstrip()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {described}")
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {described} is too large to decode safely: {error}") from error
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"cannot read image {described}: {error}") from error
