"""Graph -> Graph passes: drop dead nodes, merge affine chains, fold batch norm, fuse activations,
merge gathers.

Each pass returns a new Graph. Fusing keeps MATLAB's naming: conv + batch norm + ReLU become one
node named ``convInp_reluInp`` (the batch norm disappears into the weights, the activation is
appended), whose ``layers`` are ``("convInp", "bnInp", "reluInp")``.

Batch-norm folding, with s = gamma / sqrt(var + eps) per output channel o:
``W'[o] = W[o] * s[o]`` and ``b'[o] = b[o] * s[o] + (beta[o] - mean[o] * s[o])``. For example
gamma 0.5, var 0.24, eps 0.01 give s = 1.0, so the conv is unchanged up to the shift.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .graph import Graph, Node, identity_index, rename_inputs
from .ops import FUSE_ACT_INTO, WEIGHTED_OPS


def _single_consumer(graph: Graph, node: Node) -> Optional[Node]:
    users = graph.consumers(node.name)
    if len(users) == 1 and node.name != graph.output:
        return users[0]
    return None


def _merge(graph: Graph, match: Callable[[Node, Node], bool], combine: Callable[[Node, Node], Node]) -> Graph:
    """Repeatedly merge a node ``a`` with its only consumer ``b`` where ``match(a, b)``;
    ``combine(a, b)`` gives the node that replaces both (its name is what consumers of b read)."""
    changed = True
    while changed:
        changed = False
        for a in graph.nodes:
            b = _single_consumer(graph, a)
            if b is None or len(b.inputs) != 1 or not match(a, b):
                continue
            merged = combine(a, b)
            nodes = []
            for n in graph.nodes:
                if n.name == a.name:
                    nodes.append(merged)
                elif n.name != b.name:
                    nodes.append(n)
            nodes = rename_inputs(nodes, {b.name: merged.name})
            output = merged.name if graph.output == b.name else graph.output
            graph = graph.replace_nodes(nodes, output)
            changed = True
            break
    return graph


def remove_dead(graph: Graph) -> Graph:
    """Drop the nodes whose values never reach the output (a debugging ``x.view(...)`` a
    published forward computes and throws away). The input node always stays. Walking the
    nodes backwards from the output marks what is read: in ``input -> conv -> {flatten, relu};
    relu -> output`` the flatten is dropped."""
    live = {graph.output}
    for n in reversed(graph.nodes):
        if n.name in live:
            live.update(n.inputs)
    if len(live) + (graph.input.name not in live) == len(graph.nodes):
        return graph
    return graph.replace_nodes(n for n in graph.nodes if n.name in live or n.op == "input")


def merge_affines(graph: Graph) -> Graph:
    """affine(affine(x)) -> one affine: scale = s1*s2, shift = t1*s2 + t2."""
    def combine(a, b):
        s = a.params["scale"].astype(np.float64) * b.params["scale"]
        t = a.params["shift"].astype(np.float64) * b.params["scale"] + b.params["shift"]
        layers = a.layers + tuple(l for l in b.layers if l not in a.layers)
        return a.with_(params={"scale": s.astype(np.float32), "shift": t.astype(np.float32)}, layers=layers,
                       shape=b.shape)
    return _merge(graph, lambda a, b: a.op == "affine" and b.op == "affine", combine)


def fold_batchnorm(graph: Graph) -> Graph:
    """Fold an affine (batch norm) into the conv or linear layer before it."""
    def match(a, b):
        if b.op != "affine" or a.op not in WEIGHTED_OPS or a.attrs.get("act"):
            return False
        return b.params["scale"].shape == (a.params["weight"].shape[0],)

    def combine(a, b):
        s = b.params["scale"].astype(np.float64)
        w = a.params["weight"].astype(np.float64)
        w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        bias = a.params["bias"].astype(np.float64) * s + b.params["shift"]
        return a.with_(params={"weight": w.astype(np.float32), "bias": bias.astype(np.float32)},
                       layers=a.layers + b.layers)
    return _merge(graph, match, combine)


def fuse_activations(graph: Graph) -> Graph:
    """Fuse a lone activation (a clamp range) into the conv, linear or add before it."""
    def combine(a, b):
        lo, hi = b.attrs["act"]
        return a.with_(name=f"{a.name}_{b.layers[-1]}", attrs={**a.attrs, "act": (lo, hi)},
                       layers=a.layers + b.layers)
    return _merge(graph, lambda a, b: b.op == "act" and a.op in FUSE_ACT_INTO and not a.attrs.get("act"), combine)


def merge_gathers(graph: Graph) -> Graph:
    """gather(gather(x)) -> one gather with the composed index; an identity gather that keeps
    the shape disappears."""
    def combine(a, b):
        ia, ib = a.params["index"], b.params["index"]
        # b reads a's element ib-1; a's element j is x's element ia[j]-1; 0 stays 0 (zero fill)
        composed = np.where(ib > 0, np.concatenate([[0], ia])[ib], 0)
        return b.with_(inputs=a.inputs, params={"index": composed}, layers=a.layers + b.layers)

    graph = _merge(graph, lambda a, b: a.op == "gather" and b.op == "gather", lambda a, b: combine(a, b).with_(name=a.name))
    # drop gathers that copy everything and keep the shape
    drop = {n.name: n.inputs[0] for n in graph.nodes
            if n.op == "gather" and graph.node(n.inputs[0]).shape == n.shape
            and np.array_equal(n.params["index"], identity_index(len(n.params["index"])))
            and n.name != graph.output}
    if not drop:
        return graph
    return graph.replace_nodes(rename_inputs([n for n in graph.nodes if n.name not in drop], drop))


def optimize(graph: Graph) -> Graph:
    """The standard pipeline: drop dead nodes, merge affines, fold batch norm, fuse activations,
    merge gathers."""
    for p in (remove_dead, merge_affines, fold_batchnorm, fuse_activations, merge_gathers):
        graph = p(graph)
    return graph
