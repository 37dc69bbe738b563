"""The integer program: the one input of the reference executor and of code generation.

A :class:`QNode` either computes in integers (``quantized``: its output is an integer tensor with
real value ``scale * q`` of type ``dtype``) or in float. Conversions are explicit nodes:
``quantize`` (float -> int, the input quantization) and ``dequantize`` (int -> float).

Integer ops (the kinds of :mod:`netquant.ir.ops` with a quantization rule) and their parameters
(all integer arrays; see ``numerics`` for the arithmetic):

===========  ==================================================================================
conv/linear  ``weight`` int8 (O, I/g, kh, kw) or (O, I), ``bias`` int32 (O,), ``multiplier``
             int32 (O,), ``shift`` int32 (O,); attrs ``clamp`` (lo, hi), ``k_chunks`` (the
             float32-exact split of the reduction), kernel geometry; ``weight_bits`` where the
             weights are narrower than 8 bits (4: codes -7..7, still int8 here; quant/int4.py)
add/concat   ``multiplier`` and ``shift`` per input (add: one shared shift); attrs ``clamp``
avgpool      ``multiplier``, ``shift`` for sum/(kh*kw); attrs ``clamp`` and geometry
maxpool      geometry; output scale = input scale
gather       ``index`` int64 (see the float IR); output scale = input scale
act          attrs ``clamp``; output scale = input scale
quantize     attrs ``clamp``; ``scale`` is the output scale
dequantize   ``scale`` of the input (the output is float)
===========  ==================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import NotFoundError


@dataclass(frozen=True)
class QNode:
    """One step of the integer program."""

    name: str
    op: str
    inputs: tuple
    shape: tuple
    quantized: bool                 # does it output integers?
    scale: Optional[float] = None   # real value of one integer step of the output (integer outputs)
    dtype: Optional[str] = None     # "int8" or "uint8" (integer outputs)
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    layers: tuple = ()              # Network Layer Names
    reason: Optional[str] = None    # why it stays float (float nodes of the network)

    def with_(self, **changes) -> "QNode":
        return replace(self, **changes)

    def __repr__(self) -> str:
        kind = f"{self.dtype} x {self.scale:.4g}" if self.quantized else "float"
        return f"{self.name} = {self.op}({', '.join(self.inputs)}) -> {'x'.join(map(str, self.shape))} {kind}"


@dataclass(frozen=True)
class QGraph:
    """An integer network: nodes in execution order, a float input and a float output."""

    nodes: tuple
    output: str
    input: str

    def node(self, name: str) -> QNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFoundError(f"no node {name!r} in the integer network")

    def int_output(self) -> str:
        """The integer tensor the output dequantizes (the class scores before any float tail such
        as softmax): what generated code is compared with bit for bit."""
        node = self.node(self.output)
        while node.op != "dequantize":
            node = self.node(node.inputs[0])
        return node.inputs[0]

    def __repr__(self) -> str:
        return "QGraph:\n  " + "\n  ".join(repr(n) for n in self.nodes)
