"""The integer numerics of netquant, named once. docs/NUMERICS.md is the prose form; the C and
CUDA runtimes (``netquant/codegen/runtime``) mirror these functions line for line.

Convention: a real value r is represented by an integer q with r = s * q (zero point 0: every
tensor is symmetric; non-negative tensors use the unsigned range 0..255).

Rounding: ROUND_HALF_UP, i.e. floor(v + 1/2). In integers, a right shift by k with rounding is
``(v + 2^(k-1)) >> k`` with an arithmetic shift (which floors). Example: 5 >> 1 rounds 2.5 up
to 3; -5 >> 1 rounds -2.5 up to -2.

Requantization: a real multiplier m > 0 is stored as (M, shift) with M an int32 in
[2^30, 2^31) and m ~= M * 2^-shift; then ``requant(acc) = (acc * M + 2^(shift-1)) >> shift``,
computed in int64 (|acc| < 2^31 and M < 2^31, so the product is below 2^62). Example:
m = 0.0123 = 0.7872 * 2^-6 gives M = round(0.7872 * 2^31) = 1690499128 and shift = 37;
acc = 1000 then gives round(12.3) = 12. A power-of-two scale (MATLAB's "scaled int8") is the
special case M = 2^30: a pure rounding shift.

Saturation: results clamp to the tensor's range (-128..127 signed, 0..255 unsigned), narrowed
by a fused activation (ReLU: the lower bound becomes 0).

Quantizing a float input (the only float->int step inside a network): in float32,
``q = clamp(floor(x * inv_scale + 0.5f), qmin, qmax)`` with ``inv_scale = float32(1/scale)``, no
fused multiply-add (C is compiled with -ffp-contract=off), so Python, C and CUDA agree bit for bit.
Dequantizing: ``r = float32(scale) * float32(q)``.

Accumulator bound: a conv or linear output channel o sums x*w over K terms plus its bias, so
``|acc| <= max|x| * sum_k |w[o,k]| + |bias[o]|``; :func:`accumulator_bound` computes it from the
actual int8 weights and ``verify`` requires it below 2^31. Exactness of float32 BLAS: every
partial sum of integers whose absolute values add up to less than 2^24 is exact in float32, in
any order, so the reference executor multiplies in float32 in chunks of K whose bound is below
2^24 (usually one chunk) and adds chunks in int64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

INT8 = (-128, 127)              # signed activations
UINT8 = (0, 255)                # non-negative activations
WEIGHT_RANGE = (-127, 127)      # weights are symmetric, -128 unused
INT32 = (-(2 ** 31), 2 ** 31 - 1)
# every integer type's range, named once: lowering, the printers, the quantizer's tables and the
# app read them here (an activation of type uint8 at scale 0.02 spans 0..255 * 0.02 = 5.1)
RANGES = {"int8": INT8, "uint8": UINT8, "int32": INT32}
ACC_LIMIT = 2 ** 31             # |accumulator| must stay below this
FLOAT32_EXACT = 2 ** 24         # integers below this in magnitude are exact in float32
MULTIPLIER_BITS = 31            # M in [2^30, 2^31)
MAX_SHIFT = 62
# scale floors (docs/NUMERICS.md, "Scale floors"): degenerate tensors (all-zero or near-zero weight
# channels, dead ReLUs, constant tensors) get scales that keep every integer in range
WEIGHT_SCALE_FLOOR = 2.0 ** -16  # a weight channel's scale >= this times the layer's largest channel scale
MULTIPLIER_CAP = 2.0 ** 16       # an activation's scale >= the step of what produces it / this (m <= 2^16)
SCALE_MIN = 2.0 ** -64           # every activation scale (1/s and s stay normal float32 numbers)


def dtype_range(dtype: str) -> tuple[int, int]:
    """(qmin, qmax) of an integer type: int8 (-128, 127), uint8 (0, 255), int32."""
    return RANGES[dtype]


def quantize_multiplier(m: float) -> tuple[int, int]:
    """(M, shift) with M in [2^30, 2^31) and M * 2^-shift the closest such value to m > 0.

    Example: m = 0.5 gives (2^30, 31); m = 0.0123 gives (1690499128, 37).
    """
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"requantization multiplier must be positive and finite, got {m}")
    f, e = math.frexp(m)                 # m = f * 2^e, f in [0.5, 1)
    M = int(round(f * 2 ** MULTIPLIER_BITS))
    if M == 2 ** MULTIPLIER_BITS:        # f rounded up to 1.0
        M //= 2
        e += 1
    shift = MULTIPLIER_BITS - e
    if shift > MAX_SHIFT:                # m < 2^-31: keep the shift, lose significand bits
        M >>= shift - MAX_SHIFT
        shift = MAX_SHIFT
    if shift < 1:
        raise ValueError(f"requantization multiplier {m} is too large (at most 2^30)")
    return M, shift


def rounding_shift(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round_half_up(v / 2^shift) on int64 tensors: (v + 2^(shift-1)) >> shift (arithmetic).
    ``v`` is overwritten (it is always a temporary accumulator)."""
    return v.add_(1 << (shift - 1)).bitwise_right_shift_(shift)


def requantize(acc: torch.Tensor, M: torch.Tensor, shift: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp((acc * M + 2^(shift-1)) >> shift, lo, hi) in int64, returned as int32. M and shift
    are int64 tensors broadcast against ``acc`` (per output channel: shape (C, 1, 1)); ``acc``
    (int64) is overwritten."""
    return rounding_shift(acc.mul_(M), shift).clamp_(lo, hi).to(torch.int32)


def quantize_input(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """float32 -> int32: clamp(floor(x * float32(1/scale) + 0.5f), lo, hi), each step in float32."""
    inv = float(np.float32(1.0 / scale))
    v = x.to(torch.float32) * inv   # rounded to float32 here, before the addition
    return torch.floor(v + 0.5).clamp_(lo, hi).to(torch.int32)


def dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    """int -> float32: float32(scale) * float32(q)."""
    return q.to(torch.float32) * float(np.float32(scale))


def quantize_weights(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Offline: int8 weights round(w / scale) (half away from zero), clamped to -127..127;
    ``scale`` has one entry per output channel (axis 0) or one in all."""
    s = np.asarray(scale, dtype=np.float64).reshape(-1, *([1] * (w.ndim - 1)))
    q = np.sign(w) * np.floor(np.abs(w.astype(np.float64) / s) + 0.5)
    return np.clip(q, *WEIGHT_RANGE).astype(np.int8)


def floor_weight_scales(raw: np.ndarray, w: np.ndarray, bias: np.ndarray, s_x: float, xmax: int,
                        per_tensor: bool = False) -> np.ndarray:
    """The weight scales of one layer after the floors of docs/NUMERICS.md ("Scale floors").

    ``raw`` (O,) are the range method's scales T/127 (0 for an all-zero channel), ``w`` the float
    weights (O, ...), ``bias`` (O,), ``s_x`` the input scale, ``xmax`` 255 or 128 (the input type).

    1. relative floor: s[o] >= WEIGHT_SCALE_FLOOR * max(raw) (a channel 2^16 times narrower than
       the widest one is quantized at that step; its weights round to 0 or a few steps);
    2. bias floor: with A[o] = xmax * sum_k |round(w[o,k] / s[o])| the weights' share of the
       accumulator bound, s[o] >= |bias[o]| / (s_x * (2^31 - 2 - A[o])), so the int32 bias
       round(bias / (s_x * s)) and the accumulator bound A + |bias| both stay below 2^31. Raising
       s only lowers A, so one pass suffices, and the bias stays exact to one step of its scale;
    3. a channel left at 0 (its weights and bias all zero, in a layer with no other weights)
       takes 1/127, as an all-zero tensor does: any scale represents it exactly.
    Per tensor (``per_tensor``), the one scale is the largest of the floored ones.

    Worked example (a pruned channel, the ShuffleNetV2 case): weights 1e-12, bias 0.05,
    s_x = 0.02, the layer's widest channel T = 0.3. raw = 7.9e-15 would need the bias
    0.05 / (0.02 * 7.9e-15) = 3.2e11 > 2^31; the relative floor gives 0.3/127 * 2^-16 = 3.6e-8,
    the bias becomes 0.05 / (0.02 * 3.6e-8) = 69,358,933 (fits) and the weights round to 0: the
    channel outputs its bias, exactly as the float network does to within 1e-12 * sum |x|.
    """
    raw = np.asarray(raw, np.float64)
    s = np.maximum(raw, WEIGHT_SCALE_FLOOR * raw.max(initial=0.0))
    safe = np.where(s > 0, s, 1.0)  # a zero scale belongs to an all-zero channel: its weights stay 0
    acc_w = accumulator_bound(quantize_weights(w, safe), xmax, np.zeros(len(s), np.int64))
    room = float(ACC_LIMIT - 2) - acc_w.astype(np.float64)
    if (room <= 0).any():
        o = int(np.argmin(room))
        raise ValueError(f"the weights alone reach the int32 accumulator bound 2^31 (output channel {o}: "
                         f"{int(acc_w[o])} from {w[o].size} terms)")
    s = np.maximum(s, np.abs(np.asarray(bias, np.float64)) / (s_x * room))
    if per_tensor:
        s = np.full_like(s, s.max(initial=0.0))
    return np.where(s > 0, s, 1.0 / 127)


def quantize_bias(b: np.ndarray, scale: np.ndarray, where: str) -> np.ndarray:
    """Offline: int32 bias round(b / (s_x * s_w[o])); a bias outside int32 is an error."""
    q = np.sign(b) * np.floor(np.abs(b.astype(np.float64) / scale) + 0.5)
    if np.abs(q).max(initial=0) >= 2 ** 31:
        raise ValueError(f"{where}: bias does not fit int32 at scale {scale.min():.3g}")
    return q.astype(np.int32)


def accumulator_bound(wq: np.ndarray, xmax: int, bias: np.ndarray) -> np.ndarray:
    """Per output channel, max |acc| = xmax * sum_k |w[o, k]| + |bias[o]| (int64)."""
    w = np.abs(wq.reshape(len(wq), -1).astype(np.int64)).sum(1)
    return w * xmax + np.abs(bias.astype(np.int64))


def pow2_scale(s: float) -> float:
    """The power of two at or above ``s`` (so the range still fits): 0.003 -> 2^-8 = 0.0039."""
    return 2.0 ** math.ceil(math.log2(s))
