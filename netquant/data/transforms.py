"""Turning uint8 CIFAR-10 images into network input, and the training augmentation.

The networks in :mod:`netquant.models` take float32 NCHW RGB images scaled to [0, 1]; their
first layer (``input``) subtracts the per-channel mean and divides by the standard deviation,
as MATLAB's ``imageInputLayer`` with z-score normalisation does. For example a red value of 128
becomes 128/255 = 0.502, then (0.502 - 0.4914) / 0.2470 = 0.043.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import ArgumentError, InputError
from .cifar10 import ImageSet

# Per-channel statistics of the 50,000 CIFAR-10 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float32 in [0, 1], same layout."""
    if images.dtype != np.uint8:
        raise InputError(f"to_float: expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


def batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, float32 batch in [0, 1]) over uint8 images, in order."""
    if batch_size <= 0:
        raise ArgumentError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield start, to_float(images[start:start + batch_size])


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """The CIFAR training augmentation on a uint8 NCHW batch: pad by ``pad`` zeros on each side,
    crop a random 32x32 window, flip horizontally with probability 1/2. Returns a new array."""
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    # gather windows with one fancy index: rows (n, h, 1) and cols (n, 1, w) broadcast to (n, h, w)
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None, None], cols[:, :, ::-1], cols)
    out = padded[np.arange(n)[:, None, None], :, rows, cols]  # (n, h, w, c)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def random_subset(data: ImageSet, count: int | str, seed: int = 0) -> ImageSet:
    """A reproducible random subset of ``count`` images (``"all"`` for every image, in order).

    The same (data, count, seed) always gives the same images, in the same order.
    """
    if isinstance(count, str):
        if count != "all":
            raise ArgumentError(f"count must be a positive integer or 'all', got {count!r}")
        return data
    if not 0 < count <= len(data):
        raise ArgumentError(f"count must be in 1..{len(data)} for {data.source}, got {count}")
    index = np.random.default_rng(seed).choice(len(data), size=count, replace=False)
    return data.take(index, f"{count} random images (seed {seed})")


def calibration_set(data, count: int | str = 200, seed: int = 0) -> ImageSet:
    """MATLAB's default calibration datastore: 200 random training images."""
    return random_subset(data.train, count, seed)


def validation_set(data, count: int | str = 50, seed: int = 0) -> ImageSet:
    """MATLAB's default validation datastore: 50 random test images (``"all"``: the whole set)."""
    return random_subset(data.test, count, seed)
