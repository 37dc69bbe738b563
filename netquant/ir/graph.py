"""netquant's float graph IR: a small, immutable, topologically ordered list of nodes.

A :class:`Node` is one (possibly fused) layer. Its ``name`` is the "Optimized Layer Name"
(``convInp_reluInp`` after fusing ``convInp``, ``bnInp`` and ``reluInp``) and ``layers`` keeps the
"Network Layer Names" of the model layers it stands for. Tensors are NCHW; ``shape`` is the
output shape of one image, without the batch dimension.

Op kinds (``Node.op``, the GRAPH kinds of :mod:`netquant.ir.ops`) and what they hold:

=========  ====================================================================================
input      the network input
conv       ``weight`` (O, I/groups, kh, kw), ``bias`` (O,); attrs stride, padding, dilation,
           groups, act
linear     ``weight`` (O, I), ``bias`` (O,); attrs act
add        elementwise sum of two inputs; attrs act
concat     concatenation of the inputs along channels
gather     pure data movement (view, flatten, transpose, slice, chunk, channel shuffle, zero
           pad): ``index`` (prod(shape),) int64, output element i of an image is input element
           index[i]-1 of the same image, or 0 where index[i] == 0
maxpool    attrs kernel, stride, padding
avgpool    attrs kernel, stride, padding (count_include_pad semantics)
affine     per-channel ``scale`` and ``shift``: y = x*scale[c] + shift[c] (a lone batch norm,
           input normalisation)
act        a lone activation: attrs act
float      an op netquant runs only in floating point: attrs fn (a name in
           :data:`netquant.ir.float_ops.FLOAT_FNS`), kwargs
=========  ====================================================================================

``attrs["act"]`` of a fused activation is a clamp range ``(lo, hi)`` in real values, e.g.
``(0.0, inf)`` for ReLU and ``(0.0, 6.0)`` for ReLU6, or None.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import numpy as np

from ..errors import NotFoundError
from .ops import GRAPH_OPS, OPS, WEIGHTED_OPS  # noqa: F401  (WEIGHTED_OPS: re-exported for the graph's users)


@dataclass(frozen=True)
class Node:
    """One layer of the float graph (see the module docstring for op kinds)."""

    name: str                       # Optimized Layer Name
    op: str
    inputs: tuple = ()              # names of the producing nodes
    shape: tuple = ()               # output shape of one image, e.g. (16, 32, 32)
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)   # name -> np.ndarray (float32, or int64 index)
    layers: tuple = ()              # Network Layer Names this node stands for, in order
    reason: Optional[str] = None    # why this node cannot be quantized (None: it can)

    def __post_init__(self):
        if self.op not in GRAPH_OPS:
            raise ValueError(f"node {self.name}: unknown op {self.op!r}; known: {', '.join(GRAPH_OPS)}")
        lo, hi = OPS[self.op].arity
        if not lo <= len(self.inputs) <= (len(self.inputs) if hi is None else hi):
            raise ValueError(f"node {self.name}: {self.op} reads {len(self.inputs)} inputs, expected "
                             f"{lo if lo == hi else f'{lo} or more' if hi is None else f'{lo} to {hi}'}")

    @property
    def output_layer(self) -> str:
        """The network layer whose output this node produces (MATLAB's Network Layer Name for
        the activations row): the last fused layer."""
        return self.layers[-1] if self.layers else self.name

    def with_(self, **changes) -> "Node":
        return replace(self, **changes)

    def __repr__(self) -> str:
        ins = ", ".join(self.inputs)
        extra = f" act={self.attrs['act']}" if self.attrs.get("act") else ""
        fused = f" [{'+'.join(self.layers)}]" if len(self.layers) > 1 else ""
        return f"{self.name} = {self.op}({ins}) -> {'x'.join(map(str, self.shape))}{extra}{fused}"


@dataclass(frozen=True)
class Graph:
    """A float network: nodes in topological order, one input, one output."""

    nodes: tuple
    output: str
    source: str = ""   # what it was captured from

    def __post_init__(self):
        seen = set()
        for n in self.nodes:
            if n.name in seen:
                raise ValueError(f"graph: duplicate node name {n.name!r}")
            for i in n.inputs:
                if i not in seen:
                    raise ValueError(f"graph: node {n.name} reads {i!r}, which is not defined before it")
            seen.add(n.name)
        if self.output not in seen:
            raise ValueError(f"graph: output {self.output!r} is not a node")
        if sum(n.op == "input" for n in self.nodes) != 1:
            raise ValueError("graph: expected exactly one input node")

    @property
    def input(self) -> Node:
        return next(n for n in self.nodes if n.op == "input")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFoundError(f"no node named {name!r} in the graph; nodes: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def find_layer(self, layer: str) -> Node:
        """The node that holds the network layer ``layer`` (or is named ``layer``)."""
        for n in self.nodes:
            if n.name == layer or layer in n.layers:
                return n
        raise NotFoundError(f"no layer named {layer!r}; layers: {', '.join(l for n in self.nodes for l in n.layers)}")

    def replace_nodes(self, nodes: Iterable[Node], output: Optional[str] = None) -> "Graph":
        return Graph(tuple(nodes), output or self.output, self.source)

    def __repr__(self) -> str:
        body = "\n  ".join(repr(n) for n in self.nodes)
        return f"Graph({self.source}, output={self.output}):\n  {body}"


def rename_inputs(nodes: Iterable[Node], mapping: dict) -> list[Node]:
    """Nodes with every input name ``a`` replaced by ``mapping.get(a, a)``."""
    return [n.with_(inputs=tuple(mapping.get(i, i) for i in n.inputs)) if any(i in mapping for i in n.inputs) else n
            for n in nodes]


def identity_index(size: int) -> np.ndarray:
    """A gather index that copies every element (1-based, see the module docstring)."""
    return np.arange(1, size + 1, dtype=np.int64)
