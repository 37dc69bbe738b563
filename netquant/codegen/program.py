"""A QGraph lowered for code generation: call order, a static buffer plan and constants.

Shared by the C and CUDA printers, so planning is written and tested once.

Layout: every integer tensor of one image is stored channels-last, (H, W, C) row-major, so a
conv reads the C input channels of a pixel contiguously (the inner loop of its dot products).
A 1-D tensor (C,) is stored as is. Float tensors of the network (its input, normalised input,
scores) stay in the caller's NCHW order. Gather indices, defined on NCHW element numbers in the
IR, are translated to channels-last offsets here.

Buffers: each step writes one tensor; a tensor lives from the step that writes it to the last
step that reads it. Offsets in one per-image arena are assigned greedily (largest first, first
fit among non-overlapping lifetimes), 64-byte aligned. A gather whose translated index is the
identity becomes an alias of its input (no copy).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..quant.qgraph import QGraph, QNode

ALIGN = 64
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "float32": "float"}
ELEM_BYTES = {"int8": 1, "uint8": 1, "float32": 4}
SUPPORTED = ("input", "affine", "quantize", "conv", "linear", "add", "concat", "gather", "maxpool", "avgpool",
             "act", "dequantize", "float")
FLOAT_FNS = ("softmax",)


class CodegenError(ValueError):
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
    """One kernel call: ``node`` computes ``output`` from ``inputs``."""

    node: QNode
    inputs: tuple     # Buffer names
    output: str       # Buffer name
    consts: dict = field(default_factory=dict)   # name -> array emitted as a constant table

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
    int_input: str            # the quantized input tensor (the int8-input entry point starts there)
    classes: int

    def buffer(self, name: str) -> Buffer:
        return self.buffers[name]

    def weight_bytes(self) -> int:
        return sum(int(a.nbytes) for s in self.steps for a in s.consts.values())


def _dtype(n: QNode) -> str:
    return n.dtype if n.quantized else "float32"


def _hwc_perm(shape: tuple) -> np.ndarray:
    """perm[nchw_offset] = channels-last offset of the same element."""
    if len(shape) != 3:
        return np.arange(int(np.prod(shape)))
    c, h, w = shape
    return np.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def gather_table(index: np.ndarray, in_shape: tuple, out_shape: tuple) -> np.ndarray:
    """The IR's 1-based NCHW gather index as channels-last source offsets (-1: write zero),
    ordered by channels-last output offset."""
    src = np.where(index > 0, _hwc_perm(in_shape)[np.maximum(index - 1, 0)], -1)
    table = np.empty_like(src)
    table[_hwc_perm(out_shape)] = src
    return table.astype(np.int32)


def _weights_ohwi(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> (O, KH, KW, I), matching channels-last input."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)) if w.ndim == 4 else w


LANES = 16  # int32 lanes of a 512-bit vector: output channels computed together by the VNNI kernel


def vnni_eligible(n: QNode, in_dtype: str) -> bool:
    """The AVX-512 VNNI kernel multiplies unsigned 8-bit activations by signed 8-bit weights
    (vpdpbusd), so it serves ungrouped convs over 8-bit input: uint8 (post-ReLU tensors) as is,
    int8 shifted by +128 into uint8 with the shift taken back through the bias (vnni_bias)."""
    return n.op == "conv" and n.attrs["groups"] == 1 and in_dtype in ("uint8", "int8")


def pack_vnni(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int8 [KH][KW][I/4][O/16][16][4], zero padded: one 64-byte
    row holds 4 input channels of 16 output channels, the operand of one vpdpbusd, and the rows
    one tap and 4 input channels need for all output channels lie side by side.
    Element [kh][kw][c4][ob][lane][j] is w[16*ob + lane, 4*c4 + j, kh, kw]."""
    o, i, kh, kw = w.shape
    ob, ip = -(-o // LANES), -(-i // 4) * 4
    padded = np.zeros((ob * LANES, ip, kh, kw), np.int8)
    padded[:o, :i] = w
    # (OB*16, I4*4, KH, KW) -> (OB, 16, I4, 4, KH, KW) -> (KH, KW, I4, OB, 16, 4)
    return np.ascontiguousarray(padded.reshape(ob, LANES, ip // 4, 4, kh, kw).transpose(4, 5, 2, 0, 1, 3))


def pack_avx2(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int16 [KH][KW][I/2][O/8][8][2], zero padded: one 32-byte
    row holds 2 input channels of 8 output channels, the operand of one vpmaddwd (AVX2).
    Element [kh][kw][c2][ob][lane][j] is w[8*ob + lane, 2*c2 + j, kh, kw]."""
    o, i, kh, kw = w.shape
    ob, ip = -(-o // 8), -(-i // 2) * 2
    padded = np.zeros((ob * 8, ip, kh, kw), np.int16)
    padded[:o, :i] = w
    # (OB*8, I2*2, KH, KW) -> (OB, 8, I2, 2, KH, KW) -> (KH, KW, I2, OB, 8, 2)
    return np.ascontiguousarray(padded.reshape(ob, 8, ip // 2, 2, kh, kw).transpose(4, 5, 2, 0, 1, 3))


SIGNED_OFFSET = 128  # int8 x + 128 is the uint8 that vpdpbusd multiplies


def vnni_bias(bias: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bias of the VNNI kernel over int8 input x, which it reads as u = x + 128 (the zero
    padding as u = 128): sum(u * w) = sum(x * w) + 128 * sum(w), so the bias takes back
    128 * sum(w) per output channel, exactly. Example: w = [1, 1, 2], x = [5, 0, -7]:
    sum(x * w) = -9; u = [133, 128, 121]: sum(u * w) = 503 = -9 + 128 * 4."""
    return (bias.astype(np.int64) - SIGNED_OFFSET * w.reshape(len(w), -1).sum(1, dtype=np.int64)).astype(np.int32)


HI_SHIFTS = (33, 62)  # shifts for which requantization needs only the high half of acc * M


def hi_requant_eligible(shift: np.ndarray) -> bool:
    """Whether every shift lies in HI_SHIFTS, so the SIMD kernels requantize with 32-bit lanes
    from the high half of the product (nq_requantize16_hi in netquant_rt.h)."""
    return bool(np.all((shift >= HI_SHIFTS[0]) & (shift <= HI_SHIFTS[1])))


ADD_PAIR_SHIFTS = (16, 46)  # shifts for which the residual add of 8-bit tensors runs in 32-bit lanes


AMX_K = 64      # bytes of k per AMX tile row: one tdpbusd multiplies 16 x 64 by 64 x 16


def amx_eligible(n: QNode, in_dtype: str) -> bool:
    """The AMX kernel (Sapphire Rapids and newer) reads its left operand straight from a padded
    copy of the input: 16 output pixels x 64 consecutive bytes of one padded input row, so it
    serves ungrouped convs over 8-bit input (uint8: tdpbusd, int8: tdpbssd) whose filter taps
    are adjacent along W (dilation 1 there)."""
    return (n.op == "conv" and n.attrs["groups"] == 1 and in_dtype in ("uint8", "int8")
            and n.attrs["dilation"][1] == 1)


def pack_amx(w: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, KH, KW) -> int8 [KH][J][NB][16][64], the right operands of AMX dot
    products. For one filter row kh the k axis is the KW*I bytes of KW adjacent channels-last
    input pixels, zero-padded to J*64; NB = ceil(O/16) blocks of 16 output channels. A 16 x 64
    tile row kq holds 4 consecutive k of 16 outputs: element [kh][j][nb][kq][4n + i] is the
    weight of output 16*nb + n at byte b = 64*j + 4*kq + i of the row, i.e. input channel b % I of
    tap kw = b // I. Example: I = 16, KW = 3: 48 bytes per filter row, J = 1, k 48..63 are 0."""
    o, i, kh, kw = w.shape
    j, nb = -(-kw * i // AMX_K), -(-o // LANES)
    rows = np.zeros((nb * LANES, kh, j * AMX_K), np.int8)
    rows[:o, :, :kw * i] = w.transpose(0, 2, 3, 1).reshape(o, kh, kw * i)   # (O, KH, KW*I), channels-last
    # (NB*16 n, KH, J*16 kq * 4 i) -> (NB, 16n, KH, J, 16kq, 4i) -> (KH, J, NB, 16kq, 16n, 4i)
    return np.ascontiguousarray(rows.reshape(nb, LANES, kh, j, 16, 4).transpose(2, 3, 0, 4, 1, 5))


def _consts(n: QNode, in_shape: tuple, in_dtype: str = "") -> dict:
    p = n.params
    if n.op == "conv":
        out = {"w": _weights_ohwi(p["weight"]), "bias": p["bias"], "mult": p["multiplier"], "shift": p["shift"]}
        if amx_eligible(n, in_dtype):
            out["wa"] = pack_amx(p["weight"])
        if vnni_eligible(n, in_dtype) or amx_eligible(n, in_dtype):
            ob = -(-len(p["bias"]) // LANES)
            pad = np.zeros(ob * LANES - len(p["bias"]), np.int32)
            out["biasv"] = np.concatenate([p["bias"], pad])
            out["multv"] = np.concatenate([p["multiplier"], pad + (1 << 30)])  # padded lanes are never stored
            out["shiftv"] = np.concatenate([p["shift"], pad + 31])
            if vnni_eligible(n, in_dtype):
                out["wv"] = pack_vnni(p["weight"])
                out["ww"] = pack_avx2(p["weight"])    # the AVX2 kernel serves the same convs
                if in_dtype == "int8":
                    out["biasx"] = np.concatenate([vnni_bias(p["bias"], p["weight"]), pad])
                if hi_requant_eligible(p["shift"]):
                    t = np.concatenate([p["shift"] - 32, pad + 1]).astype(np.int32)
                    out["rqv"] = (np.int32(1) << (t - 1)).astype(np.int32)   # 2^(t-1): the rounding half
                    out["tv"] = t
        return out
    if n.op == "linear":
        w = p["weight"]
        if len(in_shape) == 3:  # a linear layer reading a (C, H, W) tensor directly: reorder K to HWC
            c, h, wd = in_shape
            w = w.reshape(len(w), c, h, wd).transpose(0, 2, 3, 1).reshape(len(w), -1)
        return {"w": np.ascontiguousarray(w), "bias": p["bias"], "mult": p["multiplier"], "shift": p["shift"]}
    if n.op == "affine":
        return {"scale": p["scale"].astype(np.float32), "shift": p["shift"].astype(np.float32)}
    return {}


def plan(q: QGraph, name: str = "net") -> Program:
    """Lower ``q`` to a Program (see the module docstring)."""
    prefix = c_name(name)
    nodes = {n.name: n for n in q.nodes}
    for n in q.nodes:
        if n.op not in SUPPORTED or (n.op == "float" and n.attrs.get("fn") not in FLOAT_FNS):
            what = n.attrs.get("fn", n.op)
            raise CodegenError(f"layer {n.name}: {what} is not supported by code generation "
                               f"(supported: {', '.join(SUPPORTED)}; float: {', '.join(FLOAT_FNS)})")
        if n.op == "float" and n.name != q.output:
            raise CodegenError(f"layer {n.name}: a float {n.attrs['fn']} is supported only as the last layer")
        if n.op == "affine" and not (nodes[n.inputs[0]].op == "input"):
            raise CodegenError(f"layer {n.name}: a float per-channel affine is supported only on the network input")
        if n.op in ("conv", "linear") and not n.quantized:
            raise CodegenError(f"layer {n.name} is kept in float; code generation needs every conv and "
                               f"fully connected layer quantized")

    buffers: dict = {}
    steps = []
    alias: dict = {}
    for n in q.nodes:
        bname = c_name(n.name)
        ins = tuple(alias.get(c_name(i), c_name(i)) for i in n.inputs)
        src = nodes[n.inputs[0]] if n.inputs else None
        consts = _consts(n, src.shape if src else (), _dtype(src) if src else "")
        if n.op == "gather":
            table = gather_table(n.params["index"], nodes[n.inputs[0]].shape, n.shape)
            if np.array_equal(table, np.arange(len(table))) and buffers[ins[0]].elements == len(table):
                alias[bname] = ins[0]
                continue
            consts = {"index": table}
        buffers[bname] = Buffer(bname, _dtype(n), tuple(n.shape))
        if n.op != "input":
            steps.append(Step(n, ins, bname, consts))

    # lifetimes: [first write, last read] in step numbers
    out_name = c_name(q.output)
    life = {}
    for i, s in enumerate(steps):
        life.setdefault(s.output, [i, i])
        for b in s.inputs:
            life.setdefault(b, [-1, -1])[1] = i
    placed: list = []  # (offset, end, first, last)
    final = {}
    in_name = c_name(q.input)
    for b in sorted(life, key=lambda k: -buffers[k].nbytes):
        buf = buffers[b]
        if b in (in_name, out_name):
            final[b] = Buffer(buf.name, buf.dtype, buf.shape, -1)
            continue
        first, last = life[b]
        offset = 0
        for o, e, f, l in sorted(placed):
            overlap_time = not (last < f or l < first)
            if overlap_time and offset < e and o < offset + buf.nbytes:
                offset = -(-e // ALIGN) * ALIGN
        placed.append((offset, offset + buf.nbytes, first, last))
        final[b] = Buffer(buf.name, buf.dtype, buf.shape, offset)
    for a, target in alias.items():
        final[a] = Buffer(a, final[target].dtype, final[target].shape, final[target].offset, target)
    # + ALIGN: the VNNI kernel reads input channels 4 at a time, up to 3 bytes past a tensor
    arena = -(-max((e for o, e, f, l in placed), default=0) // ALIGN) * ALIGN + ALIGN
    last = steps[-1]
    deq = last if last.kind == "dequantize" else next(s for s in steps if s.output == last.inputs[0])
    if deq.kind != "dequantize":
        raise CodegenError(f"the network must end in a dequantized integer layer (optionally then softmax), "
                           f"not {deq.node.name} ({deq.kind})")
    int_out = deq.inputs[0]
    int_in = next(s.output for s in steps if s.kind == "quantize")
    classes = int(np.prod(nodes[q.output].shape))
    return Program(prefix, tuple(steps), final, arena, in_name, out_name, int_out, int_in, classes)
