"""Calibration: statistics of weights, biases and activations, and range methods."""
from .calibrate import calibrate, graph_fingerprint
from .methods import METHODS, threshold
from .stats import RangeStats, RangeTable

__all__ = ["calibrate", "graph_fingerprint", "METHODS", "threshold", "RangeStats", "RangeTable"]
