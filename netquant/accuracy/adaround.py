"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML
2020): each weight is rounded up or down, whichever the layer's output on the calibration images
prefers, rather than to the nearest level.

Per conv or linear layer, in graph order, with s_w the weight scales lowering chose and L the
largest level (127 for 8 bits, 7 for 4):

    W~ = s_w * clamp(floor(W / s_w) + h(V), -L, L),   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1, V initialised so that h(V) = W/s_w - floor(W/s_w) (W~ = W at the
start). V minimises, by Adam on torch autograd over batches of calibration images,

    || act(W~ * x_q + b) - act(W * x + b) ||^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

where x_q is the layer's dequantized input in the quantized network (earlier layers already
rounded this way), x its float input, act its fused activation; the regulariser (lambda = 0.01,
beta annealed from 20 to 2 after a 20% warm-up) pushes every h to 0 or 1. The result is
h >= 0.5 rounded up. Worked example: W/s_w = 3.4 rounds to 3 to nearest; AdaRound makes it 4 when
the layer's output on the images is closer with 4 (errors of other weights cancel).

The learned weights are kept only when they reconstruct the layer's output on all the images
better than rounding to nearest. They are stored in the float graph as node parameters
``adaround_weight`` (int8, the weight's shape) and ``adaround_scale`` (float64 (O,), the scales
they were learned for); lowering uses them when the config has ``adaround`` and the scales still
match (:func:`netquant.quant.lower._adjusted_weights`), so the reference executor, the
fake-quant simulation and the generated code run them like any integer weights.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..calib.stats import RangeTable
from ..ir.float_exec import apply_act, run_float
from ..ir.graph import WEIGHTED_OPS, Graph, Node
from ..progress import Progress, report
from ..quant.config import QuantConfig
from ..quant.lower import lower
from ..quant.qgraph import QGraph
from ..ref.executor import run_int8

log = logging.getLogger(__name__)

MAX_IMAGES = 1024            # the calibration images AdaRound uses, at most
TENSOR_BYTES = 256 * 2 ** 20  # fewer images for a layer whose input for all of them would pass this
ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2
BATCH = 32
LR = 1e-2
PARAMS = ("adaround_weight", "adaround_scale")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h for h in (0, 1)."""
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def strip(graph: Graph) -> Graph:
    """``graph`` without AdaRound weights."""
    nodes = [n.with_(params={k: v for k, v in n.params.items() if k not in PARAMS})
             if any(k in n.params for k in PARAMS) else n for n in graph.nodes]
    return graph.replace_nodes(nodes)


def _value(nodes, output: str, x: torch.Tensor, run, batch: int = 256) -> torch.Tensor:
    """The value of node ``output`` for images ``x`` (in batches; nodes after it are not run)."""
    return torch.cat([run(nodes, output, x[i:i + batch]) for i in range(0, len(x), batch)])


def _run_float_until(graph: Graph, name: str, x):
    idx = graph.names().index(name)
    g = graph.replace_nodes(graph.nodes[:idx + 1], output=name)
    return _value(g, name, x, lambda g_, out, xb: run_float(g_, xb, keep=())[out])


def _run_int_until(qg: QGraph, name: str, x):
    names = [n.name for n in qg.nodes]
    sub = QGraph(qg.nodes[:names.index(name) + 1], name, qg.input)
    return _value(sub, name, x, lambda q_, out, xb: run_int8(q_, xb, keep=())[out])


def _layer_fn(n: Node):
    """f(x, w) -> pre-activation of the float node ``n`` with weights ``w`` (float32 tensors)."""
    b = torch.from_numpy(np.ascontiguousarray(n.params["bias"], np.float32))
    if n.op == "conv":
        a = n.attrs
        return lambda x, w: F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
    return lambda x, w: F.linear(x.reshape(len(x), -1), w, b)


def _recon(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over images and pixels."""
    return ((y - t) ** 2).sum(1).mean()


def learn_rounding(n: Node, s_w: np.ndarray, levels: int, x_q: torch.Tensor, x_f: torch.Tensor,
                   iterations: int, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """AdaRound for one layer: (int8 weights, reconstruction error with them, with rounding to
    nearest), both errors measured on all of ``x_q``/``x_f``."""
    w = torch.from_numpy(np.ascontiguousarray(n.params["weight"], np.float32))
    s = torch.from_numpy(np.asarray(s_w, np.float32)).view(-1, *([1] * (w.dim() - 1)))
    act = n.attrs.get("act")
    f = _layer_fn(n)
    with torch.no_grad():
        target = torch.cat([apply_act(f(x_f[i:i + 256], w), act) for i in range(0, len(x_f), 256)])
    # W / s_w in float64, as lowering divides: floor and the nearest level are those of lowering
    ratio = torch.from_numpy(n.params["weight"].astype(np.float64)
                             / np.asarray(s_w, np.float64).reshape(-1, *([1] * (w.dim() - 1))))
    w_floor = torch.floor(ratio).to(torch.float32)
    v = _inverse((ratio - torch.floor(ratio)).to(torch.float32)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=LR)
    gen = torch.Generator().manual_seed(seed)
    warm = int(WARMUP * iterations)
    for it in range(iterations):
        idx = torch.randint(0, len(x_q), (min(BATCH, len(x_q)),), generator=gen)
        h = rectified_sigmoid(v)
        w_soft = s * torch.clamp(w_floor + h, -levels, levels)
        loss = _recon(apply_act(f(x_q[idx], w_soft), act), target[idx])
        if it >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (it - warm) / max(1, iterations - warm))
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = torch.clamp(w_floor + (rectified_sigmoid(v) >= 0.5).to(torch.float32), -levels, levels)
        nearest = torch.clamp(torch.sign(ratio) * torch.floor(ratio.abs() + 0.5), -levels, levels).to(torch.float32)

        def error(wq):
            return float(sum(_recon(apply_act(f(x_q[i:i + 256], s * wq), act), target[i:i + 256]) * len(x_q[i:i + 256])
                             for i in range(0, len(x_q), 256)) / len(x_q))

        e_learned, e_nearest = error(learned), error(nearest)
    return learned.numpy().astype(np.int8), e_learned, e_nearest


def adaround(graph: Graph, ranges: RangeTable, config: QuantConfig, images,
             user_float: frozenset = frozenset(), progress: Optional[Progress] = None) -> Graph:
    """``graph`` with AdaRound weights for every conv and linear layer that
    ``lower(graph, ranges, config, user_float)`` quantizes, learned on ``images`` (float32
    (N, C, H, W); at most MAX_IMAGES, fewer for layers with large inputs)."""
    x = torch.as_tensor(np.asarray(images[:MAX_IMAGES]), dtype=torch.float32)
    graph = strip(graph)
    cfg = replace(config, adaround=True, bias_correction=False)
    layers = [n.name for n in graph.nodes if n.op in WEIGHTED_OPS]
    nodes = {n.name: n for n in graph.nodes}
    gains = []
    for i, name in enumerate(layers):
        current = graph.replace_nodes([nodes[k] for k in graph.names()])
        qg = lower(current, ranges, cfg, user_float)
        qn = qg.node(name)
        if not qn.quantized:
            continue
        n = nodes[name]
        src = graph.node(name).inputs[0]
        per_image = 4 * int(np.prod(graph.node(src).shape))
        m = max(1, min(len(x), TENSOR_BYTES // max(per_image, 1)))
        x_f = _run_float_until(current, src, x[:m])
        q_src = qg.node(qn.inputs[0])
        x_q = (_run_int_until(qg, q_src.name, x[:m]).to(torch.float32) * float(q_src.scale))
        s_w = qn.params["weight_scale"]
        levels = config.for_layer((n.name,) + n.layers).weight_levels
        wq, e_l, e_n = learn_rounding(n, s_w, levels, x_q, x_f, config.adaround_iterations, seed=i)
        if e_l < e_n:
            nodes[name] = n.with_(params={**n.params, "adaround_weight": wq,
                                          "adaround_scale": np.asarray(s_w, np.float64)})
        gains.append((name, e_n, e_l))
        log.info("AdaRound %s: output error %.4g -> %.4g on %d images%s", name, e_n, e_l, m,
                 "" if e_l < e_n else " (kept rounding to nearest)")
        report(progress, i + 1, len(layers), "AdaRound")
    return graph.replace_nodes([nodes[k] for k in graph.names()])
