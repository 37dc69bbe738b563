"""The one interpreter loop shared by the float executor, the integer reference executor and the
fake-quant simulation: nodes in order, values freed after their last reader, kernels looked up
in per-op registries filled by a decorator at each kernel's definition."""
from __future__ import annotations

from typing import Callable, Iterable, Optional


def registrar(table: dict) -> Callable:
    """``kernel = registrar(TABLE)``; then ``@kernel("conv")`` registers a function under "conv"."""
    def kernel(op: str):
        def register(fn):
            table[op] = fn
            return fn
        return register
    return kernel


def interpret(nodes, output: str, x, compute: Callable, keep: Optional[Iterable[str]] = None,
              visit: Optional[Callable] = None) -> dict:
    """Run ``nodes`` (each with ``name``, ``op``, ``inputs``) on ``x``: the input node takes
    ``x``, every other node ``compute(node, *input values)``. Returns {name: value} for
    ``output`` and ``keep`` (every node if ``keep`` is None); ``visit(node, value)`` sees each
    value as it is made. A value no later node reads is freed unless kept."""
    keep = None if keep is None else set(keep) | {output}
    values: dict = {}
    remaining = {n.name: 0 for n in nodes}
    for n in nodes:
        for i in n.inputs:
            remaining[i] += 1
    for n in nodes:
        v = x if n.op == "input" else compute(n, *(values[i] for i in n.inputs))
        values[n.name] = v
        if visit is not None:
            visit(n, v)
        for i in n.inputs:
            remaining[i] -= 1
            if remaining[i] == 0 and keep is not None and i not in keep:
                del values[i]
    return values if keep is None else {k: v for k, v in values.items() if k in keep}
