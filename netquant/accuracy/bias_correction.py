"""Empirical bias correction (Nagel et al. 2019, section 4.2; AIMET's "empirical" mode): quantizing
a layer's weights and its input shifts the mean of its output, and the layers after it see a
biased input. On the calibration images, each conv and linear layer of the quantized network
gets its float bias shifted by minus the mean error of its pre-activation, per output channel:

    delta[o] = mean_{n,h,w} (s_x s_w[o] (W_q * x_q)[o] + b[o])  -  mean_{n,h,w} (W * x + b)[o]
    b'[o]    = b[o] - delta[o]

where x_q is the layer's integer input in the quantized network (every earlier layer already
corrected) and x its float input in the float network. Worked example: a channel whose quantized
pre-activation averages 0.512 where the float one averages 0.500 gets its bias lowered by 0.012.

The layers are corrected in one pass over the quantized network in graph order, so each
correction sees the corrected layers before it. The correction is stored in the float graph as
the node parameter ``bias_correction`` (float32, (O,)); lowering adds it to the bias when the
config has ``bias_correction`` (:func:`netquant.quant.lower._adjusted_bias`).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from ..calib.stats import RangeTable
from ..ir.float_exec import FLOAT_KERNELS, apply_act
from ..ir.graph import WEIGHTED_OPS, Graph
from ..ir.interpret import interpret
from ..quant import numerics as nx
from ..quant.config import QuantConfig
from ..quant.lower import lower
from ..ref.executor import INT_KERNELS, _ieee_fp32
from ..ref.fakequant import preactivation

log = logging.getLogger(__name__)

MAX_IMAGES = 1024


def _channel_mean(y: torch.Tensor) -> np.ndarray:
    """Mean over every axis but the channels (axis 1): (N, O, H, W) or (N, O) -> (O,)."""
    dims = [0] + list(range(2, y.dim()))
    return y.to(torch.float64).mean(dim=dims).numpy()


def float_preactivation_means(graph: Graph, x: torch.Tensor, batch_size: int = 256) -> dict:
    """{conv/linear node: per-channel mean of its float pre-activation W * x + b over ``x``}."""
    sums: dict = {}

    def compute(n, *ins):
        if n.op in WEIGHTED_OPS:
            a = dict(n.attrs)
            act = a.pop("act", None)
            pre = FLOAT_KERNELS[n.op](n.with_(attrs=a), *ins)
            sums[n.name] = sums.get(n.name, 0.0) + _channel_mean(pre) * len(pre)
            return apply_act(pre, act)
        return FLOAT_KERNELS[n.op](n, *ins)

    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            interpret(graph.nodes, graph.output, x[start:start + batch_size], compute, keep=())
    return {k: v / len(x) for k, v in sums.items()}


def strip(graph: Graph) -> Graph:
    """``graph`` without bias corrections."""
    nodes = [n.with_(params={k: v for k, v in n.params.items() if k != "bias_correction"})
             if "bias_correction" in n.params else n for n in graph.nodes]
    return graph.replace_nodes(nodes)


def correct_biases(graph: Graph, ranges: RangeTable, config: QuantConfig, images,
                   user_float: frozenset = frozenset()) -> Graph:
    """``graph`` with the ``bias_correction`` of every quantized conv and linear layer computed
    on ``images`` (float32 (N, C, H, W), at most MAX_IMAGES used), for the integer network that
    ``lower(graph, ranges, config, user_float)`` builds (its AdaRound weights included)."""
    x = torch.as_tensor(np.asarray(images[:MAX_IMAGES]), dtype=torch.float32)
    graph = strip(graph)
    f_means = float_preactivation_means(graph, x)
    qg = lower(graph, ranges, replace(config, bias_correction=False), user_float)
    by = {n.name: n for n in qg.nodes}
    fnodes = {n.name: n for n in graph.nodes}
    corrections: dict = {}

    def compute(n, *ins):
        if not (n.quantized or n.op == "dequantize"):
            return FLOAT_KERNELS[n.op](n, *ins)
        if n.quantized and n.op in WEIGHTED_OPS:
            src = by[n.inputs[0]]
            s_x, s_w = src.scale, n.params["weight_scale"]
            delta = _channel_mean(preactivation(n, ins[0], s_x)) - f_means[n.name]
            corr = (-delta).astype(np.float32)
            b = fnodes[n.name].params["bias"].astype(np.float64) + corr
            corrections[n.name] = corr
            n = n.with_(params={**n.params, "bias": nx.quantize_bias(b, s_x * s_w, n.name)})
        return INT_KERNELS[n.op](n, *ins)

    with torch.no_grad(), _ieee_fp32():
        interpret(qg.nodes, qg.output, x, compute, keep=())
    nodes = [n.with_(params={**n.params, "bias_correction": corrections[n.name]}) if n.name in corrections else n
             for n in graph.nodes]
    if corrections:
        worst = max(corrections.items(), key=lambda kv: float(np.abs(kv[1]).max()))
        log.info("bias correction: %d layers on %d images (largest shift %.3g in %s)", len(corrections), len(x),
                 float(np.abs(worst[1]).max()), worst[0])
    return graph.replace_nodes(nodes)


def mean_output_errors(graph: Graph, ranges: RangeTable, config: QuantConfig, images,
                       user_float: frozenset = frozenset()) -> dict:
    """{quantized conv/linear layer: per output channel, the mean over ``images`` of its
    quantized pre-activation (its integer input in the quantized network, its integer weights and
    bias) minus its float pre-activation in the float network}: what :func:`correct_biases`
    drives to about 0 on the calibration images."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    f_means = float_preactivation_means(graph, x)
    qg = lower(graph, ranges, config, user_float)
    by = {n.name: n for n in qg.nodes}
    out = {}

    def compute(n, *ins):
        if n.quantized and n.op in WEIGHTED_OPS:
            out[n.name] = _channel_mean(preactivation(n, ins[0], by[n.inputs[0]].scale)) - f_means[n.name]
        table = INT_KERNELS if (n.quantized or n.op == "dequantize") else FLOAT_KERNELS
        return table[n.op](n, *ins)

    with torch.no_grad(), _ieee_fp32():
        interpret(qg.nodes, qg.output, x, compute, keep=())
    return out
