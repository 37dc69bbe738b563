"""Comparisons of the float and the int8 network on the same images.

- :func:`sqnr_db`: signal-to-quantization-noise ratio 10*log10(sum r^2 / sum (r - q)^2); each
  bit of precision is worth about 6 dB, so a layer at 30 dB keeps about 5 bits of its signal.
- :func:`agreement`: the fraction of images on which both predict the same class.
- :func:`paired_bootstrap`: a confidence interval of the accuracy difference int8 - float,
  resampling images (pairs stay together).
- :func:`mcnemar`: the exact two-sided McNemar test on the discordant pairs.
"""
from __future__ import annotations

import math

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    r = np.asarray(reference, np.float64)
    noise = float(((r - np.asarray(test, np.float64)) ** 2).sum())
    signal = float((r ** 2).sum())
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def agreement(a_scores: np.ndarray, b_scores: np.ndarray) -> float:
    """Percent of images where both score arrays give the same top-1 class."""
    return 100.0 * float((np.argmax(a_scores, 1) == np.argmax(b_scores, 1)).mean())


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(difference, low, high) in percentage points of accuracy(b) - accuracy(a)."""
    a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
    d = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(1) * 100
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean() * 100), float(lo), float(hi)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value: is one network right on images the other gets wrong
    more often than chance? With 3 vs 0 discordant images, p = 0.25."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)
