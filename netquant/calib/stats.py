"""What calibration observed, kept apart from what the quantizer decides.

:class:`RangeStats` holds, for one tensor: min and max, per-channel min and max, the number of
values, a symmetric linear histogram (for percentile, entropy and MSE range methods) and a
log2-magnitude histogram (what MATLAB's app draws). :class:`RangeTable` maps tensor keys to them.

The linear histogram covers [-limit, limit] with ``2 * HALF_BINS`` equal bins, and ``limit`` is
a power of two. When a batch holds a value beyond it, the limit doubles and pairs of bins merge,
which is exact: no count is ever re-estimated. For example with limit 4 and 2048 bins each bin
is 1/256 wide; a value of 5.3 doubles the limit to 8 and the width to 1/128.

The log2 histogram has one bin per exponent e in [LOG2_MIN, LOG2_MAX] holding the values with
2^e <= |x| < 2^(e+1) (the ends collect everything smaller or larger), plus a count of zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ..errors import InputError, NotFoundError

HALF_BINS = 1024
LOG2_MIN, LOG2_MAX = -32, 15
KINDS = ("Weights", "Bias", "Activations")


def _pow2_ceil(v: float) -> float:
    return 2.0 ** math.ceil(math.log2(v)) if v > 0 else 2.0 ** -24


@dataclass(frozen=True)
class RangeStats:
    """Statistics of one tensor (immutable; :meth:`update` returns a new one)."""

    kind: str                     # Weights, Bias or Activations
    node: str                     # Optimized Layer Name of the node that owns or produces it
    layer: str                    # Network Layer Name
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    channel_min: Optional[np.ndarray] = None   # (C,) over every other axis
    channel_max: Optional[np.ndarray] = None
    limit: float = 0.0            # the linear histogram covers [-limit, limit]
    hist: np.ndarray = field(default_factory=lambda: np.zeros(2 * HALF_BINS, np.int64))
    log2_hist: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_MAX - LOG2_MIN + 1, np.int64))
    zeros: int = 0

    @property
    def key(self) -> str:
        return self.node if self.kind == "Activations" else f"{self.node}_{self.kind}"

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def update(self, x: np.ndarray, channel_axis: Optional[int] = 1) -> "RangeStats":
        """Fold in a batch of values. ``channel_axis``: which axis is the channel (None: none)."""
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return self
        if not np.isfinite(x).all():
            raise InputError(f"{self.key}: calibration saw NaN or inf values")
        lo, hi = float(x.min()), float(x.max())
        cmin = cmax = None
        if channel_axis is not None and x.ndim > channel_axis:
            axes = tuple(i for i in range(x.ndim) if i != channel_axis)
            cmin, cmax = x.min(axis=axes), x.max(axis=axes)
            if self.channel_min is not None:
                cmin, cmax = np.minimum(cmin, self.channel_min), np.maximum(cmax, self.channel_max)
        limit, hist = self.limit, self.hist
        need = max(abs(lo), abs(hi))
        if limit == 0.0:
            limit = _pow2_ceil(need)
        while need > limit:
            limit, hist = limit * 2, _halve(hist)
        width = limit / HALF_BINS
        idx = np.floor(x.ravel() / width).astype(np.int64) + HALF_BINS
        hist = hist + np.bincount(np.clip(idx, 0, 2 * HALF_BINS - 1), minlength=2 * HALF_BINS)
        mag = np.abs(x.ravel())
        nz = mag[mag > 0]
        e = np.clip(np.floor(np.log2(nz)).astype(np.int64), LOG2_MIN, LOG2_MAX) - LOG2_MIN
        log2 = self.log2_hist + np.bincount(e, minlength=len(self.log2_hist))
        return replace(self, count=self.count + x.size, min=min(self.min, lo), max=max(self.max, hi),
                       channel_min=cmin, channel_max=cmax, limit=limit, hist=hist, log2_hist=log2,
                       zeros=self.zeros + int(mag.size - nz.size))

    def to_json(self) -> dict:
        return {"kind": self.kind, "node": self.node, "layer": self.layer, "count": self.count,
                "min": self.min, "max": self.max, "limit": self.limit, "zeros": self.zeros}

    def arrays(self) -> dict:
        out = {"hist": self.hist, "log2_hist": self.log2_hist}
        if self.channel_min is not None:
            out["channel_min"], out["channel_max"] = self.channel_min, self.channel_max
        return out

    @classmethod
    def from_saved(cls, meta: dict, arrays: dict) -> "RangeStats":
        return cls(**meta, hist=arrays["hist"], log2_hist=arrays["log2_hist"],
                   channel_min=arrays.get("channel_min"), channel_max=arrays.get("channel_max"))

    def __repr__(self) -> str:
        return f"RangeStats({self.key}: {self.count} values in [{self.min:.4g}, {self.max:.4g}])"


def _halve(hist: np.ndarray) -> np.ndarray:
    """Counts of the same values after the histogram limit doubles (pairs of bins merge)."""
    n = len(hist) // 2
    out = np.zeros_like(hist)
    np.add.at(out, (n + np.arange(len(hist))) // 2, hist)
    return out


@dataclass(frozen=True)
class RangeTable:
    """Statistics of every calibrated tensor, keyed by :attr:`RangeStats.key`, in graph order."""

    stats: dict
    images: int = 0
    source: str = ""             # what data calibration ran on
    fingerprint: str = ""        # of the graph it was calibrated on

    def __getitem__(self, key: str) -> RangeStats:
        try:
            return self.stats[key]
        except KeyError:
            raise NotFoundError(f"no calibration statistics for {key!r}") from None

    def __contains__(self, key) -> bool:
        return key in self.stats

    def __iter__(self):
        return iter(self.stats.values())

    def __len__(self) -> int:
        return len(self.stats)

    def __repr__(self) -> str:
        return f"RangeTable({len(self)} tensors from {self.images} images: {self.source})"
