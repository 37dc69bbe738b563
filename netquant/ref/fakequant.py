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
from ..quant.qgraph import QGraph, QNode
from .executor import INT_KERNELS, run_int8


def _round_clamp(y: torch.Tensor, scale: float, clamp) -> torch.Tensor:
    return torch.floor(y / scale + 0.5).clamp_(*clamp).to(torch.int32)


def preactivation(n: QNode, x_int: torch.Tensor, s_x: float) -> torch.Tensor:
    """The real value of a conv or linear node's int32 accumulator, in float64:
    s_x * s_w[o] * (sum_k x[k] w[o, k] + bias[o]), before requantization, rounding and clamp.
    Example: x = 10 at s_x = 0.1, w = 5 at s_w = 0.02, bias 50 gives 0.1 * 0.02 * (50 + 50) = 0.2.
    (Bias correction and AdaRound measure their errors on this value.)"""
    s_w = n.params["weight_scale"]
    x = x_int.to(torch.float64) * s_x
    wq = n.params["weight"]
    w = torch.from_numpy(wq.astype(np.float64) * s_w.reshape(-1, *([1] * (wq.ndim - 1))))
    b = torch.from_numpy(n.params["bias"].astype(np.float64) * s_x * s_w)
    if n.op == "conv":
        a = n.attrs
        return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
    return F.linear(x.reshape(len(x), -1), w, b)


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
