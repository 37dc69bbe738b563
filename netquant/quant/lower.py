"""Lowering: float Graph + calibration statistics + config -> integer program (QGraph).

Decisions made here, per tensor and per layer:
- activation scale: threshold T from the range method; unsigned (0..255, scale T/255) where the
  tensor cannot be negative (a fused ReLU, or calibration never saw a negative value), else
  signed (-128..127, scale T/127); with ``scale="pow2"`` rounded up to a power of two;
- weight scales per output channel (or per tensor): T/127, int8 weights, int32 bias at scale
  s_x * s_w[o], and the requantization multiplier s_x * s_w[o] / s_y as (M, shift);
- the scale floors of docs/NUMERICS.md ("Scale floors"): degenerate channels and tensors
  (all-zero or near-zero weights, dead ReLUs, constant tensors) get scales that keep every bias,
  accumulator and multiplier in range, so they quantize with no manual step;
- which layers stay float, and why; quantize/dequantize nodes at every float <-> int edge. A layer
  whose integer lowering is impossible (an accumulator that can reach 2^31, an op with no integer
  kernel) stays float automatically, with the reason in its ``QNode.reason``; never an exception.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from ..calib.methods import threshold
from ..calib.stats import RangeStats, RangeTable
from ..ir.float_ops import float_reason
from ..ir.graph import Graph, Node
from ..ir.ops import INPUT_NORMALISATION_REASON, OPS, QUANTIZABLE
from . import numerics as nx
from .config import QuantConfig
from .qgraph import QGraph, QNode

log = logging.getLogger(__name__)

USER_FLOAT = "kept in floating point by the user (set_quantize)"
CANNOT = "cannot be quantized"   # the start of the reason of a layer lowering kept float automatically


def float_reasons(graph: Graph, user_float: frozenset = frozenset()) -> dict:
    """{node name: reason} for every node that stays float (the input node excluded)."""
    out = {}
    for n in graph.nodes:
        if n.op == "input":
            continue
        if n.op == "float":
            out[n.name] = float_reason(n.attrs["fn"])
        elif OPS[n.op].rule is None:   # an op that always stays float (ops.py says why)
            out[n.name] = (INPUT_NORMALISATION_REASON if graph.node(n.inputs[0]).op == "input"
                           else OPS[n.op].float_reason)
        elif n.reason:
            out[n.name] = n.reason
        elif n.name in user_float or any(l in user_float for l in n.layers):
            out[n.name] = USER_FLOAT
    return out


def activation_qparams(stats: RangeStats, cfg: QuantConfig, act=None, floor: float = 0.0) -> tuple[float, str]:
    """(scale, dtype) of an activation tensor. ``floor``: the smallest scale the tensor may take
    (the step of what produces it / MULTIPLIER_CAP, see ``numerics``), and never below SCALE_MIN;
    a power-of-two scale is rounded up after the floor, so it keeps it."""
    unsigned = cfg.unsigned_activations and ((act is not None and act[0] >= 0) or stats.min >= 0)
    dtype = "uint8" if unsigned else "int8"
    levels = nx.dtype_range(dtype)[1]
    t = threshold(stats, cfg.activation_range, levels, cfg.percentile)
    scale = max(t / levels, floor, nx.SCALE_MIN)
    if cfg.scale == "pow2":
        scale = nx.pow2_scale(scale)
    return scale, dtype


def weight_scales(w: np.ndarray, cfg: QuantConfig, key: str) -> np.ndarray:
    """The range method's weight scales T/L, per output channel (or one, broadcast), before the
    floors of :func:`~netquant.quant.numerics.floor_weight_scales`; 0 for an all-zero channel.
    L = ``cfg.weight_levels``: 127 for 8-bit weights, 7 for 4-bit (a channel with T = 0.35 gets
    0.35/7 = 0.05 and its weights take -7..7)."""
    levels = cfg.weight_levels
    if cfg.weight_granularity == "per_tensor":
        groups = [w]
    else:
        groups = [w[o] for o in range(len(w))]
    scales = []
    for g in groups:
        if not np.any(g):
            scales.append(0.0)  # all zero: the floors choose its scale
            continue
        t = threshold(RangeStats("Weights", key, key).update(g, channel_axis=None), cfg.weight_range, levels,
                      cfg.percentile)
        scales.append(t / levels)
    return np.broadcast_to(np.array(scales, dtype=np.float64), (len(w),)).copy()


def _clamp(dtype: str, scale: float, act) -> tuple[int, int]:
    lo, hi = nx.dtype_range(dtype)
    if act is not None:
        alo, ahi = act
        if alo != -math.inf:
            lo = max(lo, int(math.floor(alo / scale + 0.5)))
        if ahi != math.inf:
            hi = min(hi, int(math.floor(ahi / scale + 0.5)))
    return lo, hi


def _multipliers(ms) -> tuple[np.ndarray, np.ndarray]:
    pairs = [nx.quantize_multiplier(float(m)) for m in ms]
    return (np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=np.int32))


def _shared_shift(ms) -> tuple[np.ndarray, int]:
    """Multipliers for several inputs with one shift (the shift of the largest multiplier)."""
    shift = min(nx.quantize_multiplier(float(m))[1] for m in ms)
    M = np.array([int(round(float(m) * 2.0 ** shift)) for m in ms], dtype=np.int64)
    if M.max() >= 2 ** 31:
        M, shift = (M + 1) // 2, shift - 1
    return M.astype(np.int32), shift


def k_chunks(wq: np.ndarray, xmax: int) -> list:
    """Split the reduction axis K = (I/groups)*kh*kw of each output channel into [start, stop)
    chunks of whole input channels whose partial sums are exact in float32: per output channel
    xmax * sum over the chunk of |w| < 2^24. Usually one chunk: ResNet-20's largest layer has
    K = 576, and 576 * 255 * 127 = 18.7M exceeds 2^24 only if every weight is at full scale."""
    o = len(wq)
    unit = int(np.prod(wq.shape[2:])) if wq.ndim == 4 else 1
    w = np.abs(wq.reshape(o, -1, unit).astype(np.int64)).sum(2) * xmax  # (O, I/groups)
    chunks, start, acc = [], 0, np.zeros(o, np.int64)
    for c in range(w.shape[1]):
        if (w[:, c] >= nx.FLOAT32_EXACT).any():
            raise ValueError(f"one input channel's products can reach 2^24 (kernel {wq.shape[2:]} too large)")
        if (acc + w[:, c]).max() >= nx.FLOAT32_EXACT:
            chunks.append((start * unit, c * unit))
            start, acc = c, np.zeros(o, np.int64)
        acc += w[:, c]
    chunks.append((start * unit, w.shape[1] * unit))
    return chunks


def _adjusted_bias(n: Node, cfg: QuantConfig) -> np.ndarray:
    """The float bias to quantize: with ``cfg.bias_correction``, plus the correction that
    :mod:`netquant.accuracy.bias_correction` stored in the node (``bias_correction``, (O,))."""
    b = n.params["bias"]
    if cfg.bias_correction and "bias_correction" in n.params:
        corr = n.params["bias_correction"]
        if corr.shape != b.shape:
            raise ValueError(f"{n.name}: bias_correction has shape {corr.shape}, expected {b.shape}")
        return b.astype(np.float64) + corr
    return b


def _adjusted_weights(n: Node, cfg: QuantConfig, w: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """The integer weights: round(w / s_w) (half away from zero) clamped to +-cfg.weight_levels,
    or, with ``cfg.adaround``, the learned rounding :mod:`netquant.accuracy.adaround` stored in
    the node (``adaround_weight``), valid only for the scales it was learned for
    (``adaround_scale``): with other scales (the config changed since calibration) it is ignored."""
    levels = cfg.weight_levels
    wq = nx.quantize_weights(w, s_w)
    if levels < nx.WEIGHT_RANGE[1]:
        wq = np.clip(wq, -levels, levels).astype(np.int8)
    if cfg.adaround and "adaround_weight" in n.params:
        aw, ascale = n.params["adaround_weight"], n.params.get("adaround_scale")
        if aw.shape != w.shape or aw.dtype.kind not in "iu" or ascale is None or ascale.shape != s_w.shape:
            raise ValueError(f"{n.name}: AdaRound weights of shape {aw.shape} ({aw.dtype}) and scales of shape "
                             f"{getattr(ascale, 'shape', None)}, expected integers of shape {w.shape} and {s_w.shape}")
        if np.array_equal(n.params["adaround_scale"], s_w) and np.abs(n.params["adaround_weight"]).max() <= levels:
            return np.ascontiguousarray(n.params["adaround_weight"], dtype=np.int8)
        log.warning("%s: the AdaRound weights were learned for other weight scales (the config changed since "
                    "calibration): rounding to nearest; calibrate again to learn them", n.name)
    return wq


def _weighted(n: Node, x: QNode, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    w, b = n.params["weight"], _adjusted_bias(n, cfg)
    xmax = max(abs(v) for v in nx.dtype_range(x.dtype))
    s_w = nx.floor_weight_scales(weight_scales(w, cfg, n.name), w, b, x.scale, xmax,
                                 cfg.weight_granularity == "per_tensor")
    if cfg.scale == "pow2":
        s_w = np.array([nx.pow2_scale(float(v)) for v in s_w])
    # the output scale is at least one accumulator step of the widest channel / MULTIPLIER_CAP
    s_y, dtype = activation_qparams(ranges[n.name], cfg, n.attrs.get("act"),
                                    floor=x.scale * float(s_w.max()) / nx.MULTIPLIER_CAP)
    wq = _adjusted_weights(n, cfg, w, s_w)
    bq = nx.quantize_bias(b, x.scale * s_w, n.name)
    M, sh = _multipliers(x.scale * s_w / s_y)
    bound = nx.accumulator_bound(wq, xmax, bq).max()
    if bound >= nx.ACC_LIMIT:
        raise ValueError(f"{n.name}: accumulator bound {bound} reaches 2^31")
    attrs = {k: v for k, v in n.attrs.items() if k != "act"}
    chunks = k_chunks(wq, xmax)
    if n.attrs.get("groups", 1) > 1 and len(chunks) > 1:
        raise ValueError(f"{n.name}: grouped conv whose per-group reduction needs {len(chunks)} float32-exact chunks")
    attrs.update(clamp=_clamp(dtype, s_y, n.attrs.get("act")), k_chunks=chunks, acc_bound=int(bound))
    if cfg.weight_bits < 8:   # narrower weights (still int8 arrays): quant/int4.py packs <= 4 bits two per byte
        attrs["weight_bits"] = cfg.weight_bits
    return QNode(n.name, n.op, (x.name,), n.shape, True, s_y, dtype, attrs,
                 {"weight": wq, "bias": bq, "multiplier": M, "shift": sh, "weight_scale": s_w}, n.layers)


def _same_scale(n: Node, xs: list, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    x = xs[0]
    return QNode(n.name, n.op, (x.name,), n.shape, True, x.scale, x.dtype, dict(n.attrs), dict(n.params), n.layers)


def _clamp_node(n: Node, xs: list, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    x = xs[0]
    return QNode(n.name, n.op, (x.name,), n.shape, True, x.scale, x.dtype,
                 {"clamp": _clamp(x.dtype, x.scale, n.attrs["act"])}, {}, n.layers)


def _window_sum(n: Node, xs: list, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    x = xs[0]
    kh, kw = n.attrs["kernel"]
    s_y, dtype = activation_qparams(ranges[n.name], cfg, floor=x.scale / (kh * kw) / nx.MULTIPLIER_CAP)
    M, sh = nx.quantize_multiplier(x.scale / (s_y * kh * kw))
    return QNode(n.name, n.op, (x.name,), n.shape, True, s_y, dtype, {**n.attrs, "clamp": nx.dtype_range(dtype)},
                 {"multiplier": np.array([M], np.int32), "shift": np.array([sh], np.int32)}, n.layers)


def _rescale(n: Node, xs: list, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    """add (one shared shift: the inputs are summed before the shift) or concat (each input its own)."""
    s_y, dtype = activation_qparams(ranges[n.name], cfg, n.attrs.get("act"),
                                    floor=max(xi.scale for xi in xs) / nx.MULTIPLIER_CAP)
    ratios = [xi.scale / s_y for xi in xs]
    if OPS[n.op].rule == "rescale_sum":
        M, sh = _shared_shift(ratios)
        shifts = np.full(len(xs), sh, np.int32)
    else:
        M, shifts = _multipliers(ratios)
    return QNode(n.name, n.op, tuple(xi.name for xi in xs), n.shape, True, s_y, dtype,
                 {"clamp": _clamp(dtype, s_y, n.attrs.get("act"))}, {"multiplier": M, "shift": shifts}, n.layers)


# one lowering per quantization rule of the op table (ops.RULES) that a float Graph node can take
LOWERINGS = {"gemm": lambda n, xs, ranges, cfg: _weighted(n, xs[0], ranges, cfg), "same_scale": _same_scale,
             "clamp": _clamp_node, "window_sum": _window_sum, "rescale_sum": _rescale, "rescale_each": _rescale}


def _int_node(n: Node, xs: list, ranges: RangeTable, cfg: QuantConfig) -> QNode:
    """The integer node for ``n`` reading the integer tensors ``xs``, by its op's quantization rule;
    a ValueError says why it cannot be quantized. Every output scale keeps the floor of
    numerics.MULTIPLIER_CAP: at least the step of what produces it / 2^16, so each requantization
    multiplier is at most 2^16."""
    rule = OPS[n.op].rule
    if rule not in LOWERINGS:
        raise ValueError(f"op {n.op} has no integer lowering")
    return LOWERINGS[rule](n, xs, ranges, cfg)


def _score_node(graph: Graph) -> str:
    """The node whose output are the class scores: the graph output, or the last node before a
    trailing chain of float ops (softmax)."""
    name = graph.output
    node = graph.node(name)
    while node.op == "float" and len(node.inputs) == 1:
        name = node.inputs[0]
        node = graph.node(name)
    return name


def lower(graph: Graph, ranges: RangeTable, config: QuantConfig, user_float: frozenset = frozenset()) -> QGraph:
    """The integer program for ``graph`` (see the module docstring)."""
    reasons = float_reasons(graph, user_float)
    out: list[QNode] = []
    by_name: dict[str, QNode] = {}
    converted: dict = {}   # (tensor, "q"|"dq") -> node name of the conversion

    def emit(q: QNode) -> QNode:
        out.append(q)
        by_name[q.name] = q
        return q

    def as_int(name: str, cfg: QuantConfig) -> QNode:
        src = by_name[name]
        if src.quantized:
            return src
        if (name, "q") not in converted:
            scale, dtype = activation_qparams(ranges[name], cfg)
            emit(QNode(f"{name}_quantize", "quantize", (name,), src.shape, True, scale, dtype,
                       {"clamp": nx.dtype_range(dtype)}, {}, ()))
            converted[(name, "q")] = f"{name}_quantize"
        return by_name[converted[(name, "q")]]

    def as_float(name: str) -> QNode:
        src = by_name[name]
        if not src.quantized:
            return src
        if (name, "dq") not in converted:
            emit(QNode(f"{name}_dequantize", "dequantize", (name,), src.shape, False, src.scale, src.dtype))
            converted[(name, "dq")] = f"{name}_dequantize"
        return by_name[converted[(name, "dq")]]

    scores = _score_node(graph)
    for n in graph.nodes:
        cfg = config.for_layer((n.name,) + n.layers)
        if n.name == scores and cfg.activation_range != "minmax":
            cfg = replace(cfg, activation_range="minmax")  # clipping the top score would change the class
        if n.op == "input" or n.name in reasons:
            ins = tuple(as_float(i).name for i in n.inputs)
            emit(QNode(n.name, n.op, ins, n.shape, False, None, None, dict(n.attrs), dict(n.params), n.layers,
                       reasons.get(n.name)))
            continue
        mark, saved = len(out), dict(converted)
        try:
            if n.op not in QUANTIZABLE:
                raise ValueError(f"op {n.op} has no integer lowering")
            xs = [as_int(i, cfg) for i in n.inputs]
            emit(_int_node(n, xs, ranges, cfg))
        except ValueError as e:
            # this layer cannot be quantized: undo the conversions made for it and keep it float,
            # with the reason in the tables (the rest of the network is still quantized)
            for q in out[mark:]:
                del by_name[q.name]
            del out[mark:]
            converted.clear()
            converted.update(saved)
            why = str(e).removeprefix(f"{n.name}: ")
            log.warning("%s stays in floating point: it cannot be quantized (%s)", n.name, why)
            ins = tuple(as_float(i).name for i in n.inputs)
            emit(QNode(n.name, n.op, ins, n.shape, False, None, None, dict(n.attrs), dict(n.params), n.layers,
                       f"{CANNOT}: {why}"))
    output = as_float(graph.output).name
    return QGraph(tuple(out), output, graph.input.name)
