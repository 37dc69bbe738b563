"""A tile of sample images, the counterpart of MATLAB's ``imtile``."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .imageset import ImageSet


def tile(images: np.ndarray, columns: int = 5, scale: int = 2, border: int = 2) -> np.ndarray:
    """Arrange uint8 NCHW images (RGB, or grey with one channel) in a grid; returns a uint8 HWC
    RGB array.

    With 20 images, 5 columns, scale 2 and border 2: 4 rows of 64x64 pictures, so the tile is
    4*64 + 5*2 = 266 pixels high and 5*64 + 6*2 = 332 wide.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"tile: expected images of shape (N, 3, H, W) or (N, 1, H, W), got {images.shape}")
    if images.shape[1] == 1:
        images = images.repeat(3, axis=1)   # grey -> RGB, so the tile is one PNG kind
    n, _, h, w = images.shape
    rows = -(-n // columns)
    hs, ws = h * scale, w * scale
    out = np.full((rows * hs + (rows + 1) * border, columns * ws + (columns + 1) * border, 3),
                  255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        big = img.transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)  # CHW -> HWC, upscaled
        y, x = border + r * (hs + border), border + c * (ws + border)
        out[y:y + hs, x:x + ws] = big
    return out


def random_tile_png(data: ImageSet, path, count: int = 20, seed: int = 0, columns: int = 5) -> list[str]:
    """Write a PNG tile of ``count`` random images to ``path``; return their class names (the
    class numbers as text when the set has no names)."""
    from PIL import Image

    from ..errors import ArgumentError
    from ..fileio import atomic_write

    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count <= len(data):
        raise ArgumentError(f"tile count: expected 1..{len(data)} (the images in {data.source}), got {count!r}")
    index = np.random.default_rng(seed).choice(len(data), size=int(count), replace=False)
    with atomic_write(path, "wb") as f:   # the old tile or the whole new one
        Image.fromarray(tile(data.images[index], columns)).save(f, format="PNG")
    return [data.class_name(data.labels[i]) for i in index]
