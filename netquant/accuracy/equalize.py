"""Cross-layer equalisation (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019): a float-graph pass that evens out the weight ranges of two layers
joined by a ReLU, so per-tensor (and power-of-two) weight scales waste fewer levels.

For a pair y = W2 relu(W1 x + b1) + b2 and any s_i > 0, relu(v / s_i) = relu(v) / s_i, so

    W1[i, :] / s_i,  b1[i] / s_i,  W2[:, i] * s_i

computes the same y. With r1_i = max|W1[i, :]| and r2_i = max|W2[:, i]| (the ranges of output
channel i of the first layer and of input channel i of the second), s_i = sqrt(r1_i / r2_i) makes
both ranges sqrt(r1_i * r2_i). Worked example: r1 = 8, r2 = 0.5 gives s = 4 and both ranges 2.

The second layer may be grouped (depthwise included): input channel i of a conv with g groups
is column i mod (C/g) of the output channels of group i // (C/g). The first may be any conv or
linear layer whose output goes only to the second. A fused ReLU (or no activation) joins them;
ReLU6 and other clamps do not scale with s and end a pair. Chains (pointwise -> depthwise ->
pointwise) are equalised by repeating the pass until the scales stop changing.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..ir.graph import WEIGHTED_OPS, Graph, Node

log = logging.getLogger(__name__)

SCALE_LIMITS = (1e-4, 1e4)   # s is clamped here: a channel 10^8 narrower than its partner is left almost as is


def _scales_with_relu(act) -> bool:
    """Does the fused activation commute with a positive per-channel scale?"""
    return act is None or (act[0] == 0.0 and act[1] == math.inf)


def equalizable_pairs(graph: Graph) -> list[tuple[str, str]]:
    """(first, second) node names of the layer pairs cross-layer equalisation may rescale: a
    conv or linear whose only reader is a conv or linear reading it directly, joined by ReLU or
    nothing, with matching channel counts."""
    pairs = []
    for n in graph.nodes:
        if n.op not in WEIGHTED_OPS or n.name == graph.output or not _scales_with_relu(n.attrs.get("act")):
            continue
        readers = graph.consumers(n.name)
        if len(readers) != 1 or readers[0].op not in WEIGHTED_OPS:
            continue
        m = readers[0]
        channels = n.params["weight"].shape[0]
        if m.op == "conv":
            cin = m.params["weight"].shape[1] * m.attrs.get("groups", 1)
            if len(n.shape) != 3 or cin != channels:
                continue
        elif m.params["weight"].shape[1] != channels or len(n.shape) != 1:
            continue   # a linear layer reading a feature map (flattened) is not a channel-wise pair
        pairs.append((n.name, m.name))
    return pairs


def _in_channel_view(w: np.ndarray, groups: int) -> np.ndarray:
    """W2 (O, C/g, ...) viewed as (g, O/g, C/g, rest): axis (0, 2) together index input channels."""
    o, cg = w.shape[:2]
    return w.reshape(groups, o // groups, cg, -1)


def _input_ranges(w: np.ndarray, groups: int) -> np.ndarray:
    """r2_i = max |W2[:, i]| over the output channels that read input channel i, shape (C,)."""
    v = np.abs(_in_channel_view(w, groups))
    return v.max(axis=(1, 3)).reshape(-1)   # (g, C/g) -> C, input channel i = group * C/g + j


def _scale_inputs(w: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    v = _in_channel_view(w.astype(np.float64), groups)
    g, _, cg, _ = v.shape
    return (v * s.reshape(g, 1, cg, 1)).reshape(w.shape)


def equalize_pair(first: Node, second: Node) -> tuple[Node, Node, np.ndarray]:
    """The two nodes rescaled so channel i of ``first`` and input channel i of ``second`` have
    the same weight range; also returns the scales s (first's outputs are divided by s)."""
    w1, b1, w2 = first.params["weight"], first.params["bias"], second.params["weight"]
    groups = second.attrs.get("groups", 1) if second.op == "conv" else 1
    r1 = np.abs(w1.reshape(len(w1), -1)).max(1).astype(np.float64)
    r2 = _input_ranges(w2, groups).astype(np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.clip(np.sqrt(r1[ok] / r2[ok]), *SCALE_LIMITS)
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    p1 = {**first.params, "weight": (w1 / s.reshape(shape1)).astype(w1.dtype), "bias": (b1 / s).astype(b1.dtype)}
    p2 = {**second.params, "weight": _scale_inputs(w2, groups, s).astype(w2.dtype)}
    return first.with_(params=p1), second.with_(params=p2), s


def equalize(graph: Graph, iterations: int = 20, tol: float = 1e-3) -> Graph:
    """``graph`` with every pair of :func:`equalizable_pairs` equalised, repeated up to
    ``iterations`` times until every scale is within ``tol`` of 1 (chains converge). The float
    output is unchanged up to float32 rounding (measured on ResNet-20: 2e-6 of the largest score)."""
    pairs = equalizable_pairs(graph)
    if not pairs:
        log.info("cross-layer equalisation: no conv pairs joined by ReLU")
        return graph
    nodes = {n.name: n for n in graph.nodes}
    for it in range(iterations):
        worst = 0.0
        for a, b in pairs:
            nodes[a], nodes[b], s = equalize_pair(nodes[a], nodes[b])
            worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
        if worst < math.log1p(tol):
            break
    log.info("cross-layer equalisation: %d layer pairs, %d passes", len(pairs), it + 1)
    return graph.replace_nodes([nodes[n.name] for n in graph.nodes])
