"""A fake-quant float simulation of a QGraph: the same integer weights, biases and scales, but
float64 arithmetic with the exact real multipliers (s_x * s_w / s_y) in place of (M, shift).

It is the yardstick of the integer executor: fed the same integer inputs, each node's output
may differ from the executor's by at most 1 LSB (the multiplier's 31-bit significand and the
float rounding of the input quantization are the only differences).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.float_exec import FLOAT_KERNELS
from ..ir.interpret import interpret
from ..ir.ops import OPS
from ..quant import numerics as nx
from ..quant.qgraph import QGraph, QNode
from .executor import INT_KERNELS, _ieee_fp32, run_int8


def _round_clamp(y: torch.Tensor, scale: float, clamp) -> torch.Tensor:
    return torch.floor(y / scale + 0.5).clamp_(*clamp).to(torch.int32)


def preactivation(n: QNode, x_int: torch.Tensor, s_x: float) -> torch.Tensor:
    """The real value of a conv or linear node's int32 accumulator, in float64:
    s_x * s_w[o] * (sum_k x[k] w[o, k] + bias[o]), before requantization, rounding and clamp.
    Example: x = 10 at s_x = 0.1, w = 5 at s_w = 0.02, bias 50 gives 0.1 * 0.02 * (50 + 50) = 0.2.
    The integer sum is exact (:func:`integer_sum`), so the one float64 rounding is the product
    with s_x * s_w[o]. (Bias correction and AdaRound measure their errors on this value.)"""
    acc = integer_sum(n, x_int)                                   # (N, O) or (N, O, H, W)
    per_channel = (-1,) + (1,) * (acc.dim() - 2)
    bias = torch.from_numpy(n.params["bias"].astype(np.float64))
    s_w = np.asarray(n.params["weight_scale"], np.float64)     # (O,), or one per tensor
    scale = torch.from_numpy(np.broadcast_to(s_x * s_w, bias.shape).copy())
    return acc.add_(bias.view(per_channel)).mul_(scale.view(per_channel))


# 255 * 8 * K < 2^24 for K < 8,224: the split form below covers every 3x3x512 and 1x1x2048 layer
_SPLIT = 16


def integer_sum(n: QNode, x_int: torch.Tensor) -> torch.Tensor:
    """sum_k x[k] w[o, k] of a conv or linear node exactly, as float64 (N, O, ...), computed on
    its own (not by the executor's k_chunks). A float32 product of integers is exact while every
    partial sum stays below 2^24 (docs/NUMERICS.md, "Exactness of float32 BLAS"), so with
    B = max|x| * max_o sum_k |w[o, k]|:

    - B < 2^24: one float32 conv (oneDNN, pinned to IEEE);
    - else the weights split as w = 16 h + l, l = ((w + 8) mod 16) - 8 in -8..7 and h in -8..8
      (127 = 16 * 8 - 1), and the two float32 products are exact while max|x| * 8 * K < 2^24
      (K < 8,224 at uint8 input): sum = 16 * (x . h) + (x . l), added in float64;
    - else one float64 product (exact below 2^53).

    Worked: x = 255 on K = 576 terms of w = 127 gives B = 18.7M > 2^24; h = 8, l = -1 give
    16 * 1,175,040 - 146,880 = 18,653,760 = 255 * 127 * 576, each part below 2^24.
    Float32 runs about 6x faster than a float64 conv here (oneDNN has no float64 kernels)."""
    wq = n.params["weight"]
    xmax = float(x_int.abs().max()) if x_int.numel() else 0.0
    terms = np.abs(wq.reshape(len(wq), -1).astype(np.int64)).sum(1).max(initial=0)
    k = wq[0].size

    def product(w: np.ndarray, dtype) -> torch.Tensor:
        wt, xt = torch.from_numpy(w.astype(np.float64 if dtype == torch.float64 else np.float32)), x_int.to(dtype)
        if n.op == "conv":
            a = n.attrs
            out = F.conv2d(xt, wt, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            out = F.linear(xt.reshape(len(xt), -1), wt.reshape(len(wt), -1))
        return out.to(torch.float64)

    with _ieee_fp32():
        if xmax * terms < nx.FLOAT32_EXACT:
            return product(wq, torch.float32)
        if xmax * (_SPLIT // 2) * k < nx.FLOAT32_EXACT:
            w = wq.astype(np.int32)
            low = (w + _SPLIT // 2) % _SPLIT - _SPLIT // 2
            return product((w - low) // _SPLIT, torch.float32).mul_(_SPLIT).add_(product(low, torch.float32))
        return product(wq, torch.float64)


def _window_sum(n: QNode, ins: list, srcs: list) -> torch.Tensor:
    a = n.attrs
    y = F.avg_pool2d(ins[0].to(torch.float64) * srcs[0].scale, a["kernel"], a["stride"], a["padding"])
    return _round_clamp(y, n.scale, a["clamp"]).reshape(len(y), *n.shape)


# the float64 simulation of each quantization rule of the op table (netquant/ir/ops.py RULES)
FAKE_RULES = {
    "gemm": lambda n, ins, srcs: _round_clamp(preactivation(n, ins[0], srcs[0].scale), n.scale, n.attrs["clamp"]),
    "rescale_sum": lambda n, ins, srcs: _round_clamp(sum(q.to(torch.float64) * s.scale for q, s in zip(ins, srcs)),
                                                     n.scale, n.attrs["clamp"]),
    "rescale_each": lambda n, ins, srcs: torch.cat([_round_clamp(q.to(torch.float64) * s.scale, n.scale,
                                                                 n.attrs["clamp"]) for q, s in zip(ins, srcs)], 1),
    "window_sum": _window_sum,
    "quantize": lambda n, ins, srcs: _round_clamp(ins[0].to(torch.float64), n.scale, n.attrs["clamp"]),
    "dequantize": lambda n, ins, srcs: ins[0].to(torch.float64) * n.scale,
    # exact data movement and clamps: the integer kernel is the simulation
    "same_scale": lambda n, ins, srcs: INT_KERNELS[n.op](n, *ins),
    "clamp": lambda n, ins, srcs: INT_KERNELS[n.op](n, *ins),
}


def fake_node(n: QNode, ins: list, srcs: list) -> torch.Tensor:
    """One node in float64 from integer inputs ``ins`` produced by nodes ``srcs``."""
    if n.quantized or n.op == "dequantize":
        return FAKE_RULES[OPS[n.op].rule](n, ins, srcs)
    return FLOAT_KERNELS[n.op](n, *[i.to(torch.float32) for i in ins])


def layerwise_lsb(q: QGraph, x) -> dict:
    """{node: max |executor - fake-quant| in LSB} for every integer node, each fake-quant node fed
    the executor's own inputs."""
    vals = run_int8(q, x)
    out = {}
    by = {n.name: n for n in q.nodes}
    with torch.no_grad():
        for n in q.nodes:
            if not n.quantized:
                continue
            ins = [vals[i] for i in n.inputs]
            fake = fake_node(n, ins, [by[i] for i in n.inputs])
            out[n.name] = int((fake.to(torch.int64) - vals[n.name].to(torch.int64)).abs().max())
    return out


def run_fakequant(q: QGraph, x) -> torch.Tensor:
    """The whole network in fake-quant float64, end to end; returns the output."""
    by = {n.name: n for n in q.nodes}
    with torch.no_grad():
        vals = interpret(q.nodes, q.output, torch.as_tensor(x, dtype=torch.float32),
                         lambda n, *ins: fake_node(n, list(ins), [by[i] for i in n.inputs]), keep=())
    return vals[q.output]
