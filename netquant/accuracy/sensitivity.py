"""Per-layer sensitivity analysis: which layers does quantization hurt?

For every layer that requantizes (conv, linear, add, concat, average pooling; the exact data
movement ops gather, max pooling and clamps add no error of their own and are left out), two
networks are run on the given images:

- **only this layer quantized** (every other layer float): the metric, and the SQNR of the
  layer's dequantized output against the float network's (its own error, input quantization
  included);
- **only this layer float** (every other layer int8, as the user chose): the metric.

Example (shipped ResNet-20, power-of-two per tensor, 1,000 test images): a row
``S1U1_conv1 ... QuantizedOnly 92.3, FloatOnly 92.5, SQNR_dB 27.1`` says that quantizing this
layer alone costs 0.3 points against float (92.6) and keeping it alone in float recovers 0.2
against all-int8 (92.3).

Efficient: both variants of every layer reuse the two base runs (all float, all int8) over each
batch: a variant recomputes only the nodes whose integer program differs from its base (the layer
and what follows it), on the base's values of the rest. Everything runs on the integer reference
executor's kernels, so each number is what the integer network computes.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from ..calib.stats import RangeTable
from ..errors import InputError
from ..ir.float_exec import FLOAT_KERNELS
from ..ir.graph import Graph
from ..progress import Progress, report
from ..quant.config import QuantConfig
from ..quant.lower import lower
from ..quant.qgraph import QGraph, QNode
from ..ref.executor import INT_KERNELS, _ieee_fp32, run_int8

log = logging.getLogger(__name__)

REQUANTIZING = ("conv", "linear", "add", "concat", "avgpool")


def _same(a: QNode, b: QNode) -> bool:
    """Do two lowered nodes compute the same values from the same inputs?"""
    if (a.op, a.inputs, a.quantized, a.scale, a.dtype, a.shape) != (b.op, b.inputs, b.quantized, b.scale, b.dtype,
                                                                     b.shape):
        return False
    if repr(a.attrs) != repr(b.attrs) or set(a.params) != set(b.params):
        return False
    return all(a.params[k] is b.params[k] or np.array_equal(a.params[k], b.params[k]) for k in a.params)


class _Variant:
    """A lowered network that differs from a base network in a few nodes: it recomputes those
    (``todo``) on the base's values of the rest (``reads``)."""

    def __init__(self, qg: QGraph, base: QGraph):
        known = {n.name: n for n in base.nodes}
        changed = set()
        self.todo = []
        for n in qg.nodes:
            if n.op == "input":
                continue
            if n.name in known and not (set(n.inputs) & changed) and _same(n, known[n.name]):
                continue
            changed.add(n.name)
            self.todo.append(n)
        self.reads = {i for n in self.todo for i in n.inputs if i not in changed}
        self.output = qg.output
        if self.output not in changed:
            self.reads.add(self.output)

    def run(self, base_values: dict, keep=()) -> dict:
        vals = {}
        for n in self.todo:
            ins = [vals[i] if i in vals else base_values[i] for i in n.inputs]
            table = INT_KERNELS if (n.quantized or n.op == "dequantize") else FLOAT_KERNELS
            vals[n.name] = table[n.op](n, *ins)
        out = {self.output: vals.get(self.output, base_values.get(self.output))}
        for k in keep:
            out[k] = vals.get(k, base_values.get(k))
        return out


def candidates(qg: QGraph) -> list[QNode]:
    """The layers a sensitivity table has rows for: requantizing ops that the all-int8 network
    quantizes."""
    return [n for n in qg.nodes if n.quantized and n.op in REQUANTIZING and n.layers]


def sensitivity(graph: Graph, ranges: RangeTable, config: QuantConfig, images, labels, metric,
                user_float: frozenset = frozenset(), batch_size: int = 100,
                progress: Optional[Progress] = None):
    """The sensitivity table (a pandas DataFrame, most harmful layer first) of the network that
    ``lower(graph, ranges, config, user_float)`` builds, on float32 ``images`` (N, C, H, W) with
    ``labels``; ``metric(scores, labels)`` is a higher-is-better number (e.g. top-1 in percent).

    Columns: Layer, Op, QuantizedOnly (the metric with only this layer quantized), FloatOnly (with
    only this layer float), DropQuantizedOnly (float metric - QuantizedOnly), GainFloatOnly
    (FloatOnly - all-int8 metric), SQNR_dB (the layer's output with only it quantized, against
    float). Sorted by DropQuantizedOnly, then GainFloatOnly, then SQNR_dB ascending. The table's
    ``attrs`` hold the float and all-int8 metrics and the image count."""
    import pandas as pd

    every = frozenset(n.name for n in graph.nodes if n.op != "input")
    float_q = lower(graph, ranges, config, every)        # every node float: run_int8 gives run_float's values
    int_q = lower(graph, ranges, config, user_float)
    layers = candidates(int_q)
    if not layers:
        raise InputError("sensitivity: the network has no quantized conv, linear, add, concat or average pooling "
                         "layer")
    only_q, only_f = {}, {}
    for n in layers:
        only_q[n.name] = _Variant(lower(graph, ranges, config, every - {n.name}), float_q)
        only_f[n.name] = _Variant(lower(graph, ranges, config, user_float | {n.name}), int_q)
    keep_f = set().union(*(v.reads for v in only_q.values())) | {n.name for n in layers}
    keep_i = set().union(*(v.reads for v in only_f.values()))
    scores = {k: [] for k in ("float", "int8")}
    s_q = {n.name: [] for n in layers}
    s_f = {n.name: [] for n in layers}
    signal = {n.name: 0.0 for n in layers}
    noise = {n.name: 0.0 for n in layers}
    x = np.asarray(images, np.float32)
    with torch.no_grad(), _ieee_fp32():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size])
            fv = run_int8(float_q, xb, keep=keep_f)
            iv = run_int8(int_q, xb, keep=keep_i)
            scores["float"].append(fv[float_q.output].numpy())
            scores["int8"].append(iv[int_q.output].numpy())
            for n in layers:
                out = only_q[n.name].run(fv, keep=(n.name,))
                s_q[n.name].append(out[only_q[n.name].output].numpy())
                ref = fv[n.name].to(torch.float64)
                deq = out[n.name].to(torch.float64) * n.scale
                signal[n.name] += float((ref ** 2).sum())
                noise[n.name] += float(((ref - deq) ** 2).sum())
                s_f[n.name].append(only_f[n.name].run(iv)[only_f[n.name].output].numpy())
            report(progress, min(start + batch_size, len(x)), len(x), "sensitivity")
    labels = np.asarray(labels)
    m_float = float(metric(np.concatenate(scores["float"]), labels))
    m_int = float(metric(np.concatenate(scores["int8"]), labels))
    rows = []
    for n in layers:
        mq = float(metric(np.concatenate(s_q[n.name]), labels))
        mf = float(metric(np.concatenate(s_f[n.name]), labels))
        sq = (math.inf if noise[n.name] == 0 else 10 * math.log10(signal[n.name] / noise[n.name])
              if signal[n.name] > 0 else -math.inf)
        rows.append({"Layer": n.name, "Network Layers": "+".join(n.layers), "Op": n.op, "QuantizedOnly": mq,
                     "FloatOnly": mf, "DropQuantizedOnly": m_float - mq, "GainFloatOnly": mf - m_int, "SQNR_dB": sq})
    table = pd.DataFrame(rows).sort_values(["DropQuantizedOnly", "GainFloatOnly", "SQNR_dB"],
                                           ascending=[False, False, True], kind="stable").reset_index(drop=True)
    table.attrs.update({"float": m_float, "int8": m_int, "images": int(len(x)),
                        "metric": getattr(metric, "__name__", "metric")})
    log.info("sensitivity: %d layers on %d images (float %.4g, int8 %.4g)", len(layers), len(x), m_float, m_int)
    return table


def format_table(table) -> str:
    """The table as text with its header line (what ``netquant sensitivity`` prints)."""
    a = table.attrs
    head = (f"Sensitivity on {a.get('images')} images, metric {a.get('metric')}: float {a.get('float'):.4g}, "
            f"all int8 {a.get('int8'):.4g}")
    return head + "\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
