"""Run a float :class:`~netquant.ir.graph.Graph` with torch (the reference the int8 network is
compared against, and the engine of calibration).

Kernels are registered per op kind; each takes the node and its input tensors (NCHW, float32)
and returns the output tensor with shape (N, *node.shape).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .float_ops import float_op
from .graph import Graph, Node
from .interpret import interpret, registrar

FLOAT_KERNELS: dict[str, Callable] = {}
kernel = registrar(FLOAT_KERNELS)


def apply_act(y: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return y
    lo, hi = act
    return torch.clamp(y, min=None if lo == -np.inf else lo, max=None if hi == np.inf else hi)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@kernel("conv")
def _conv(n: Node, x):
    a = n.attrs
    y = F.conv2d(x, _t(n.params["weight"]), _t(n.params["bias"]), a["stride"], a["padding"], a["dilation"], a["groups"])
    return apply_act(y, a.get("act"))


@kernel("linear")
def _linear(n: Node, x):
    return apply_act(F.linear(x.reshape(len(x), -1), _t(n.params["weight"]), _t(n.params["bias"])), n.attrs.get("act"))


@kernel("add")
def _add(n: Node, a, b):
    return apply_act(a + b, n.attrs.get("act"))


@kernel("concat")
def _concat(n: Node, *xs):
    return torch.cat(xs, 1)


@kernel("gather")
def _gather(n: Node, x):
    flat = x.reshape(len(x), -1)
    # prepend a zero column so index 0 reads zero and index i reads element i-1
    flat = torch.cat([flat.new_zeros(len(x), 1), flat], 1)
    return flat[:, _t(n.params["index"])].reshape(len(x), *n.shape)


@kernel("maxpool")
def _maxpool(n: Node, x):
    a = n.attrs
    return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"]).reshape(len(x), *n.shape)


@kernel("avgpool")
def _avgpool(n: Node, x):
    a = n.attrs
    return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"]).reshape(len(x), *n.shape)


@kernel("affine")
def _affine(n: Node, x):
    view = (1, -1) + (1,) * (x.dim() - 2)
    return x * _t(n.params["scale"]).view(view) + _t(n.params["shift"]).view(view)


@kernel("act")
def _act(n: Node, x):
    return apply_act(x, n.attrs["act"])


@kernel("float")
def _float(n: Node, *xs):
    return float_op(n.attrs["fn"])(*xs, **n.attrs.get("kwargs", {}))


def run_float(graph: Graph, x: torch.Tensor, keep: Optional[Iterable[str]] = None,
              visit: Optional[Callable[[Node, torch.Tensor], None]] = None) -> dict:
    """Run ``graph`` on a float batch ``x`` (N, *input shape). Returns {name: tensor} for the
    output and the nodes in ``keep`` (all nodes if ``keep`` is None); ``visit(node, value)`` is
    called on every node's output as it is computed (calibration hooks in here)."""
    with torch.no_grad():
        return interpret(graph.nodes, graph.output, x, lambda n, *ins: FLOAT_KERNELS[n.op](n, *ins), keep, visit)
