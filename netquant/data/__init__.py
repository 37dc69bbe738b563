"""CIFAR-10 data: readers with checksums, the embedded sample, subsets, batches and tiles."""
from .cifar10 import (CLASSES, Cifar10, DataError, ImageSet, load_cifar10, read_cifar10,
                      read_sample)
from .tile import random_tile_png, tile
from .transforms import (CIFAR10_MEAN, CIFAR10_STD, batches, calibration_set, random_subset,
                         to_float, validation_set)

__all__ = ["CLASSES", "Cifar10", "DataError", "ImageSet", "load_cifar10", "read_cifar10",
           "read_sample", "random_tile_png", "tile", "CIFAR10_MEAN", "CIFAR10_STD", "batches",
           "calibration_set", "random_subset", "to_float", "validation_set"]
