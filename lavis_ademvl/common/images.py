"""Opening image files with errors that name the file (and, when given, what it belongs to)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def load_image(path: str | Path, owner: str = "") -> Image.Image:
    """An RGB image; a missing or unreadable file is an error naming it, followed by `owner` if given."""
    path = Path(path)
    described = f"{path} {owner}".rstrip()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {described}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"cannot read image {described}: {error}") from error
