"""Data: CIFAR-10 readers with checksums, the embedded sample, your own images (image folders,
zips, .npz), subsets, batches and tiles."""
from .cifar10 import CLASSES, Cifar10, load_cifar10, read_cifar10, read_sample
from .folder import load_images, open_data
from .imageset import DataError, ImageSet, Splits
from .tile import random_tile_png, tile
from .transforms import (CIFAR10_MEAN, CIFAR10_STD, batches, calibration_set, random_subset,
                         to_float, validation_set)

__all__ = ["CLASSES", "Cifar10", "DataError", "ImageSet", "Splits", "load_cifar10", "load_images",
           "open_data", "read_cifar10", "read_sample", "random_tile_png", "tile", "CIFAR10_MEAN",
           "CIFAR10_STD", "batches", "calibration_set", "random_subset", "to_float", "validation_set"]
