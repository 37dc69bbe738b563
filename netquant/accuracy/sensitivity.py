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
batch (:mod:`netquant.accuracy.variants`): a variant recomputes only the nodes whose integer
program differs from its base (the layer and what follows it), on the base's values of the rest.
Everything runs on the integer reference executor's kernels, so each number is what the integer
network computes. The batches are independent tasks for an executor (:mod:`netquant.executor`:
local worker processes, or a Ray cluster with ``ray_address``); the table is the same whichever
runs them.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np

from ..calib.stats import RangeTable
from ..errors import InputError
from ..executor import resolve
from ..ir.graph import Graph
from ..progress import Progress
from ..quant.config import QuantConfig
from ..quant.lower import lower
from ..quant.qgraph import QGraph, QNode
from .variants import Plan, evaluate

log = logging.getLogger(__name__)

REQUANTIZING = ("conv", "linear", "add", "concat", "avgpool")


def candidates(qg: QGraph) -> list[QNode]:
    """The layers a sensitivity table has rows for: requantizing ops that the all-int8 network
    quantizes."""
    return [n for n in qg.nodes if n.quantized and n.op in REQUANTIZING and n.layers]


def all_float(graph: Graph) -> frozenset:
    """Every node of ``graph`` but the input: as ``user_float``, lowering keeps the whole network
    float (the reference executor then computes the float network's values)."""
    return frozenset(n.name for n in graph.nodes if n.op != "input")


def sensitivity(graph: Graph, ranges: RangeTable, config: QuantConfig, images, labels, metric,
                user_float: frozenset = frozenset(), batch_size: int = 100,
                progress: Optional[Progress] = None, executor=None, workers: Optional[int] = None,
                ray_address: Optional[str] = None):
    """The sensitivity table (a pandas DataFrame, most harmful layer first) of the network that
    ``lower(graph, ranges, config, user_float)`` builds, on float32 ``images`` (N, C, H, W) with
    ``labels``; ``metric(scores, labels)`` is a higher-is-better number (e.g. top-1 in percent).

    Columns: Layer, Op, QuantizedOnly (the metric with only this layer quantized), FloatOnly (with
    only this layer float), DropQuantizedOnly (float metric - QuantizedOnly), GainFloatOnly
    (FloatOnly - all-int8 metric), SQNR_dB (the layer's output with only it quantized, against
    float). Sorted by DropQuantizedOnly, then GainFloatOnly, then SQNR_dB ascending. The table's
    ``attrs`` hold the float and all-int8 metrics and the image count.

    The batches of ``batch_size`` images run on ``executor``, else on one made from ``workers``
    (None, the default: a local worker process per core; 1: this process) or ``ray_address`` (a
    Ray cluster), see :func:`netquant.executor.make_executor`."""
    import pandas as pd

    every = all_float(graph)
    plan = Plan({"float": lower(graph, ranges, config, every), "int8": lower(graph, ranges, config, user_float)})
    layers = candidates(plan.bases["int8"])
    if not layers:
        raise InputError("sensitivity: the network has no quantized conv, linear, add, concat or average pooling "
                         "layer")
    for n in layers:
        plan.add(("q", n.name), lower(graph, ranges, config, every - {n.name}), "float")
        plan.add(("f", n.name), lower(graph, ranges, config, user_float | {n.name}), "int8")
        plan.probes[("q", n.name)] = (n.name, n.scale, "float")
    x = np.asarray(images, np.float32)
    ex, owned = resolve(executor, workers, ray_address)
    try:
        scores, sqnr = evaluate(plan, x, batch_size, ex, progress, "sensitivity")
    finally:
        if owned:
            ex.close()
    labels = np.asarray(labels)
    m_float = float(metric(scores["float"], labels))
    m_int = float(metric(scores["int8"], labels))
    rows = []
    for n in layers:
        mq = float(metric(scores[("q", n.name)], labels))
        mf = float(metric(scores[("f", n.name)], labels))
        signal, noise = sqnr[("q", n.name)]
        sq = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
        rows.append({"Layer": n.name, "Network Layers": "+".join(n.layers), "Op": n.op, "QuantizedOnly": mq,
                     "FloatOnly": mf, "DropQuantizedOnly": m_float - mq, "GainFloatOnly": mf - m_int, "SQNR_dB": sq})
    table = pd.DataFrame(rows).sort_values(["DropQuantizedOnly", "GainFloatOnly", "SQNR_dB"],
                                           ascending=[False, False, True], kind="stable").reset_index(drop=True)
    table.attrs.update({"float": m_float, "int8": m_int, "images": int(len(x)),
                        "metric": getattr(metric, "__name__", "metric")})
    log.info("sensitivity: %d layers on %d images (float %.4g, int8 %.4g; %s)", len(layers), len(x), m_float,
             m_int, ex)
    return table


def format_table(table) -> str:
    """The table as text with its header line (what ``netquant sensitivity`` prints)."""
    a = table.attrs
    head = (f"Sensitivity on {a.get('images')} images, metric {a.get('metric')}: float {a.get('float'):.4g}, "
            f"all int8 {a.get('int8'):.4g}")
    return head + "\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
