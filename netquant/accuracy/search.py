"""Accuracy-budget mixed precision: per conv/linear layer, W4A8 (4-bit weights, 8-bit
activations), int8 or float, chosen to make the learnable memory small while the metric on the
given images drops by at most ``max_drop`` against the float network.

Memory per layer with W weights and B biases: float 4(W + B) bytes, int8 W + 4B, W4A8
ceil(W / 2) + 4B (two weights per byte); the network's total adds the float bytes of what is
not a quantized conv/linear layer (:func:`memory_bytes`).

The search (a sensitivity-ordered greedy search with verification; every configuration it
keeps was measured on the images, none is predicted):

1. **Probes.** The float network, the all-int8 network (the user's config and float layers)
   and, per layer l, the network with only l in W4A8 are run on the images: probe drop
   d4(l) = metric(int8) - metric(only l W4A8), saving v(l) = bytes(int8 l) - bytes(W4A8 l).
2. **Feasibility.** If int8 itself drops more than the budget, layers go to float, in the order
   of the metric each one regains alone (FloatOnly gain, probed then) per byte it costs, first
   k of them for the smallest k that meets the budget (every k measured).
3. **Prefix search.** The int8 layers are ordered by d4(l) / v(l) (harmless and large first);
   configuration k puts the first k of them in W4A8; its memory falls with k. The largest k
   within the budget is found by an R-ary search (R configurations measured per round, R = the
   executor's workers, at least 4), on the assumption that the drop grows with k.
4. **Greedy refinement.** Each layer after that prefix, in order, is tried in W4A8 on top of the
   current configuration and kept if the measured drop stays within the budget (R tries per
   round; the first that fits is kept), until ``max_evaluations``.

Worked example (a four-layer network, budget 0.1, float and int8 both 92.6): the probes give
drops d4 = 1.2 (conv1), 0.0 (conv2), 0.1 (conv3), 0.1 (fc) for savings v = 216, 1,150,
18,400 and 300 bytes; d4 / v orders them conv2 (0), conv3 (5e-6), fc (3e-4), conv1 (6e-3).
With R = 4 one round measures the prefixes k = 1..4: drops 0.0, 0.1, 0.3, 1.5, so k = 2 (conv2
and conv3 in W4A8, 19,550 bytes saved). Refinement skips fc (prefix 3 failed with it) and tries
conv1 on top of k = 2: drop 1.3, over the budget, so the choice stays k = 2. Every measured
configuration is a point (memory, metric); the Pareto front is the points no other point beats
on both.

The result is an ordinary Quantizer (its config holds ``weight_bits`` overrides, its float
layers the float choices): save, load, validate and codegen take it as any other. Evaluations
run through :mod:`netquant.executor` (local worker processes, or a Ray cluster); each round's
configurations are variants of the int8 network (:mod:`netquant.accuracy.variants`), which
recompute only from their first changed layer.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import NamedTuple, Optional

import numpy as np

from ..errors import ArgumentError
from ..executor import resolve
from ..ir.graph import WEIGHTED_OPS, Graph
from ..progress import Progress, report
from ..quant.config import QuantConfig
from ..quant.lower import lower
from ..quant.qgraph import QGraph
from .sensitivity import all_float
from .variants import Plan, evaluate

log = logging.getLogger(__name__)

CHOICES = ("float", "int8", "w4a8")
FLOAT_BYTES, BIAS_BYTES = 4, 4
OBJECTIVES = ("memory",)


def weight_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` integer weights of ``bits`` bits as stored: 5 to 8 bits one per byte
    (int8), 4 bits or fewer two per byte (1,001 4-bit weights: 501 bytes)."""
    return math.ceil(count / 2) if bits <= 4 else count


def memory_bytes(graph: Graph, qg: QGraph, config: QuantConfig) -> int:
    """Learnable memory of the network ``qg`` lowered from ``graph``: quantized conv/linear
    layers their packed weights (:func:`weight_bytes`, the bits of the layer's config) and int32
    biases, everything else its float32 parameters."""
    total = 0
    for n in graph.nodes:
        if n.op == "input":
            continue
        q = qg.node(n.name)
        if q.quantized and n.op in WEIGHTED_OPS:
            bits = config.for_layer((n.name,) + n.layers).weight_bits
            total += weight_bytes(q.params["weight"].size, bits) + BIAS_BYTES * q.params["bias"].size
        else:
            total += FLOAT_BYTES * sum(p.size for k, p in n.params.items() if k in ("weight", "bias", "scale", "shift"))
    return total


class AutoPrecision(NamedTuple):
    """What :meth:`Quantizer.auto_precision` returns: the chosen quantizer, the Pareto front
    (memory vs metric) of the configurations measured, and all of them."""

    quantizer: object
    front: object      # pandas DataFrame, ascending memory
    explored: object   # pandas DataFrame, in the order measured


def configure(config: QuantConfig, user_float: frozenset, choice: dict) -> tuple[QuantConfig, frozenset]:
    """(config, user_float) for ``choice`` {layer: "float" | "int8" | "w4a8"}: W4A8 layers get a
    ``weight_bits: 4`` override, int8 ones ``weight_bits: 8`` where the config's default is not 8."""
    overrides = {k: dict(v) for k, v in config.overrides.items()}
    floats = set(user_float)
    for layer, c in choice.items():
        o = {k: v for k, v in overrides.get(layer, {}).items() if k != "weight_bits"}
        if c == "w4a8":
            o["weight_bits"] = 4
        elif c == "int8" and config.weight_bits != 8:
            o["weight_bits"] = 8
        elif c == "float":
            floats.add(layer)
        if o:
            overrides[layer] = o
        else:
            overrides.pop(layer, None)
    return replace(config, overrides=overrides), frozenset(floats)


class _Search:
    """The state of one search: measured configurations and the executor that measures them."""

    def __init__(self, graph, ranges, config, user_float, images, labels, metric, batch_size, executor,
                 progress, max_evaluations):
        self.graph, self.ranges, self.config, self.user_float = graph, ranges, config, user_float
        self.x, self.labels, self.metric = images, labels, metric
        self.batch_size, self.executor, self.progress = batch_size, executor, progress
        self.max_evaluations = max_evaluations
        self.int8 = lower(graph, ranges, config, user_float)
        self.layers = [n.name for n in self.int8.nodes if n.quantized and n.op in WEIGHTED_OPS]
        if not self.layers:
            raise ArgumentError("auto_precision: the network has no quantized conv or linear layer to choose for")
        self.base = {layer: "int8" for layer in self.layers}
        self.rows: list = []
        self.probe_rows = 0
        self.float_metric = self.int8_metric = math.nan

    def left(self) -> int:
        """Configurations that may still be measured (the probes do not count)."""
        return max(0, self.max_evaluations - (len(self.rows) - self.probe_rows))

    def lowered(self, choice: dict) -> tuple[QGraph, QuantConfig, frozenset]:
        cfg, uf = configure(self.config, self.user_float, choice)
        return lower(self.graph, self.ranges, cfg, uf), cfg, uf

    def measure(self, choices: list, step: str, with_bases: bool = False, probes: bool = False) -> list:
        """Metric of each configuration in ``choices`` (full {layer: choice} dicts), measured in
        one executor round; each becomes a row of the explored table. Beyond ``max_evaluations``
        the round is cut short, except for probes (one per layer, always all measured)."""
        if not (with_bases or probes):
            choices = choices[:self.left()]
        if not choices:
            return []
        plan = Plan({"int8": self.int8})
        if with_bases:
            plan.bases["float"] = lower(self.graph, self.ranges, self.config, all_float(self.graph))
        mems = []
        for i, ch in enumerate(choices):
            qg, cfg, _ = self.lowered(ch)
            plan.add(i, qg, "int8")
            mems.append(memory_bytes(self.graph, qg, cfg))
        scores, _ = evaluate(plan, self.x, self.batch_size, self.executor, None, step)
        if with_bases:
            self.float_metric = float(self.metric(scores["float"], self.labels))
            self.int8_metric = float(self.metric(scores["int8"], self.labels))
        out = []
        self.probe_rows += len(choices) if (with_bases or probes) else 0
        for i, ch in enumerate(choices):
            m = float(self.metric(scores[i], self.labels))
            counts = {c: sum(v == c for v in ch.values()) for c in CHOICES}
            self.rows.append({"Step": step, "MemoryBytes": mems[i], "Metric": m, "Drop": self.float_metric - m,
                              "W4A8": counts["w4a8"], "Int8": counts["int8"], "Float": counts["float"],
                              "Choice": dict(ch)})
            out.append(m)
        report(self.progress, len(self.rows) - self.probe_rows, self.max_evaluations, f"auto precision: {step}")
        log.info("auto precision %s: %d configuration(s), best %.4g, memory %s..%s bytes", step, len(choices),
                 max(out), min(mems), max(mems))
        return out


def _rounds(lo: int, hi: int, r: int) -> list:
    """Up to ``r`` points strictly between lo and hi, evenly spread (the R-ary search's next
    round). Example: lo 0, hi 23, r 4 -> [5, 9, 14, 18]."""
    inner = list(range(lo + 1, hi))
    if len(inner) <= r:
        return inner
    return sorted({inner[int(round((i + 1) * (len(inner) + 1) / (r + 1))) - 1] for i in range(r)})


def _largest_feasible(search: _Search, sequence, n: int, budget_ok, step: str, r: int) -> int:
    """The largest k in 0..n with ``budget_ok(metric of sequence(k))``, by an R-ary search that
    assumes feasibility falls with k; k = 0 is taken as feasible (measured by the caller)."""
    lo, hi = 0, n + 1
    while hi - lo > 1 and search.left():
        ks = _rounds(lo, hi, r)
        ms = search.measure([sequence(k) for k in ks], step)
        if not ms:
            break
        ok = [k for k, m in zip(ks, ms) if budget_ok(m)]
        bad = [k for k, m in zip(ks, ms) if not budget_ok(m)]
        lo = max(ok + [lo])
        hi = min([k for k in bad if k > lo] + [hi])
    return lo


def auto_precision(graph: Graph, ranges, config: QuantConfig, images, labels, metric, max_drop: float = 0.1,
                   user_float: frozenset = frozenset(), objective: str = "memory", batch_size: int = 100,
                   max_evaluations: int = 64, progress: Optional[Progress] = None, executor=None,
                   workers: Optional[int] = None, ray_address: Optional[str] = None):
    """The search of the module docstring on float32 ``images`` with ``labels``;
    ``metric(scores, labels)`` is higher-is-better, ``max_drop`` in its units. ``max_evaluations``
    bounds the configurations measured after the probes (one or two per layer, always measured). Returns (config,
    user_float, the measured rows (dicts), the chosen row's index, float metric, int8 metric)."""
    if objective not in OBJECTIVES:
        raise ArgumentError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ArgumentError(f"max_drop: expected a metric drop >= 0 (e.g. 0.1 points of top-1), got {max_drop!r}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise ArgumentError(f"max_evaluations: expected a positive number, got {max_evaluations!r}")
    ex, owned = resolve(executor, workers, ray_address)
    try:
        s = _Search(graph, ranges, config, user_float, np.asarray(images, np.float32), np.asarray(labels), metric,
                    batch_size, ex, progress, max_evaluations)
        r = max(4, ex.workers)
        probes = [{**s.base, layer: "w4a8"} for layer in s.layers]
        ms = s.measure([dict(s.base)] + probes, "probes (int8, one layer W4A8)", with_bases=True)
        fits = lambda m: s.float_metric - m <= max_drop + 1e-9   # noqa: E731  (float noise of the subtraction)
        current = dict(s.base)
        if not fits(ms[0]):
            current = _feasible_with_float(s, fits, r)
        # 3. prefix search over the int8 layers, harmless and large first
        sizes = {n.name: n.params["weight"].size for n in s.int8.nodes if n.name in s.layers}
        saving = {k: sizes[k] - weight_bytes(sizes[k], 4) for k in s.layers}
        drop4 = {k: ms[0] - m for k, m in zip(s.layers, ms[1:])}
        order = sorted((k for k in s.layers if current[k] == "int8"),
                       key=lambda k: (max(drop4[k], 0.0) / max(saving[k], 1), -saving[k]))
        base_choice = dict(current)

        def prefix(k):
            return {**base_choice, **{layer: "w4a8" for layer in order[:k]}}

        k = _largest_feasible(s, prefix, len(order), fits, "W4A8 prefix search", r)
        current = prefix(k)
        # 4. greedy refinement: the layers after the prefix, one at a time
        rest = order[k + 1:] if k < len(order) else []
        while rest and s.left():
            tries = rest[:r]
            ms_t = s.measure([{**current, layer: "w4a8"} for layer in tries], "greedy refinement")
            if not ms_t:
                break
            took = next((i for i, m in enumerate(ms_t) if fits(m)), None)
            if took is None:
                rest = rest[len(ms_t):]
                continue
            current = {**current, tries[took]: "w4a8"}
            rest = rest[took + 1:]
        feasible = [i for i, row in enumerate(s.rows) if fits(row["Metric"])]
        if feasible:
            chosen = min(feasible, key=lambda i: (s.rows[i]["MemoryBytes"], -s.rows[i]["Metric"]))
        else:
            chosen = max(range(len(s.rows)), key=lambda i: s.rows[i]["Metric"])
            log.warning("auto precision: no configuration measured meets the budget of %g (float %.4g); the best one "
                        "measured (%.4g) is chosen", max_drop, s.float_metric, s.rows[chosen]["Metric"])
    finally:
        if owned:
            ex.close()
    cfg, uf = configure(config, user_float, s.rows[chosen]["Choice"])
    return cfg, uf, s.rows, chosen, s.float_metric, s.int8_metric


def _feasible_with_float(s: _Search, fits, r: int) -> dict:
    """Step 2: the fewest layers in float, in the order of FloatOnly gain per byte they cost,
    for the budget; every layer float when nothing less fits."""
    ms = s.measure([{**s.base, layer: "float"} for layer in s.layers], "probes (one layer float)", probes=True)
    m8 = s.int8_metric
    sizes = {n.name: n.params["weight"].size + n.params["bias"].size for n in s.int8.nodes if n.name in s.layers}
    gain = {k: m - m8 for k, m in zip(s.layers, ms)}
    order = sorted(s.layers, key=lambda k: (-gain[k] / (3 * sizes[k] + 1), sizes[k]))

    def floated(k):
        return {**s.base, **{layer: "float" for layer in order[:k]}}

    ks = list(range(1, len(order) + 1))
    for start in range(0, len(ks), r):
        ms_k = s.measure([floated(k) for k in ks[start:start + r]], "float layers for the budget")
        for k, m in zip(ks[start:start + r], ms_k):
            if fits(m):
                return floated(k)
        if not ms_k:
            break
    return floated(len(order))


def tables(rows: list, chosen: int, float_metric: float, int8_metric: float, int8_bytes: int, float_bytes: int):
    """(front, explored) pandas tables of the measured configurations: ``explored`` every row in
    the order measured with Pareto and Chosen flags; ``front`` the Pareto rows (no other row has
    less memory and a metric at least as high, or the same memory and a higher metric),
    ascending memory, with the float and all-int8 networks for reference."""
    import pandas as pd

    df = pd.DataFrame([{k: v for k, v in r.items() if k != "Choice"} for r in rows])
    df["Layers"] = [", ".join(f"{k}:{v}" for k, v in r["Choice"].items() if v != "int8") or "all int8" for r in rows]
    mem, met = df.MemoryBytes.to_numpy(), df.Metric.to_numpy()
    pareto = [not (((mem < mem[i]) & (met >= met[i])) | ((mem <= mem[i]) & (met > met[i]))).any()
              for i in range(len(df))]
    df["Pareto"] = pareto
    df["Chosen"] = [i == chosen for i in range(len(df))]
    front = df[df.Pareto].drop_duplicates(["MemoryBytes", "Metric"]).sort_values("MemoryBytes", kind="stable")
    front = front.reset_index(drop=True)
    for t in (df, front):
        t.attrs.update({"float": float_metric, "int8": int8_metric, "int8_bytes": int8_bytes,
                        "float_bytes": float_bytes})
    return front, df


def derive(quantizer, config: QuantConfig, user_float: frozenset):
    """A copy of ``quantizer`` with another config and float layers (the same graph and
    calibration): an ordinary Quantizer."""
    q = copy.copy(quantizer)
    q.provenance = copy.deepcopy(quantizer.provenance)
    q.config, q.user_float, q._qnet = config, frozenset(user_float), None
    q._c_engine = None   # the copy compiles its own library (Quantizer.compiled)
    return q


def format_front(result: AutoPrecision) -> str:
    """The chosen configuration and the Pareto front as text (what the CLI prints)."""
    front, explored = result.front, result.explored
    a = explored.attrs
    row = explored[explored.Chosen].iloc[0]
    lines = [f"auto precision: {len(explored)} configurations measured; float {a['float']:.4g}, all int8 "
             f"{a['int8']:.4g} ({a['int8_bytes']:,} bytes)",
             f"chosen: metric {row.Metric:.4g} (drop {row.Drop:.3g}), {row.MemoryBytes:,} bytes "
             f"({100 * (1 - row.MemoryBytes / a['int8_bytes']):.1f}% below int8, "
             f"{100 * (1 - row.MemoryBytes / a['float_bytes']):.1f}% below float32); "
             f"{row.W4A8} W4A8, {row.Int8} int8, {row.Float} float layers"]
    lines.append(f"layers not int8: {row.Layers}")
    lines.append("Pareto front (memory vs metric):")
    lines.append(front[["MemoryBytes", "Metric", "Drop", "W4A8", "Int8", "Float", "Step", "Chosen"]]
                 .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return "\n".join(lines)
