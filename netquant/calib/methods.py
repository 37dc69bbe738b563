"""Range methods: from observed statistics to the clipping threshold T of a symmetric int8 range.

Every method returns T > 0; the quantizer then uses scale T/127 (signed) or T/255 (unsigned).

- ``minmax``: T = max(|min|, |max|). Nothing saturates.
- ``percentile``: the smallest T that holds ``percentile`` % of the magnitudes (99.99 default).
- ``entropy``: TensorRT's KL-divergence search over T on the magnitude histogram.
- ``mse``: the T that minimises the expected squared error (rounding noise Δ²/12 inside, the
  clipping error (|x| - T)² outside), estimated from the histogram.

All work on the magnitude histogram: folding the symmetric linear histogram at zero gives
HALF_BINS bins of |x|, bin i covering [i, i+1) * limit / HALF_BINS.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArgumentError, StateError
from ..quant.config import RANGE_METHODS as METHODS
from .stats import HALF_BINS, RangeStats


def magnitude_hist(s: RangeStats) -> np.ndarray:
    """Counts of |x| per bin: positive half plus the mirrored negative half."""
    neg, pos = s.hist[:HALF_BINS], s.hist[HALF_BINS:]
    return pos + neg[::-1]


def threshold(s: RangeStats, method: str, levels: int, percentile: float = 99.99) -> float:
    """Clipping threshold of tensor ``s`` by ``method``; ``levels`` is 127 or 255."""
    if s.count == 0:
        raise StateError(f"{s.key}: no calibration data")
    amax = s.absmax
    if amax == 0:
        return 1.0  # an all-zero tensor: any scale represents it exactly
    if method == "minmax":
        return amax
    width = s.limit / HALF_BINS
    mag = magnitude_hist(s).astype(np.float64)
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ArgumentError(f"percentile must be in (0, 100], got {percentile}")
        cdf = np.cumsum(mag) / mag.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return min(amax, (i + 1) * width)
    if method == "entropy":
        return min(amax, _entropy(mag, levels + 1) * width)
    if method == "mse":
        return min(amax, _mse(mag, width, levels))
    raise ArgumentError(f"unknown range method {method!r}; known: {', '.join(METHODS)}")


def _entropy(mag: np.ndarray, nbins: int) -> float:
    """TensorRT's calibration: choose i >= nbins minimising KL(P || Q), where P is the histogram
    clipped at bin i (outliers added to the last bin) and Q is P merged into ``nbins`` levels and
    spread back evenly over the bins that were non-zero. Returns the threshold in bins."""
    last = int(np.nonzero(mag)[0][-1]) + 1
    if last <= nbins:
        return float(last)
    best, best_i = np.inf, last
    for i in np.unique(np.linspace(nbins, last, 128).astype(int)):
        p = mag[:i].copy()
        p[i - 1] += mag[i:].sum()
        starts = (np.arange(nbins) * i) // nbins            # nbins levels over i bins
        nonzero = (mag[:i] > 0).astype(np.float64)
        level_sum = np.add.reduceat(mag[:i], starts)
        level_nz = np.add.reduceat(nonzero, starts)
        level = np.repeat(np.arange(nbins), np.diff(np.append(starts, i)))
        q = np.where(nonzero > 0, level_sum[level] / np.maximum(level_nz[level], 1), 0.0)
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-30)
        m = pn > 0
        if np.any(qn[m] == 0):
            continue
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best:
            best, best_i = kl, i
    return float(best_i)


def _mse(mag: np.ndarray, width: float, levels: int) -> float:
    centres = (np.arange(len(mag)) + 0.5) * width
    last = int(np.nonzero(mag)[0][-1]) + 1
    candidates = np.linspace(width, last * width, 200)
    errs = []
    for t in candidates:
        step = t / levels
        inside = centres <= t
        err = np.where(inside, step * step / 12.0, (centres - t) ** 2)
        errs.append(float((mag * err).sum()))
    return float(candidates[int(np.argmin(errs))])
