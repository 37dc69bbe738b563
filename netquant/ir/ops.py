"""The op table: every op kind of netquant's three IRs, named once.

Each :class:`OpSpec` says where the kind appears (the float ``Graph``, the integer ``QGraph``,
the code generation ``Program``), how many inputs it reads, how lowering makes it integer (its
quantization ``rule``, one of :data:`RULES`, or None where it always stays float, with the
reason) and which executors and printers run it. Everything else reads this table: the IR's
``Node`` check, the passes (which kinds take a fused activation), lowering (which kinds it
quantizes and by which rule), the integer reference executor and the float one (their kernel
registries must hold exactly these kinds, tests/test_op_table.py), fake-quant (one float64
simulation per rule), the planner (what code generation accepts), the C and CUDA printers (one
kernel method per kind) and the ONNX exporter. Adding an op is one entry here plus its kernels.

Example: ``OPS["add"]`` reads 2 inputs, takes a fused activation, and lowers by the rule
"rescale_sum": each input times its multiplier, one shared shift, clamp (docs/NUMERICS.md); kept
float (a user choice), the printers compute it with their float element kernel ``e_add``.

The float ops that netquant runs only in floating point (softmax, sigmoid, ...) are one op kind,
"float", whose ``fn`` names an entry of :data:`netquant.ir.float_ops.FLOAT_FNS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GRAPH, QGRAPH, PROGRAM = "graph", "qgraph", "program"

# how lowering makes an op integer (netquant/quant/lower.py) and how fake-quant simulates it
# (netquant/ref/fakequant.py); docs/NUMERICS.md states the arithmetic of each
RULES = {
    "gemm": "int8 weights x 8-bit activations summed exactly in int32 with an int32 bias, requantized per "
            "output channel by (M, shift)",
    "rescale_sum": "each input times its multiplier, one shared rounding shift, clamp",
    "rescale_each": "each input requantized to the output scale by its own (M, shift)",
    "window_sum": "the window's int32 sum requantized by scale_x / (kh * kw * scale_y)",
    "same_scale": "integer data movement or selection: the output keeps the input's scale and type",
    "clamp": "a clamp of the integers at the input's scale",
    "quantize": "float -> integer: clamp(floor(x * float32(1 / scale) + 0.5))",
    "dequantize": "integer -> float32: float32(scale) * q",
}


@dataclass(frozen=True)
class OpSpec:
    """One op kind (see the module docstring)."""

    kind: str
    arity: tuple                   # (fewest, most) inputs; most None: any number
    levels: tuple                  # the IRs it appears in: GRAPH, QGRAPH, PROGRAM
    rule: Optional[str] = None     # quantization rule (RULES); None: it always runs in float
    float_reason: Optional[str] = None  # why a kind with no rule stays float ("float": per fn)
    weighted: bool = False         # holds weight and bias (conv, linear)
    fuses_act: bool = False        # a lone activation after it fuses into it (passes.fuse_activations)
    float_kernel: bool = True      # runs in float32 too (float_exec.FLOAT_KERNELS, the printers' e_<kind>)

    @property
    def integer(self) -> bool:
        """Whether the integer reference executor has a kernel for it (INT_KERNELS)."""
        return self.rule is not None


_ALL = (GRAPH, QGRAPH, PROGRAM)
OPS: dict[str, OpSpec] = {s.kind: s for s in (
    OpSpec("input", (0, 0), _ALL, None, "the float images the network reads (a quantize step follows)",
           float_kernel=False),
    OpSpec("conv", (1, 1), _ALL, "gemm", weighted=True, fuses_act=True),
    OpSpec("linear", (1, 1), _ALL, "gemm", weighted=True, fuses_act=True),
    OpSpec("add", (2, 2), _ALL, "rescale_sum", fuses_act=True),
    OpSpec("concat", (1, None), _ALL, "rescale_each"),
    OpSpec("gather", (1, 1), _ALL, "same_scale"),
    OpSpec("maxpool", (1, 1), _ALL, "same_scale"),
    OpSpec("avgpool", (1, 1), _ALL, "window_sum"),
    OpSpec("act", (1, 1), _ALL, "clamp"),
    OpSpec("affine", (1, 1), _ALL, None,
           "a per-channel scale and shift (batch norm) with no conv or fully connected layer before it to fold "
           "into"),
    OpSpec("float", (1, None), _ALL, None, "see netquant.ir.float_ops.FLOAT_FNS"),
    OpSpec("quantize", (1, 1), (QGRAPH, PROGRAM), "quantize", float_kernel=False),
    OpSpec("dequantize", (1, 1), (QGRAPH, PROGRAM), "dequantize", float_kernel=False),
    # a chain of elementwise float ops on an 8-bit tensor, read from a 256-entry table (program.lut_table)
    OpSpec("lut", (1, 1), (PROGRAM,), None, "a lookup table of the float ops it replaces", float_kernel=False),
)}

# the reason of an affine on the network input (input normalisation), which lowering gives in
# place of OPS["affine"].float_reason
INPUT_NORMALISATION_REASON = "input normalisation runs in float before the input is quantized"


def kinds(level: str) -> tuple:
    """The op kinds of one IR (GRAPH, QGRAPH or PROGRAM), in table order."""
    return tuple(k for k, s in OPS.items() if level in s.levels)


GRAPH_OPS = kinds(GRAPH)
WEIGHTED_OPS = tuple(k for k, s in OPS.items() if s.weighted)
FUSE_ACT_INTO = tuple(k for k, s in OPS.items() if s.fuses_act)
QUANTIZABLE = tuple(k for k in GRAPH_OPS if OPS[k].rule is not None)   # what lowering tries to make integer
INT_OPS = tuple(k for k, s in OPS.items() if s.integer)                # INT_KERNELS of the reference executor
FLOAT_KERNEL_OPS = tuple(k for k, s in OPS.items() if s.float_kernel)  # FLOAT_KERNELS of the float executor
