"""Many variants of a network evaluated on the same images, each at the cost of what differs.

A *variant* is a lowered network (QGraph) that differs from a *base* network (all float, all
int8, ...) in a few nodes: per batch of images, the base runs once, keeping the values the
variants read, and each variant recomputes only the nodes whose integer program differs from the
base's (a layer and what follows it) on the base's values of the rest. Example: on ResNet-20,
"only S3U3_conv2 quantized" recomputes 4 of the 70 nodes of the all-float base.

The work is cut into batches of images, one task each, run by a :mod:`netquant.executor` (this
process, local worker processes or a Ray cluster); the results are joined in batch order, so
they do not depend on the executor. Everything runs on the integer reference executor's kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..executor import Executor
from ..ir.float_exec import FLOAT_KERNELS
from ..progress import Progress
from ..quant.qgraph import QGraph, QNode
from ..ref.executor import INT_KERNELS, _ieee_fp32, run_int8


def _same(a: QNode, b: QNode) -> bool:
    """Do two lowered nodes compute the same values from the same inputs?"""
    if (a.op, a.inputs, a.quantized, a.scale, a.dtype, a.shape) != (b.op, b.inputs, b.quantized, b.scale, b.dtype,
                                                                     b.shape):
        return False
    if repr(a.attrs) != repr(b.attrs) or set(a.params) != set(b.params):
        return False
    return all(a.params[k] is b.params[k] or np.array_equal(a.params[k], b.params[k]) for k in a.params)


class Variant:
    """A lowered network that differs from base network ``base`` (a name in the plan) in a few
    nodes: it recomputes those (``todo``) on the base's values of the rest (``reads``)."""

    def __init__(self, qg: QGraph, base_graph: QGraph, base: str):
        known = {n.name: n for n in base_graph.nodes}
        changed = set()
        self.base = base
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


@dataclass
class Plan:
    """Base networks by name and variants by key (each of one base). ``probes``: {variant key:
    (node, scale, reference base)}: the SQNR of the variant's node (dequantized with ``scale``)
    against the reference base's value of the same node is accumulated too."""

    bases: dict
    variants: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)

    def add(self, key, qg: QGraph, base: str) -> None:
        self.variants[key] = Variant(qg, self.bases[base], base)

    def keeps(self) -> dict:
        keep = {b: set() for b in self.bases}
        for v in self.variants.values():
            keep[v.base] |= v.reads
        for node, _, ref in self.probes.values():
            keep[ref].add(node)
        return keep


def _run_batch(plan: Plan, x: np.ndarray) -> dict:
    """One task: the plan on one batch of images -> {"scores": {base or variant key: array},
    "sqnr": {probe key: (signal, noise)}}."""
    keep = plan.keeps()
    scores, sqnr = {}, {}
    with torch.no_grad(), _ieee_fp32():
        xb = torch.from_numpy(x)
        values = {}
        for name, qg in plan.bases.items():
            values[name] = run_int8(qg, xb, keep=keep[name])
            scores[name] = values[name][qg.output].numpy()
        for key, v in plan.variants.items():
            probe = plan.probes.get(key)
            out = v.run(values[v.base], keep=(probe[0],) if probe else ())
            scores[key] = out[v.output].numpy()
            if probe:
                node, scale, ref_base = probe
                ref = values[ref_base][node].to(torch.float64)
                deq = out[node].to(torch.float64) * scale
                sqnr[key] = (float((ref ** 2).sum()), float(((ref - deq) ** 2).sum()))
    return {"scores": scores, "sqnr": sqnr}


def evaluate(plan: Plan, images: np.ndarray, batch_size: int, executor: Optional[Executor] = None,
             progress: Optional[Progress] = None, message: str = "evaluating") -> tuple[dict, dict]:
    """({base or variant key: scores (N, ...)}, {probe key: (signal, noise) summed over the
    images}) of ``plan`` on float32 ``images``, in batches of ``batch_size`` run by
    ``executor`` (None: this process)."""
    x = np.asarray(images, np.float32)
    batches = [np.ascontiguousarray(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
    results = (executor or Executor()).map(_run_batch, batches, plan, progress, message)
    keys = list(plan.bases) + list(plan.variants)
    scores = {k: np.concatenate([r["scores"][k] for r in results]) for k in keys}
    sqnr = {}
    for k in plan.probes:
        signal = noise = 0.0
        for r in results:   # batch order: the same sums wherever the batches ran
            signal += r["sqnr"][k][0]
            noise += r["sqnr"][k][1]
        sqnr[k] = (signal, noise)
    return scores, sqnr
