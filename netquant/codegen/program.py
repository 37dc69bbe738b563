"""A QGraph lowered for code generation: call order, a static buffer plan and a typed kernel
plan per step (its constant tables, target-neutral: ``IntConvPlan``, ``GatherPlan``, ...).

Shared by the C and CUDA printers, so planning is written and tested once; each printer lays the
tables out for the kernels it prints (the x86 weight layouts: ``x86_pack.py``).

Layout: every tensor of one image in the arena, integer or float, is stored channels-last,
(H, W, C) row-major, so a conv reads the C input channels of a pixel contiguously (the inner loop
of its dot products). A 1-D tensor (C,) is stored as is. Only the network's input and output
arrays stay in the caller's NCHW order (``Buffer.layout``); every kernel indexes its operands
through their layout. Gather indices, defined on NCHW element numbers in the IR, are translated
to the layouts of their operands here.

Float layers: every op the quantizer keeps in float (``netquant/ir/float_ops.py``, and any conv,
linear, add, concat, pool, affine, act or gather kept float) is a step of its own, reading and
writing float32 buffers; dequantize and quantize steps sit at the int <-> float edges exactly as
in the QGraph. A chain of elementwise float ops that starts at a dequantized 8-bit tensor is a
function of 256 integers, so it becomes one lookup step (``lut``) whose table is computed here
with the reference executor's own kernels: int8 out when the chain ends in a quantize, float32
otherwise (see :func:`lut_table`).

Buffers: each step writes one tensor; a tensor lives from the step that writes it to the last
step that reads it. Offsets in one per-image arena are assigned greedily (largest first, first
fit among non-overlapping lifetimes), 64-byte aligned. A gather whose translated index is the
identity becomes an alias of its input (no copy).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

from ..errors import NetquantError
from ..ir.float_ops import ELEMENTWISE_FNS, FLOAT_FNS
from ..ir.ops import PROGRAM, kinds
from ..quant import numerics as nx
from ..quant.qgraph import QGraph, QNode
from .c_conv_dw import dw_eligible

ALIGN = 64
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "float32": "float"}
ELEM_BYTES = {"int8": 1, "uint8": 1, "float32": 4}
SUPPORTED = tuple(k for k in kinds(PROGRAM) if k != "lut")   # the QGraph kinds code generation takes (ops.py)
LUT_SIZE = 256


class CodegenError(NetquantError, ValueError):
    """The network holds something this target cannot generate; the message names the layer."""


def c_name(name: str) -> str:
    """A C identifier for a layer name: S1U1_conv1 stays, 'layer1.0.conv1' -> layer1_0_conv1."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return s if re.match(r"[A-Za-z_]", s) else f"l_{s}"


@dataclass(frozen=True)
class Buffer:
    """One tensor of one image in the arena."""

    name: str        # C identifier
    dtype: str       # int8, uint8 or float32
    shape: tuple     # logical shape (C, H, W) or (C,)
    offset: int = 0  # bytes into the arena (-1: the caller's input or output array)
    alias: Optional[str] = None  # the buffer whose storage this one shares
    layout: str = "hwc"  # "hwc" (channels-last, the arena) or "nchw" (the caller's input and output arrays)

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.elements * ELEM_BYTES[self.dtype]

    @property
    def ctype(self) -> str:
        return C_TYPES[self.dtype]


@dataclass(frozen=True)
class Step:
    """One kernel call: ``node`` computes ``output`` from ``inputs`` by its kernel ``plan``."""

    node: QNode
    inputs: tuple     # Buffer names
    output: str       # Buffer name
    plan: "KernelPlan" = field(default_factory=lambda: KernelPlan())
    # a conv whose printer computes the residual add that reads it in its epilogue (c.py,
    # fuse_adds): (the add's QNode, the conv's place among the add's inputs); inputs are then
    # (conv input, the add's other input) and output the add's output
    fused_add: Optional[tuple] = None

    @property
    def kind(self) -> str:
        return self.node.op


@dataclass(frozen=True)
class Program:
    """What a printer needs to emit a network."""

    name: str                 # C prefix of every exported symbol
    steps: tuple
    buffers: dict             # name -> Buffer
    arena_bytes: int
    input: str                # the float input buffer (NCHW image)
    output: str               # the float output buffer (scores)
    int_output: str           # the last integer tensor before the output (compared bit for bit)
    int_input: Optional[str]  # the quantized input tensor (the int8-input entry point starts there);
                              # None where the input feeds more than its quantization (no such entry)
    classes: int

    def buffer(self, name: str) -> Buffer:
        return self.buffers[name]

    def float_steps(self) -> tuple:
        """The steps that compute in float or replace float layers by a table: lookup tables,
        float layers (not the dequantize/quantize conversions)."""
        return tuple(s for s in self.steps if s.kind == "lut" or (not s.node.quantized and s.kind != "dequantize"))


def _dtype(n: QNode) -> str:
    return n.dtype if n.quantized else "float32"


def _hwc_perm(shape: tuple, layout: str = "hwc") -> np.ndarray:
    """perm[nchw_offset] = offset of the same element in ``layout`` (channels-last by default)."""
    if len(shape) != 3 or layout == "nchw":
        return np.arange(int(np.prod(shape)))
    c, h, w = shape
    return np.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def gather_table(index: np.ndarray, in_shape: tuple, out_shape: tuple, in_layout: str = "hwc",
                 out_layout: str = "hwc") -> np.ndarray:
    """The IR's 1-based NCHW gather index as source offsets in ``in_layout`` (-1: write zero),
    ordered by output offset in ``out_layout`` (channels-last unless the caller's array)."""
    src = np.where(index > 0, _hwc_perm(in_shape, in_layout)[np.maximum(index - 1, 0)], -1)
    table = np.empty_like(src)
    table[_hwc_perm(out_shape, out_layout)] = src
    return table.astype(np.int32)


def _weights_ohwi(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> (O, KH, KW, I), matching channels-last input."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)) if w.ndim == 4 else w


HI_SHIFTS = (33, 62)  # shifts for which requantization needs only the high half of acc * M


def hi_requant_eligible(shift: np.ndarray) -> bool:
    """Whether every shift lies in HI_SHIFTS, so the SIMD kernels requantize with 32-bit lanes
    from the high half of the product (nq_requantize16_hi in netquant_rt.h)."""
    return bool(np.all((shift >= HI_SHIFTS[0]) & (shift <= HI_SHIFTS[1])))


ADD_PAIR_SHIFTS = (16, 46)  # shifts for which the residual add of 8-bit tensors runs in 32-bit lanes


# --- kernel plans: what each step computes with, as named tables, target-neutral -----------------
# A printer chooses its kernel from the plan's type and flags and lays the tables out for the
# instruction set it prints (the x86 packings live in x86_pack.py, the CUDA ones in cuda.py).
# Field names are the tables' names in generated code (k_<buffer>_<name>).

@dataclass(frozen=True, eq=False)
class KernelPlan:
    """A step with no constant tables (pools, adds, concats, clamps, conversions, float functions
    other than resampling): the node's attributes say everything."""

    def tables(self) -> dict:
        """{name: array} of the plan's constant tables, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}


@dataclass(frozen=True, eq=False)
class IntConvPlan(KernelPlan):
    """An integer conv: int8 weights channels-last (O, KH, KW, I/groups), int32 bias and
    requantization (M, shift) per output channel, and the facts that pick the fast kernels.
    Example: ResNet-20's S1U1_conv1 over uint8: simd and amx (ungrouped, 8-bit input, dilation 1),
    not signed, hi_requant where every shift lies in HI_SHIFTS."""

    w: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    simd: bool = False          # ungrouped over 8-bit input: the register-tiled SIMD kernels serve it
    amx: bool = False           # ... and taps adjacent along W (dilation 1 there): AMX tiles serve it
    depthwise: bool = False     # depthwise, channel multiplier 1, over 8-bit input: channels-in-lanes kernels
    signed_input: bool = False  # int8 input (the VNNI kernel reads it as x + 128)
    hi_requant: bool = False    # every shift in HI_SHIFTS: requantization from the product's high half


@dataclass(frozen=True, eq=False)
class IntLinearPlan(KernelPlan):
    """An integer fully connected layer: int8 weights (O, K) with K in the input's layout."""

    w: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True, eq=False)
class FloatWeightsPlan(KernelPlan):
    """A conv (O, I/groups, KH, KW) or linear (O, K) kept in float: float32 weights and bias."""

    w: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True, eq=False)
class AffinePlan(KernelPlan):
    """y = x * scale[c] + shift[c] in float32."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True, eq=False)
class GatherPlan(KernelPlan):
    """Output element i is input element index[i] (-1: zero), offsets in the buffers' layouts."""

    index: np.ndarray


@dataclass(frozen=True, eq=False)
class LutPlan(KernelPlan):
    """A chain of elementwise float ops on an 8-bit tensor as a table (lut_table)."""

    table: np.ndarray


@dataclass(frozen=True, eq=False)
class ResamplePlan(KernelPlan):
    """Bilinear or bicubic resampling: per output row and column, the source taps and weights."""

    hidx: np.ndarray
    hwt: np.ndarray
    widx: np.ndarray
    wwt: np.ndarray


def vnni_eligible(n: QNode, in_dtype: str) -> bool:
    """The SIMD conv kernels multiply 8-bit activations by int8 weights, so they serve ungrouped
    convs over uint8 (post-ReLU tensors) or int8 input (the VNNI one shifts it by +128 into uint8,
    taking the shift back through the bias)."""
    return n.op == "conv" and n.attrs["groups"] == 1 and in_dtype in ("uint8", "int8")


def amx_eligible(n: QNode, in_dtype: str) -> bool:
    """The AMX kernel (Sapphire Rapids and newer) reads its left operand straight from a padded
    copy of the input: 16 output pixels x 64 consecutive bytes of one padded input row, so it
    serves ungrouped convs over 8-bit input (uint8: tdpbusd, int8: tdpbssd) whose filter taps
    are adjacent along W (dilation 1 there)."""
    return vnni_eligible(n, in_dtype) and n.attrs["dilation"][1] == 1


def kernel_plan(n: QNode, in_shape: tuple, in_dtype: str = "", in_layout: str = "hwc") -> KernelPlan:
    """The kernel plan of node ``n`` reading a tensor of ``in_shape``, ``in_dtype``, ``in_layout``."""
    p = n.params
    if n.op == "conv" and not n.quantized:   # float conv: float32 (O, I/groups, KH, KW) as captured
        return FloatWeightsPlan(np.ascontiguousarray(p["weight"], np.float32), np.asarray(p["bias"], np.float32))
    if n.op == "conv":
        return IntConvPlan(_weights_ohwi(p["weight"]), p["bias"], p["multiplier"], p["shift"],
                           simd=vnni_eligible(n, in_dtype), amx=amx_eligible(n, in_dtype),
                           depthwise=dw_eligible("conv", n.attrs["groups"], p["weight"].shape[1] * n.attrs["groups"],
                                                 p["weight"].shape[0], in_dtype, True),
                           signed_input=in_dtype == "int8",
                           hi_requant=hi_requant_eligible(p["shift"]))
    if n.op == "linear":
        w = p["weight"]
        if len(in_shape) == 3 and in_layout == "hwc":  # reading a (C, H, W) tensor directly: reorder K to HWC
            c, h, wd = in_shape
            w = w.reshape(len(w), c, h, wd).transpose(0, 2, 3, 1).reshape(len(w), -1)
        if not n.quantized:
            return FloatWeightsPlan(np.ascontiguousarray(w, np.float32), np.asarray(p["bias"], np.float32))
        return IntLinearPlan(np.ascontiguousarray(w), p["bias"], p["multiplier"], p["shift"])
    if n.op == "affine":
        return AffinePlan(p["scale"].astype(np.float32), p["shift"].astype(np.float32))
    if n.op == "float" and n.attrs["fn"] == "interpolate":
        kw = n.attrs.get("kwargs", {})
        taps = [resample_taps(in_shape[axis], n.shape[axis], kw.get("mode", "bilinear"),
                              bool(kw.get("align_corners", False))) for axis in (1, 2)]
        return ResamplePlan(*taps[0], *taps[1])    # (out, K) taps and weights along H, then W
    return KernelPlan()


CUBIC_A = -0.75   # torch's bicubic convolution coefficient


def resample_taps(n_in: int, n_out: int, mode: str, align_corners: bool) -> tuple:
    """Resampling along one axis as torch's upsample_bilinear2d / upsample_bicubic2d compute it in
    float32: for each output index d, the K source indices (K = 2 bilinear, 4 bicubic) and their
    weights, arrays (n_out, K) int32 and float32. The source coordinate is src = scale * d with
    scale = (n_in - 1) / (n_out - 1) when ``align_corners``, else src = scale * (d + 0.5) - 0.5
    with scale = n_in / n_out (bilinear clamps it at 0). Bilinear: i0 = min(floor(src), n_in - 1),
    taps (i0, i0 + (i0 < n_in - 1)), weights (1 - l, l) with l = src - i0. Bicubic: taps
    floor(src) - 1 .. + 2 clamped to the image, Keys' cubic weights with A = -0.75 at t = src - floor(src).
    Example: bilinear 8 -> 16 without aligned corners: scale 0.5; d = 3: src = 1.25, taps (1, 2),
    weights (0.75, 0.25)."""
    f32 = np.float32
    d = np.arange(n_out).astype(f32)
    if align_corners:
        scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
        src = (scale * d).astype(f32)
    else:
        scale = f32(n_in) / f32(n_out)
        src = (scale * (d + f32(0.5)) - f32(0.5)).astype(f32)
    if mode == "bilinear":
        src = np.maximum(src, f32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        l1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
        idx = np.stack([i0, i0 + (i0 < n_in - 1)], 1)
        wts = np.stack([f32(1) - l1, l1], 1)
    else:  # bicubic (torch's get_cubic_upsample_coefficients)
        a = f32(CUBIC_A)
        i0 = np.floor(src).astype(np.int64)
        t = (src - i0.astype(f32)).astype(f32)
        near = lambda x: ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)           # noqa: E731  |x| <= 1
        far = lambda x: ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a     # noqa: E731  1 < |x| < 2
        wts = np.stack([far(t + f32(1)), near(t), near(f32(1) - t), far(f32(1) - t + f32(1))], 1)
        idx = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return idx.astype(np.int32), wts.astype(f32)


def is_elementwise(n: QNode) -> bool:
    """A float node whose output element depends only on the same element of its one input (and,
    for an affine, on its channel)."""
    if n.quantized or len(n.inputs) != 1:
        return False
    return n.op in ("affine", "act") or (n.op == "float" and n.attrs.get("fn") in ELEMENTWISE_FNS)


def lut_table(src: QNode, dequantize: QNode, chain: list, quantize: Optional[QNode]) -> np.ndarray:
    """The values of the float ops ``chain`` applied to ``dequantize(src)``, for each of the 256
    values of the 8-bit tensor ``src``, computed by the reference executor's own kernels; with
    ``quantize``, quantized by it. Returns (256,) entries, entry j for the integer lo + j (lo = -128
    for int8, 0 for uint8), or (C, 256) when the chain holds a per-channel affine. int8/uint8
    entries with ``quantize`` (the step is then integer in, integer out), else float32.

    All 256 values go through torch's vectorised kernels (the tensor holds a multiple of 32
    elements), the path the reference executor takes for all but the last (size mod 32) elements of
    a tensor. Example: int8 x 0.05 -> sigmoid -> int8 x 1/127: entry 148 (q = 20, x = 1.0) is
    round(0.7311 * 127) = 93."""
    import torch

    from ..ref.executor import FLOAT_KERNELS, INT_KERNELS

    lo, hi = nx.dtype_range(src.dtype)
    per_channel = any(n.op == "affine" for n in chain)
    c = src.shape[0] if per_channel else 1
    ones = [1] * (len(src.shape) - 1)
    q = torch.arange(lo, hi + 1, dtype=torch.int32).view(-1, 1, *ones).expand(-1, c, *ones).contiguous()
    with torch.no_grad():
        v = INT_KERNELS["dequantize"](dequantize, q)
        for n in chain:
            v = FLOAT_KERNELS[n.op](n, v)
        if quantize is not None:
            v = INT_KERNELS["quantize"](quantize, v)
    table = v.reshape(LUT_SIZE, c).T.numpy()
    table = table.astype(np.float32) if quantize is None else table.astype(quantize.dtype)
    return table.reshape(-1) if per_channel else table[0]


def _check(n: QNode, nodes: dict) -> None:
    """Refuse, naming the layer, what no printer can generate."""
    if n.op not in SUPPORTED:
        raise CodegenError(f"layer {n.name}: {n.op} is not supported by code generation "
                           f"(supported: {', '.join(SUPPORTED)})")
    ranks = {len(nodes[i].shape) for i in n.inputs} | {len(n.shape)}
    if n.op != "input" and not ranks <= {1, 3}:
        raise CodegenError(f"layer {n.name}: tensors of shape {n.shape} (inputs "
                           f"{', '.join(str(nodes[i].shape) for i in n.inputs)}); code generation handles (C,) and "
                           f"(C, H, W)")
    if n.op != "float":
        return
    fn, kw = n.attrs.get("fn"), n.attrs.get("kwargs", {})
    if fn not in FLOAT_FNS:
        raise CodegenError(f"layer {n.name}: float op {fn!r} is not supported by code generation "
                           f"(float: {', '.join(FLOAT_FNS)})")
    if fn == "interpolate" and (kw.get("mode", "bilinear") not in ("bilinear", "bicubic") or len(n.shape) != 3):
        raise CodegenError(f"layer {n.name}: interpolate mode {kw.get('mode')!r} on shape {n.shape}: code "
                           f"generation runs bilinear or bicubic resampling of a (C, H, W) tensor (nearest is a "
                           f"gather)")
    if fn in ("softmax", "log_softmax"):
        dim = kw.get("dim", 1)
        if not -len(n.shape) <= dim <= len(n.shape) or dim == 0:
            raise CodegenError(f"layer {n.name}: {fn} over dim {dim} of a (N, {', '.join(map(str, n.shape))}) tensor; "
                               f"expected a dim other than the batch (1..{len(n.shape)})")
    if fn == "mul":
        for i in n.inputs:
            shape = nodes[i].shape
            if len(shape) != len(n.shape) or any(a not in (1, b) for a, b in zip(shape, n.shape)):
                raise CodegenError(f"layer {n.name}: mul of a {shape} tensor into {n.shape}; code generation "
                                   f"broadcasts only dimensions of size 1 of the same rank")


def _lut_chains(q: QGraph, readers: dict) -> list:
    """[(src, dequantize, chain, quantize or None)] for every maximal chain of elementwise float
    nodes that starts at a dequantized integer tensor and whose inner nodes have one reader each;
    ``quantize`` when the chain's only reader is the quantization of its output."""
    nodes = {n.name: n for n in q.nodes}
    out = []
    for d in q.nodes:
        if d.op != "dequantize":
            continue
        for head in readers[d.name]:
            if not is_elementwise(head):
                continue
            chain = [head]
            while chain[-1].name != q.output and len(readers[chain[-1].name]) == 1:
                nxt = readers[chain[-1].name][0]
                if not is_elementwise(nxt):
                    break
                chain.append(nxt)
            rs = readers[chain[-1].name]
            quant = rs[0] if chain[-1].name != q.output and len(rs) == 1 and rs[0].op == "quantize" else None
            out.append((nodes[d.inputs[0]], d, chain, quant))
    return out


def disjoint(a: Buffer, b: Buffer) -> bool:
    """Whether arena buffers ``a`` and ``b`` share no byte."""
    return a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset


def conv_feeds_only_add(s: Step, add: Step, reads: Counter) -> bool:
    """Whether conv step ``s`` is read by nothing but ``add``, an add of two different tensors that
    comes right after it (``reads``: how many step inputs name each buffer): the pair a printer
    may compute as one step (c.py fuse_adds), for which the plan keeps ``s``'s input alive."""
    return (s.kind == "conv" and add.kind == "add" and len(add.inputs) == 2 and s.output in add.inputs
            and add.inputs[0] != add.inputs[1] and reads[s.output] == 1)


def plan(q: QGraph, name: str = "net") -> Program:
    """Lower ``q`` to a Program (see the module docstring)."""
    prefix = c_name(name)
    nodes = {n.name: n for n in q.nodes}
    for n in q.nodes:
        _check(n, nodes)
    readers: dict = {n.name: [] for n in q.nodes}
    for n in q.nodes:
        for i in n.inputs:
            readers[i].append(n)

    # elementwise float chains on 8-bit tensors -> lookup steps, placed where their last node was
    lut_at: dict = {}       # name of the node a lookup step replaces -> (QNode of the step, table)
    absorbed: set = set()   # nodes the lookup steps compute
    for src, d, chain, quant in _lut_chains(q, readers):
        table = lut_table(src, d, chain, quant)
        if quant is None and not np.isfinite(table).all():
            continue  # e.g. exp overflowing: the float kernel reports the same inf (no table of infs)
        end = quant or chain[-1]
        fns = [c.attrs.get("fn", c.op) for c in chain]
        why = "; ".join(dict.fromkeys(c.reason for c in chain if c.reason))
        step_node = QNode(end.name, "lut", (src.name,), end.shape, quant is not None, end.scale, end.dtype,
                          {"chain": tuple(c.name for c in chain), "fns": tuple(fns), "lo": nx.dtype_range(src.dtype)[0],
                           "per_channel": table.ndim == 1 and table.size > LUT_SIZE},
                          {}, tuple(dict.fromkeys(l for c in chain for l in c.layers)), why or None)
        lut_at[end.name] = (step_node, table)
        absorbed |= {c.name for c in chain} | ({quant.name} if quant else set())
    for n in q.nodes:  # a dequantize read only by lookup steps is not computed
        if n.op == "dequantize" and n.name != q.output and readers[n.name] and \
                all(r.name in absorbed for r in readers[n.name]):
            absorbed.add(n.name)

    def layout(node_name: str) -> str:
        return "nchw" if node_name in (q.input, q.output) and len(nodes[node_name].shape) == 3 else "hwc"

    buffers: dict = {}
    steps = []
    alias: dict = {}
    for n in q.nodes:
        if n.name in lut_at:
            n, table = lut_at[n.name]
            kplan = LutPlan(table)
        elif n.name in absorbed:
            continue
        else:
            kplan = None
        bname = c_name(n.name)
        ins = tuple(alias.get(c_name(i), c_name(i)) for i in n.inputs)
        src = nodes[n.inputs[0]] if n.inputs else None
        if kplan is None:
            kplan = kernel_plan(n, src.shape if src else (), _dtype(src) if src else "",
                                buffers[ins[0]].layout if ins else "hwc")
        if n.op == "gather":
            in_layout = buffers[ins[0]].layout
            table = gather_table(n.params["index"], src.shape, n.shape, in_layout, layout(n.name))
            if (np.array_equal(table, np.arange(len(table))) and buffers[ins[0]].elements == len(table)
                    and in_layout == layout(n.name) and n.name != q.output):
                alias[bname] = ins[0]
                continue
            kplan = GatherPlan(table)
        buffers[bname] = Buffer(bname, _dtype(n), tuple(n.shape), layout=layout(n.name))
        if n.op != "input":
            steps.append(Step(n, ins, bname, kplan))

    try:
        int_out = c_name(q.int_output())
    except (KeyError, IndexError):
        raise CodegenError("the network has no integer layer on its output path (every layer before the output "
                           "is float): nothing to generate an integer network for") from None
    int_out = alias.get(int_out, int_out)

    # lifetimes: [first write, last read] in step numbers; the integer output lives to the end (the
    # CUDA target copies it out after the last step)
    out_name = c_name(q.output)
    life = {}
    for i, s in enumerate(steps):
        life.setdefault(s.output, [i, i])
        for b in s.inputs:
            life.setdefault(b, [-1, -1])[1] = i
    if int_out in life:
        life[int_out][1] = len(steps)
    # a conv whose output only the add right after it reads: its input lives through that add, so
    # the add's output never takes the input's bytes and the C printer can compute the add in the
    # conv's epilogue while the conv still reads its input (c.py fuse_adds)
    reads = Counter(b for s in steps for b in s.inputs)
    for i, (s, t) in enumerate(zip(steps, steps[1:])):
        if conv_feeds_only_add(s, t, reads):
            life[s.inputs[0]][1] = max(life[s.inputs[0]][1], i + 1)
    placed: list = []  # (offset, end, first, last)
    final = {}
    in_name = c_name(q.input)
    for b in sorted(life, key=lambda k: -buffers[k].nbytes):
        buf = buffers[b]
        if b in (in_name, out_name):
            final[b] = Buffer(buf.name, buf.dtype, buf.shape, -1, layout=buf.layout)
            continue
        first, last = life[b]
        offset = 0
        for o, e, f, l in sorted(placed):
            overlap_time = not (last < f or l < first)
            if overlap_time and offset < e and o < offset + buf.nbytes:
                offset = -(-e // ALIGN) * ALIGN
        placed.append((offset, offset + buf.nbytes, first, last))
        final[b] = Buffer(buf.name, buf.dtype, buf.shape, offset, layout=buf.layout)
    for a, target in alias.items():
        t = final[target]
        final[a] = Buffer(a, t.dtype, t.shape, t.offset, target, t.layout)
    # + ALIGN: the VNNI kernel reads input channels 4 at a time, up to 3 bytes past a tensor
    arena = -(-max((e for o, e, f, l in placed), default=0) // ALIGN) * ALIGN + ALIGN
    classes = int(np.prod(nodes[q.output].shape))
    return Program(prefix, tuple(steps), final, arena, in_name, out_name, int_out, _int_input(steps, in_name),
                   classes)


def _int_input(steps: list, in_name: str) -> Optional[str]:
    """The buffer where the int8-input entry point starts: the first quantize step, when the steps
    before it and the network input are read by nothing after it (so skipping them and writing
    that buffer is the same network); None otherwise (the input also feeds float layers)."""
    k = next((i for i, s in enumerate(steps) if s.kind == "quantize"), None)
    if k is None:
        return None
    early = {in_name} | {s.output for s in steps[:k]}
    if any(b in early for s in steps[k + 1:] for b in s.inputs):
        return None
    return steps[k].output
