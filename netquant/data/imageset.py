"""Labelled uint8 images of any size, the pair of splits a command draws from, and the resize.

Every reader in :mod:`netquant.data` returns :class:`ImageSet` values: uint8 NCHW images (RGB for
three channels), int64 labels and a provenance line that is printed next to every result computed
from the set. :func:`resize_crop` brings images of any size to a network's input the way
torchvision's ``Resize`` + ``CenterCrop`` does on PIL images (bilinear, Pillow's resampler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import ArgumentError, DataError, InputError  # noqa: F401  (DataError re-exported: a data set that cannot be read)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images with labels and a description of where they came from.

    ``images``: uint8 (N, C, H, W) NCHW (RGB when C is 3); ``labels``: int64 (N,), class numbers
    0, 1, ...; ``source``: a human-readable provenance line printed next to every result computed
    from this set; ``class_names``: the name of each class number, when known (label 3 of
    CIFAR-10 is ``class_names[3] == "cat"``).
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    class_names: Optional[tuple] = None

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 4:
            raise InputError(f"ImageSet.images: expected a (N, C, H, W) array, got "
                             f"{getattr(self.images, 'shape', type(self.images).__name__)}")
        if self.images.dtype != np.uint8:
            raise InputError(f"ImageSet.images: expected dtype uint8, got {self.images.dtype}")
        labels = np.asarray(self.labels)
        if labels.shape != (len(self.images),):
            raise InputError(f"ImageSet.labels: expected shape ({len(self.images)},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"ImageSet.labels: expected integer class numbers, got dtype {labels.dtype}")
        if labels.dtype != np.int64:
            object.__setattr__(self, "labels", labels.astype(np.int64))
        if labels.size and labels.min() < 0:
            raise InputError(f"ImageSet.labels: class numbers must be >= 0, got {labels.min()}")
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            object.__setattr__(self, "class_names", names)
            if labels.size and labels.max() >= len(names):
                raise InputError(f"ImageSet.labels: label {labels.max()} but only {len(names)} class names")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        """The number of class names, else the largest label + 1."""
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def class_name(self, label: int) -> str:
        """The name of class ``label`` (its number as text when the set has no names)."""
        return self.class_names[label] if self.class_names is not None else str(int(label))

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images {'x'.join(map(str, self.shape))}, {self.source})"

    def take(self, index, what: str) -> "ImageSet":
        """A new set of the images at ``index``; ``what`` is appended to the provenance."""
        if not isinstance(index, slice):
            index = np.asarray(index)
        return ImageSet(self.images[index], self.labels[index], f"{self.source}, {what}", self.class_names)

    def resized(self, size: Sequence[int], resize: Optional[int] = None) -> "ImageSet":
        """These images brought to ``size`` = (H, W) by :func:`resize_crop`; the set itself when
        they already have that size and no ``resize`` is asked for."""
        size = _check_size(size)
        if self.shape[1:] == size and resize is None:
            return self
        images = np.stack([resize_crop_array(img, size, resize) for img in self.images]) if len(self) else \
            np.zeros((0, self.shape[0], *size), np.uint8)
        return ImageSet(images, self.labels, f"{self.source}, {describe_resize(size, resize)}", self.class_names)


@dataclass(frozen=True)
class Splits:
    """The two sets a command draws from: ``train`` (calibration) and ``test`` (validation).

    For a single set of images (one folder, zip or ``.npz``) both are that set."""

    train: ImageSet
    test: ImageSet

    def __repr__(self) -> str:
        if self.train is self.test:
            return f"Splits(one set: {self.train!r})"
        return f"Splits(train={self.train!r}, test={self.test!r})"

    def resized(self, size: Sequence[int], resize: Optional[int] = None) -> "Splits":
        """Both sets brought to ``size`` (see :meth:`ImageSet.resized`)."""
        train = self.train.resized(size, resize)
        test = train if self.test is self.train else self.test.resized(size, resize)
        if train is self.train and test is self.test:
            return self
        return Splits(train, test)


# --- resize + centre crop ---------------------------------------------------------------------

def _check_size(size) -> tuple:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ArgumentError(f"size: expected (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ArgumentError(f"size: expected positive (height, width), got {size!r}")
    return h, w


def resized_dims(height: int, width: int, size: Sequence[int], resize: Optional[int] = None) -> tuple:
    """(new height, new width) before the centre crop to ``size`` = (H, W).

    With ``resize`` (torchvision ``Resize(resize)``): the shorter side becomes ``resize`` and the
    longer one ``floor(resize * long / short)``; a 500x375 photo with ``resize=256`` becomes
    341x256 (floor(256 * 500 / 375) = 341). Without it, the smallest scaling that covers (H, W):
    for a square size that is the shorter side to H (500x375 to 224x224: 298x224).
    """
    h_out, w_out = _check_size(size)
    if resize is not None:
        if resize < max(h_out, w_out):
            raise ArgumentError(f"resize: the shorter side ({resize}) must be at least the crop size {h_out}x{w_out}")
        if width <= height:   # exact integer floor: the same as torchvision's int(float) here
            return resize * height // width, resize
        return resize, resize * width // height
    if h_out * width >= w_out * height:   # the height needs the larger scale h_out / height
        return h_out, h_out * width // height
    return w_out * height // width, w_out


def crop_box(height: int, width: int, size: Sequence[int]) -> tuple:
    """(left, top, right, bottom) of the centre crop, torchvision's rounding: top =
    round((height - H) / 2), so 341 -> 224 starts at row 58 (round(58.5) = 58, half to even)."""
    h_out, w_out = _check_size(size)
    top, left = int(round((height - h_out) / 2.0)), int(round((width - w_out) / 2.0))
    return left, top, left + w_out, top + h_out


def resize_crop(img, size: Sequence[int], resize: Optional[int] = None):
    """A PIL image resized (bilinear) by :func:`resized_dims` and centre-cropped to ``size``."""
    from PIL import Image

    h, w = resized_dims(img.height, img.width, size, resize)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BILINEAR)
    if (h, w) != tuple(size):
        img = img.crop(crop_box(h, w, size))
    return img


def resize_crop_array(image: np.ndarray, size: Sequence[int], resize: Optional[int] = None) -> np.ndarray:
    """:func:`resize_crop` on one uint8 (C, H, W) image; every channel with the same filter
    (Pillow resamples the bands of an RGB image independently, so this equals the RGB path)."""
    from PIL import Image

    c = image.shape[0]
    if c == 3:
        out = np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB"),
                                     size, resize))
        return np.ascontiguousarray(out.transpose(2, 0, 1))
    planes = [np.asarray(resize_crop(Image.fromarray(np.ascontiguousarray(p), "L"), size, resize)) for p in image]
    return np.stack(planes)


def describe_resize(size: Sequence[int], resize: Optional[int] = None) -> str:
    """The provenance words for a resize: ``resized 256 + centre crop 224``."""
    h, w = _check_size(size)
    crop = f"{h}" if h == w else f"{h}x{w}"
    if resize is not None:
        return f"resized {resize} + centre crop {crop}"
    return f"resized {h} + centre crop {crop}" if h == w else f"resized to cover {h}x{w} + centre crop"
