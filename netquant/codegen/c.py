"""The C printer: a Program -> self-contained C sources (a library, its header, the binary
weights file it includes, a test bench, a Makefile), deterministic (no timestamps) with a
provenance header.

Only the instruction set being built is printed (``profile``: "amx", "vnni", "avx2" or "scalar",
resolved by ``build.generate`` from the isa asked for, "native" asking the compiler), each fast
kernel under its build macro with the portable loop nest as the other branch, reading the same
weights. Convolutions over 8-bit input use AMX tiles where the compiler targets them and Linux
grants the tile state (``conv_amx``), else register tiles on AVX-512 VNNI or AVX2
(``c_conv_simd.py``), depthwise convs channels-in-lanes kernels (``c_conv_dw.py``), else
portable C; residual adds of 8-bit tensors use AVX-512 (16 or 64 lanes) or AVX2 (32 elements) at a time. Kernel text depends
on a conv's shape class, not its spatial size: runtime loops over output rows, channel blocks and
input channel groups, shapes in a per-kernel ``enum``. Example: ResNet-50 at 224x224 prints 0.4 MB
of C (AMX) beside its 26 MB of weights, against 2.56 GB when every tile was unrolled.

Constants of BLOB_MIN_BYTES or more (the weights) are written once, in the layout of the kernel
compiled, to ``<name>_weights.bin`` and included with ``.incbin``; the small tables stay C arrays.
Every integer step follows ``netquant_rt.h``, which mirrors ``netquant/quant/numerics.py`` (or an
exactly equivalent form, docs/NUMERICS.md). Images of a batch run in parallel with OpenMP, each
thread in its own static arena, when the batch has an image per thread; otherwise images run one
after the other and each conv splits into items across the threads: the register-tiled and
depthwise ones through the generated pool (``nq_run``, c_pool.py), which never waits for an
idle worker, the AMX ones with OpenMP (``NQ_SPLIT``).

The CUDA printer subclasses :class:`CPrinter` and overrides only what differs.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from .. import __version__
from ..fileio import atomic_write, write_bytes, write_text
from ..ir.float_ops import ELEMENTWISE_FNS
from ..ir.ops import FLOAT_KERNEL_OPS, INT_OPS
from ..quant.numerics import dtype_range
from . import c_conv_dw
from . import int4 as c_int4
from . import x86_pack as x86
from .c_conv_simd import AVX2, VNNI, SimdConv
from .c_pool import POOL_RUNTIME
from .program import ADD_PAIR_SHIFTS, LUT_SIZE, Buffer, IntConvPlan, Program, Step, conv_feeds_only_add, disjoint
from .runtime_files import fill, runtime_text

RUNTIME_HEADER = "netquant_rt.h"



# the op kinds (netquant/ir/ops.py) with a kernel of their own (k_<kind>): the integer ones and the
# affine (a per-channel float loop). Float layers of the other kinds, float functions and lookup
# tables print one output element at a time (e_<kind>, e_<fn>). Each kernel is a loop (each_offset,
# each_pixel, each_position) around the statements for one output, so the CUDA printer, which runs
# one thread per output, overrides the loops and keeps the bodies.
KERNEL_KINDS = INT_OPS + ("affine",)
ELEMENT_KINDS = tuple(k for k in FLOAT_KERNEL_OPS if k not in ("affine", "float")) + ("lut",)


class Source:
    """Lines with indentation (one helper owns it, as TVM's CodeGenSourceBase does)."""

    def __init__(self):
        self.lines: list[str] = []
        self.level = 0

    def __call__(self, line: str = "") -> "Source":
        self.lines.append(("    " * self.level + line) if line else "")
        return self

    def open(self, line: str = "") -> "Source":
        """Open a block: ``line {``, or a bare ``{`` (a scope of its own) without a line."""
        self(f"{line} {{" if line else "{")
        self.level += 1
        return self

    def close(self, tail: str = "") -> "Source":
        self.level -= 1
        return self("}" + tail)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def c_array(ctype: str, name: str, values: np.ndarray, qualifier: str = "static const", attributes: str = "") -> str:
    """A constant table printed exactly (decimal integers, floats as hex), 80 columns; ``attributes``
    (e.g. "__attribute__((aligned(64)))") go between the declarator and the initializer."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind == "f":
        items = [float(v).hex() + "f" for v in flat.astype(np.float32)]
    else:
        items = [str(int(v)) for v in flat]
    lines, line = [], "   "
    for it in items:
        if len(line) + len(it) + 2 > 80:
            lines.append(line)
            line = "   "
        line += " " + it + ","
    lines.append(line)
    attrs = f" {attributes}" if attributes else ""
    return f"{qualifier} {ctype} {name}[{len(flat)}]{attrs} = {{\n" + "\n".join(lines) + "\n};\n"


# The instruction set a source is printed for: its kernels and weight layouts only, each under
# the #if of its build macro with the portable kernel (reading the same weights) as the other branch.
PROFILES = ("amx", "vnni", "avx2", "scalar")
# constants of at least this many bytes go to the binary weights file (.incbin), the rest stay C arrays
BLOB_MIN_BYTES = 256

CTYPE = {np.dtype("int8"): "int8_t", np.dtype("int32"): "int32_t", np.dtype("float32"): "float",
         np.dtype("int64"): "int32_t", np.dtype("uint8"): "uint8_t", np.dtype("int16"): "int16_t"}


def add_pieces(m_a, m_b) -> list:
    """The 15-bit pieces (l, u, h) of two add multipliers, each as the int32 holding the int16 pair
    (piece of m_a, piece of m_b) that nq_add16_pairs multiplies an (a, b) pair by: m = h 2^30 +
    u 2^15 + l. Worked: m_a = 1500000000 = 2^30 + 13008 * 2^15 + 12032: l = 12032, u = 13008, h = 1."""
    a, b = int(m_a), int(m_b)
    return [(((b >> k) & 0x7FFF) << 16) | ((a >> k) & 0x7FFF) for k in (0, 15, 30)]


def add_pieces16(m_a, m_b):
    """The 16-bit pieces (P0, P1) of two add multipliers for nq_add16_dp / nq_add8_dp, each as the
    int32 holding the int16 pair (piece of m_a, piece of m_b): m = P1 2^16 + P0 with P0 the signed
    low digit in [-2^15, 2^15); None where some P1 would not fit int16 (m >= 2^31 - 2^15, the
    15-bit pieces of add_pieces then). Worked: m = 1200000000: P0 = -29696, P1 = 18311."""
    pieces = []
    for m in (int(m_a), int(m_b)):
        p0 = (m + (1 << 15)) % (1 << 16) - (1 << 15)
        pieces.append((p0, (m - p0) >> 16))
    if any(not -(1 << 15) <= p1 < (1 << 15) for _, p1 in pieces):
        return None
    (a0, a1), (b0, b1) = pieces
    return [((b & 0xFFFF) << 16 | (a & 0xFFFF)) - ((1 << 32) if b < 0 else 0) for a, b in ((a0, b0), (a1, b1))]


class CPrinter:
    """Prints a Program as C. Subclasses override the class attributes and hooks below."""

    kernel_qualifier = "static void"
    file_suffix = ".c"
    const_qualifier = "static const"
    fuses_adds = True   # the x86 register-tile convs take a residual add into their epilogue (fuse_adds)

    def __init__(self, program: Program, provenance: str = "", profile: str = "scalar", fuse_adds: bool = True):
        if profile not in PROFILES:
            raise ValueError(f"unknown instruction set profile {profile!r}: one of {', '.join(PROFILES)}")
        self.p = program
        self.provenance = provenance
        self.profile = profile    # the instruction set whose kernels are printed (PROFILES)
        self.blob = bytearray()   # the large constants, in the layouts the printed kernels read
        self.blob_offsets: dict = {}
        self._tables: dict = {}   # step output -> its constant tables (step_consts)
        # one kernel per op kind of the table (netquant/ir/ops.py) that runs in integers, and the affine
        self.kernels: dict[str, Callable] = {k: getattr(self, f"k_{k}") for k in KERNEL_KINDS}
        self.fused_into: dict = {}   # add layer -> the conv layer whose epilogue computes it
        if self.fuses_adds and fuse_adds:
            self.p = self.fuse_adds(program)

    # --- residual adds in the conv epilogue ----------------------------------------------------
    def fuse_adds(self, p: Program) -> Program:
        """``p`` with each residual add that reads the output of the conv step just before it
        (and nothing else reads that output) printed as part of that conv: the register-tile
        kernel requantizes and clamps the conv's output as its own step would, then adds the
        other input with the add's own formula and stores the add's output (docs/NUMERICS.md,
        "Residual add fused into the conv": the same integers, one pass over memory fewer, and
        the conv's 8-bit output is never stored). Example: ResNet-18's layer1.0 conv2 ->
        add -> ReLU becomes one step writing the block's output. The buffer plan is kept, so
        a pair stays two steps where the add's output shares arena bytes with the conv's input
        (free once the conv has run, but read while the fused kernel writes)."""
        readers = Counter(b for st in p.steps for b in st.inputs)
        steps, out, i = p.steps, [], 0
        while i < len(steps):
            s = steps[i]
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            if nxt is not None and self.fusable(p, s, nxt, readers):
                k = nxt.inputs.index(s.output)
                out.append(replace(s, inputs=(s.inputs[0], nxt.inputs[1 - k]), output=nxt.output,
                                   fused_add=(nxt.node, k)))
                self.fused_into[nxt.node.name] = s.node.name
                i += 2
                continue
            out.append(s)
            i += 1
        return replace(p, steps=tuple(out)) if self.fused_into else p

    def fusable(self, p: Program, s: Step, add: Step, readers: Counter) -> bool:
        """Whether add step ``add`` can run in the epilogue of conv step ``s`` (see fuse_adds): the
        add is the conv's only reader, the three 8-bit tensors are channels-last of one shape,
        the add's output does not overlap the conv's input (read while it is written), and the
        kernel printed for ``s`` takes the add (epilogue_takes_add)."""
        if not (conv_feeds_only_add(s, add, readers) and s.node.quantized and add.node.quantized
                and s.output not in (p.int_output, p.int_input, p.output)):
            return False
        conv_out, skip, y, x = (p.buffer(b) for b in (s.output, *[b for b in add.inputs if b != s.output],
                                                       add.output, s.inputs[0]))
        if not all(b.dtype in ("int8", "uint8") and b.layout == "hwc" and b.shape == conv_out.shape
                   for b in (conv_out, skip, y)):
            return False
        return (x.offset < 0 or y.offset < 0 or disjoint(x, y)) and self.epilogue_takes_add(s, add, skip, y)

    def epilogue_takes_add(self, s: Step, add: Step, skip: Buffer, y: Buffer) -> bool:
        """Whether the kernel printed for conv ``s`` computes ``add`` (other input ``skip``, output
        ``y``) in its epilogue: the x86 register tiles with the high-half requantization, whole
        vectors of channels and a shift the 15-bit-piece add takes."""
        if self.conv_path(s) not in ("avx2", "vnni") or not s.plan.hi_requant or c_int4.q4.is_int4(s.node):
            return False
        lanes = (VNNI if self.conv_path(s) == "vnni" else AVX2).lanes
        return self.hwc(y.shape)[0] % lanes == 0 and ADD_PAIR_SHIFTS[0] <= int(add.node.params["shift"][0]) <= ADD_PAIR_SHIFTS[1]

    @staticmethod
    def add_value(add, a: str, b: str) -> str:
        """Integer add ``add`` (a QNode) of the C values ``a`` (its first input) and ``b`` (its
        second) as one int32 expression: each times its multiplier, one rounding shift, the clamp
        (docs/NUMERICS.md). Example: multipliers 3 and 5, shift 2, a = 1, b = 2: (3 + 10 + 2) >> 2 = 3."""
        lo, hi = add.attrs["clamp"]
        m, sh = add.params["multiplier"], int(add.params["shift"][0])
        return f"nq_clamp(nq_rounding_shift((int64_t)({a}) * {int(m[0])} + (int64_t)({b}) * {int(m[1])}, {sh}), {lo}, {hi})"

    def fused_add_value(self, s: Step, conv: str, other: str) -> str:
        """add_value of the add fused into conv ``s``, whose output is the C value ``conv``."""
        add, k = s.fused_add
        return self.add_value(add, *((conv, other) if k == 0 else (other, conv)))

    def add_pieces_for(self, s: Step) -> list:
        """The 15-bit pieces of the fused add of conv ``s``: add_pieces with the conv's multiplier
        first (the conv's value is the pair's low half) and the other input's second."""
        add, k = s.fused_add
        m = add.params["multiplier"]
        return add_pieces(m[k], m[1 - k])

    def add_pieces16_for(self, s: Step):
        """add_pieces16 of the fused add of conv ``s``, the conv's multiplier first (or None)."""
        add, k = s.fused_add
        m = add.params["multiplier"]
        return add_pieces16(m[k], m[1 - k])

    # --- helpers --------------------------------------------------------------------------
    def buf(self, name: str) -> Buffer:
        return self.p.buffer(name)

    def header_comment(self) -> str:
        return (f"/* Generated by netquant {__version__} for network '{self.p.name}'. Do not edit.\n"
                f" * {self.provenance}\n"
                f" * Numerics: docs/NUMERICS.md (netquant_rt.h). Integer tensors are channels-last (H, W, C). */\n")

    def const_name(self, step: Step, key: str) -> str:
        return f"k_{step.output}_{key}"

    def kernel_labels(self) -> dict:
        """layer -> what the report calls the kernel printed for it (a fused add: the conv it is in)."""
        out = {s.node.name: self.kernel_label(s) for s in self.p.steps}
        out.update({a: f"in the epilogue of {c}" for a, c in self.fused_into.items()})
        return out

    def kernel_label(self, s: Step) -> str:
        """What the report calls the kernel printed for ``s`` (the paths in k_conv's order)."""
        if s.fused_add is not None:
            return self._kernel_label(s) + f" (+ residual add {s.fused_add[0].name} in its epilogue)"
        return self._kernel_label(s)

    def _kernel_label(self, s: Step) -> str:
        if self.is_element_step(s):
            return self.float_label(s)
        path = self.conv_path(s) if s.kind == "conv" else "scalar"
        paths = []
        if path == "amx":
            paths = ["AMX tiles where built with them and granted"]
        elif path in ("vnni", "avx2"):
            paths = [f"{SimdConv(self, VNNI if path == 'vnni' else AVX2).label(s)} where built with it"]
        elif path == "dw":
            paths = [f"depthwise {self.dw_isa().upper()}, {c_conv_dw.BLOCK[self.dw_isa()]} channels in vector lanes, "
                     "where built with it"]
        if s.kind == "add" and all(self.buf(b).dtype in ("int8", "uint8") for b in (*s.inputs, s.output)):
            if self.profile in ("amx", "vnni"):
                paths = ["AVX-512, 16 lanes at a time, where built with it"]
            elif self.profile == "avx2" and ADD_PAIR_SHIFTS[0] <= int(s.node.params["shift"][0]) <= ADD_PAIR_SHIFTS[1]:
                paths = ["AVX2, 32 elements at a time, where built with it"]
        return f"{s.kind}: " + ", else ".join(paths + ["portable C"]) + c_int4.label(self, s)

    def conv_path(self, s: Step) -> str:
        """The kernel printed for conv ``s`` under this profile: "amx", "vnni", "avx2" or
        "scalar" (the portable loop nest, e.g. grouped convs or a scalar profile)."""
        pl = s.plan
        if not isinstance(pl, IntConvPlan) or self.profile == "scalar":
            return "scalar"
        if self.profile == "amx" and pl.amx:
            return "amx"
        if pl.simd:
            return "avx2" if self.profile == "avx2" else "vnni"
        return "dw" if pl.depthwise else "scalar"

    def dw_isa(self) -> str:
        """The depthwise kernels' instruction set for this profile (c_conv_dw.DW_ISAS)."""
        return "avx2" if self.profile == "avx2" else "avx512"

    def step_consts(self, s: Step) -> dict:
        """The constant tables of ``s`` for the kernel this printer prints (made once per step):
        the plan's tables, plus for a conv on a fast path its weights in that path's x86 layout
        (x86_pack) with bias and requantization padded to whole vectors, for example "wv",
        "biasv", "multv" and "rqv"/"tv" (or "shiftv") for AVX-512 VNNI; "wd" and the "...d"
        tables for a depthwise conv."""
        if s.output not in self._tables:
            tables = s.plan.tables()
            if isinstance(s.plan, IntConvPlan):
                tables.update(self.conv_tables(s))
            self._tables[s.output] = tables
        return self._tables[s.output]

    def conv_tables(self, s: Step) -> dict:
        """The x86 tables of conv ``s`` on its path (conv_path), in the order the source declares them."""
        pl, path, w = s.plan, self.conv_path(s), s.node.params["weight"]
        out = {}
        if path == "dw":
            # bias and requantization padded to whole channel blocks: the kernel's masked vector
            # loads then never point past a table (padded lanes are never stored)
            isa = self.dw_isa()
            pad = -len(pl.bias) % c_conv_dw.BLOCK[isa]
            out["wd"] = c_conv_dw.pack_dw(w, isa)
            out.update({f"{k}d": np.concatenate([np.asarray(getattr(pl, k), np.int32), np.full(pad, v, np.int32)])
                        for k, v in (("bias", 0), ("mult", 1 << 30), ("shift", 31))})
            return out
        if path == "scalar":
            return out
        if path == "amx":
            out["wa"] = x86.pack_amx(w)
        pad = np.zeros(-len(pl.bias) % x86.LANES, np.int32)
        out["biasv"] = np.concatenate([pl.bias, pad])
        out["multv"] = np.concatenate([pl.mult, pad + (1 << 30)])  # padded lanes are never stored
        out["shiftv"] = np.concatenate([pl.shift, pad + 31])
        if path == "vnni":
            out["wv"] = x86.pack_vnni(w)
            if pl.signed_input:
                out["biasx"] = np.concatenate([x86.vnni_bias(pl.bias, w), pad])
        elif path == "avx2":
            out["ww"] = x86.pack_avx2(w)
        if path in ("vnni", "avx2"):   # the register tiles' weights in the order they read them (tile_order)
            key = "wv" if path == "vnni" else "ww"
            out[key] = self.simd(s).packed_weights(s, out[key])
            if path == "avx2":   # int8 at rest, widened by the tile's load (c_conv_simd.WidenedIsa)
                out[key] = out[key].astype(np.int8)
        if pl.hi_requant:
            t = np.concatenate([pl.shift - 32, pad + 1]).astype(np.int32)
            out["rqv"] = (np.int32(1) << (t - 1)).astype(np.int32)   # 2^(t-1): the rounding half
            out["tv"] = t
        return out

    def simd(self, s: Step) -> SimdConv:
        """The register-tile printer of conv ``s`` (VNNI or AVX2 path), in the packed variant of
        its instruction set for a 4-bit layer (codegen/int4.py): the one geometry and weight
        order every use (packing, item functions, staging, the tile) must share."""
        return SimdConv(self, c_int4.simd_isa(s, VNNI if self.conv_path(s) == "vnni" else AVX2))

    WEIGHTS = {"amx": "wa", "vnni": "wv", "avx2": "ww", "scalar": "w"}
    MACRO = {"amx": "NQ_AMX", "vnni": "NQ_VNNI", "avx2": "NQ_AVX2"}

    def fn_name(self, step: Step) -> str:
        return f"step_{step.output}"

    def signature(self, step: Step) -> str:
        ins = ", ".join(f"const {self.buf(i).ctype} *restrict x{j}" for j, i in enumerate(step.inputs))
        return f"{self.kernel_qualifier} {self.fn_name(step)}({ins}, {self.buf(step.output).ctype} *restrict y)"

    @staticmethod
    def hwc(shape: tuple) -> tuple:
        """(C, H, W) of a buffer shape; a 1-D (C,) tensor is C x 1 x 1."""
        return (shape + (1, 1))[:3] if len(shape) == 1 else tuple(shape)

    # --- the loops over a kernel's outputs. A C kernel loops; the CUDA printer runs one thread per
    # output and overrides these three to declare the same variables from its thread's output offset e
    @contextmanager
    def each_offset(self, o: Source, i: str, n: str, resume: bool = False):
        """The body inside ``for (int i = 0; i < n; ++i)``: ``i`` runs over output offsets (with
        ``resume``, on from where a vector loop before it left ``i``)."""
        o.open(f"for ({'' if resume else f'int {i} = 0'}; {i} < {n}; ++{i})")
        yield
        o.close()

    @contextmanager
    def each_pixel(self, s: Step, o: Source):
        """The body inside loops over channel ``c`` and pixel ``i`` (= h * W + w) of the output of ``s``."""
        c, h, w = self.hwc(self.buf(s.output).shape)
        o(f"enum {{ C = {c}, HW = {h * w} }};")
        o.open("for (int c = 0; c < C; ++c)").open("for (int i = 0; i < HW; ++i)")
        yield
        o.close().close()

    @contextmanager
    def each_position(self, o: Source, c: str, n: str):
        """The body inside loops over output rows ``oh`` < OH, columns ``ow`` < OW and channels
        ``c`` < ``n`` of a conv or pool (OH, OW: the caller's enum); channels innermost."""
        o.open("for (int oh = 0; oh < OH; ++oh)").open("for (int ow = 0; ow < OW; ++ow)")
        o.open(f"for (int {c} = 0; {c} < {n}; ++{c})")
        yield
        o.close().close().close()

    # --- kernels: each prints the body lines of the step function ------------------------------
    def pix_off(self, name: str, c: str, i: str) -> str:
        """Offset of channel ``c`` of pixel ``i`` (= h * W + w) in buffer ``name``, by its layout."""
        b = self.buf(name)
        ch, h, w = self.hwc(b.shape)
        if len(b.shape) == 1:
            return c
        return f"{c} * {h * w} + {i}" if b.layout == "nchw" else f"{i} * {ch} + {c}"

    def k_affine(self, s: Step, o: Source):
        with self.each_pixel(s, o):
            self.affine_pixel(s, o, "c", "i")

    def affine_pixel(self, s: Step, o: Source, c: str, i: str):
        """Channel ``c`` of pixel ``i`` of float affine ``s``: x * scale[c] + shift[c], two roundings."""
        sc, sh = self.const_name(s, "scale"), self.const_name(s, "shift")
        o(f"float t = x0[{self.pix_off(s.inputs[0], c, i)}] * {sc}[{c}];  /* two roundings, as torch: no FMA */")
        o(f"y[{self.pix_off(s.output, c, i)}] = t + {sh}[{c}];")

    def k_quantize(self, s: Step, o: Source):
        o(f"/* {self.buf(s.inputs[0]).layout.upper()} float in, channels-last integers out */")
        if self.vector_quantize(s):
            self.run_items(s, o, "rows", self.hwc(self.buf(s.output).shape)[1], "rows across threads")
            return
        with self.each_pixel(s, o):
            self.quantize_pixel(s, o, "c", "i")

    # What nq_run's threshold (NQ_POOL_MIN_MACS, c_pool.py) weighs, in dense-conv multiply-adds:
    # a depthwise MAC costs about 8 of them (channels in lanes, 9 taps a pixel, then a full
    # requantization per output: MobileNetV2's 14x14x384 depthwise conv, 0.68M MACs, took 24 us
    # on one Zen 4 core, as long as a 2.4M-MAC dense conv). A quantized input value weighs 1:
    # a 224x224 RGB image (60-70 us on one core) split over two cores took as long or longer
    # (its rows then lie in the other core's cache for the stem), so only images of over 1M
    # values split.
    DW_MAC_EFFORT = 8
    QUANTIZE_EFFORT = 1

    def run_items(self, s: Step, o: Source, kind: str, n: int, comment: str, extra: str = ""):
        """The statements handing step ``s``'s ``n`` items to the pool: its context (the step's x0
        and y, then ``extra`` fields) and ``nq_run(<step>_<kind>, ...)`` with its split effort."""
        o(f"{self.fn_name(s)}_ctx ctx = {{x0, y{extra}}};")
        o(f"nq_run({self.fn_name(s)}_{kind}, &ctx, {n}, {self.split_effort(s)}L);  /* {comment} */")

    def split_effort(self, s: Step) -> int:
        """The work of step ``s`` for nq_run's split threshold, in dense multiply-adds."""
        if s.kind == "conv":
            return self.conv_macs(s) * (self.DW_MAC_EFFORT if self.conv_path(s) == "dw" else 1)
        if s.kind == "quantize":
            return self.buf(s.output).elements * self.QUANTIZE_EFFORT
        if s.kind == "maxpool":   # one vector max a window tap: a compare per output and tap
            return self.buf(s.output).elements * int(np.prod(s.node.attrs["kernel"]))
        return self.buf(s.inputs[0]).elements * self.buf(s.output).elements   # linear: K x O

    def vector_quantize(self, s: Step) -> bool:
        """Whether quantize step ``s`` runs as row items of nq_run with nq_quantize_n (x86
        profiles; an image-shaped float input to 8-bit output)."""
        return (self.profile != "scalar" and s.kind == "quantize" and len(self.buf(s.output).shape) == 3
                and self.buf(s.inputs[0]).dtype == "float32" and self.buf(s.output).dtype in ("int8", "uint8"))

    QUANTIZE_ROW_BYTES = 16 * 1024   # the int32 rows of every channel a quantize item keeps on its stack

    def quantize_prelude(self, s: Step, o: Source):
        """The item function of quantize ``s`` for nq_run: output row h through nq_quantize_n
        into int32, then stored as 8-bit: one call on the W * C values of a channels-last float
        row, or one per channel plane of an NCHW input, interleaved into the channels-last row
        (a 224 x 224 RGB image: 224 items of 3 x 224 values)."""
        fn, yt = self.fn_name(s), self.buf(s.output).ctype
        c, h, w = self.hwc(self.buf(s.output).shape)
        lo, hi = s.node.attrs["clamp"]
        inv = self.flt(1.0 / s.node.scale)
        o(f"typedef struct {{ const float *x0; {yt} *y; }} {fn}_ctx;")
        o.open(f"static void {fn}_rows(void *arg, int h)")
        o(f"const {fn}_ctx *c = arg;")
        o(f"enum {{ C = {c}, HW = {h * w}, W = {w} }};")
        o("const float *restrict x0 = c->x0;")
        o(f"{yt} *restrict y = c->y;")
        pix_in, pix_out = (self.pix_off(n, "ch", "(h * W + i)") for n in (s.inputs[0], s.output))
        plane_row = (f"nq_quantize_n(x0 + {self.pix_off(s.inputs[0], 'ch', '(h * W)')}, {inv}, {lo}, {hi}, "
                     "{}, W);  /* one channel's row; " f"float32(1 / {s.node.scale!r}) */")
        if pix_in == pix_out:   # channels-last float in: the row is W * C contiguous values both sides
            o("int32_t q[W * C];")
            o(f"nq_quantize_n(x0 + h * W * C, {inv}, {lo}, {hi}, q, W * C);  /* float32(1 / {s.node.scale!r}) */")
            o(f"for (int i = 0; i < W * C; ++i) y[h * W * C + i] = ({yt})q[i];")
        elif c * w * 4 <= self.QUANTIZE_ROW_BYTES:   # NCHW float in: every channel's row, then interleaved
            # the interleave with C a constant is one vectorised loop (gcc: permutes of 3 rows for
            # RGB), where a strided store per channel was a byte at a time
            o("int32_t q[C][W];")
            o("for (int ch = 0; ch < C; ++ch) " + plane_row.format("q[ch]"))
            o(f"for (int i = 0; i < W; ++i) for (int ch = 0; ch < C; ++ch) y[{pix_out}] = ({yt})q[ch][i];")
        else:   # NCHW float in, many channels: one row of each channel plane at a time
            o("int32_t q[W];")
            o.open("for (int ch = 0; ch < C; ++ch)")
            o(plane_row.format("q"))
            o(f"for (int i = 0; i < W; ++i) y[{pix_out}] = ({yt})q[i];")
            o.close()
        o.close()

    def quantize_pixel(self, s: Step, o: Source, c: str, i: str):
        """Channel ``c`` of pixel ``i`` of quantize ``s``: round(x * float32(1 / scale)), clamped
        (nq_quantize); scale 0.0078125 multiplies by 0x1.0p+7f = 128."""
        lo, hi = s.node.attrs["clamp"]
        inv = self.flt(1.0 / s.node.scale)
        o(f"y[{self.pix_off(s.output, c, i)}] = ({self.buf(s.output).ctype})nq_quantize("
          f"x0[{self.pix_off(s.inputs[0], c, i)}], {inv}, {lo}, {hi});  /* float32(1 / {s.node.scale!r}) */")

    def k_conv(self, s: Step, o: Source):
        """The conv of the profile's instruction set under its build macro; the portable loop nest
        (reading the same weight layout) where the build lacks it or Linux refuses AMX tiles."""
        path = self.conv_path(s)
        if path == "amx":
            o("#if NQ_AMX")
            o.open("if (nq_amx_state == 1)")
            self.conv_amx(s, o)
            o("return;")
            o.close()
            o("#endif")
            o.open()
            self.conv_loops(s, o, "wa")
            o.close()
        elif path in ("vnni", "avx2"):
            o(f"#if {self.MACRO[path]}")
            self.simd(s).print(s, o)
            o("#else")
            self.conv_loops(s, o, self.WEIGHTS[path])
            o("#endif")
        elif path == "dw":
            self.conv_dw(s, o)
        else:
            self.conv_loops(s, o)

    def conv_macs(self, s: Step) -> int:
        """Multiply-adds of conv ``s`` per image: OH * OW * O * KH * KW * C / groups."""
        oc, oh, ow = self.hwc(self.buf(s.output).shape)
        return int(oh * ow * np.prod(s.node.params["weight"].shape))

    def amx_geometry(self, s: Step) -> dict:
        """Shapes of the AMX kernel of ``s`` (see conv_amx)."""
        a = s.node.attrs
        c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
        oc, oh, ow = self.hwc(self.buf(s.output).shape)
        kh, j, nb = self.step_consts(s)["wa"].shape[:3]
        sh, sw = a["stride"]
        ph, pw = a["padding"]
        hp, wp = h + 2 * ph, w + 2 * pw
        mr = 16 if sw == 1 and sh == 1 else min(16, ow)
        pad = (hp * wp + mr * sw + wp) * c + j * 64 + 64
        return dict(C=c, H=h, W=w, O=oc, OH=oh, OW=ow, KH=kh, J=j, NB=nb, SH=sh, SW=sw, PH=ph, PW=pw,
                    DH=a["dilation"][0], HP=hp, WP=wp, MR=mr, PAD=-(-pad // 64) * 64)

    def amx_buffers(self) -> tuple[int, int]:
        """Bytes of the per-thread padded input and int32 accumulator tiles of the AMX kernels."""
        geos = [self.amx_geometry(s) for s in self.p.steps if s.kind == "conv" and self.conv_path(s) == "amx"]
        return (max([g["PAD"] for g in geos], default=64), max([16 * 16 * g["NB"] for g in geos], default=16))

    def conv_amx(self, s: Step, o: Source):
        """Convolution on AMX tiles (implicit GEMM, no im2col).

        The input is copied into a zero-padded (HP, WP, C) buffer. Output pixels are the rows of
        the left operand: for filter row kh, 16 output pixels read 64 bytes each at a stride of
        SW*C bytes, i.e. the taps kw = 0, 1, ... of all C channels side by side; pack_amx lays the
        weights out for exactly those bytes, with zeros past KW*C. With stride 1 the 16 rows run
        on across padded row ends (pixel v = oh*WP + ow reads at (v + kh*DH*WP)*C), so an 8x8
        output keeps whole tiles; the ow >= OW rows are computed and dropped. With a larger stride
        the rows stay inside one output row (MR = min(16, OW)). Sums are exact int32: each tile
        dot product adds 64 products of 8-bit values. Tiles: 0-3 accumulate 16 output channels
        each, 4 and 7 hold activations, 5 and 6 weights (alternating, so loads overlap products).
        Example: S1U1_conv1 (C = O = 16, 32x32): 3 tdpbusd per 16 pixels, 68 strips of 16 of the
        34-wide virtual rows (34*31 + 32 = 1086 pixels) instead of 64 of the true 32-wide ones.
        """
        g = self.amx_geometry(s)
        WA, B = self.const_name(s, "wa"), self.const_name(s, "biasv")
        dp = "_tile_dpbusd" if self.buf(s.inputs[0]).dtype == "uint8" else "_tile_dpbssd"
        yt = self.buf(s.output).ctype
        o("enum { " + ", ".join(f"{k} = {v}" for k, v in g.items()) + " };")
        o("uint8_t *xp = nq_pad;")
        o("/* copy the rows in; zero only what lies around them (top, the side pads between rows, and")
        o(" * the bottom with the slack that the last tile rows read past the image) */")
        o("memset(xp, 0, (PH * WP + PW) * C);")
        o.open("for (int h = 0; h < H; ++h)")
        o("uint8_t *row = xp + ((h + PH) * WP + PW) * C;")
        o("memcpy(row, (const uint8_t *)x0 + h * W * C, W * C);")
        o("if (h + 1 < H) memset(row + W * C, 0, 2 * PW * C);")
        o.close()
        o("memset(xp + ((H - 1 + PH) * WP + PW + W) * C, 0, PAD - ((H - 1 + PH) * WP + PW + W) * C);")
        stride1 = g["SH"] == 1 and g["SW"] == 1
        # strips of MR output pixels split across threads (one image of a small batch): each
        # thread configures its own tiles and puts back what it found (the caller's or none)
        strips = "((OH - 1) * WP + OW + MR - 1) / MR" if stride1 else "OH * ((OW + MR - 1) / MR)"
        o(f"#pragma omp parallel if (NQ_SPLIT({strips}, {self.conv_macs(s)}L))")
        o.open()
        o("nq_tilecfg saved;")
        o("_tile_storeconfig(&saved);")
        o("nq_amx_config(MR);")
        o("#pragma omp for schedule(static)")
        if stride1:
            o("/* virtual rows: pixel v = oh * WP + ow, ow < OW kept */")
            o.open(f"for (int i = 0; i < {strips}; ++i)")
            o("const int v0 = i * MR;")
            base = "xp + (v0 + kh * DH * WP) * C + j * 64"
            stride = "C"
        else:
            o.open(f"for (int i = 0; i < {strips}; ++i)")
            o("const int oh = i / ((OW + MR - 1) / MR), v0 = i % ((OW + MR - 1) / MR) * MR;")
            base = "xp + ((oh * SH + kh * DH) * WP + v0 * SW) * C + j * 64"
            stride = "SW * C"
        nb = g["NB"]
        groups = [("g0", 4)] if nb // 4 else []
        if nb % 4:
            groups.append((str(nb - nb % 4), nb % 4))
        for g0, nt in groups:
            if g0 == "g0" and nb // 4 > 1:
                o.open(f"for (int g0 = 0; g0 < {nb // 4 * 4}; g0 += 4)")
            elif g0 == "g0":
                g0 = "0"
                o.open()
            else:
                o.open()
            for t in range(nt):
                o(f"_tile_zero({t});")
            o.open("for (int kh = 0; kh < KH; ++kh)").open("for (int j = 0; j < J; ++j)")
            o(f"_tile_loadd(4, {base}, {stride});")
            for t in range(nt):
                o(f"_tile_loadd({5 + t % 2}, {WA} + ((kh * J + j) * NB + {g0} + {t}) * 1024, 64);")
                o(f"{dp}({t}, 4, {5 + t % 2});")
            o.close().close()
            for t in range(nt):
                o(f"_tile_stored({t}, nq_acc + ({g0} + {t}) * 16, NB * 64);")
            o.close()
        o.open("for (int r = 0; r < MR; ++r)")
        if stride1:
            o("const int v = v0 + r, oh = v / WP, ow = v % WP;")
            o("if (ow >= OW || oh >= OH) continue;")
        else:
            o("const int ow = v0 + r;")
            o("if (ow >= OW) break;")
        o(f"{yt} *yp = y + (oh * OW + ow) * O;")
        o.open("for (int b = 0; b < NB; ++b)")
        o(f"const __m512i acc = _mm512_add_epi32(_mm512_loadu_si512((const void *)(nq_acc + (r * NB + b) * 16)), "
          f"_mm512_loadu_si512((const void *)({B} + 16 * b)));")
        self._requantize_store16(s, o, "acc")
        o.close().close()
        o.close()
        o("nq_amx_restore(&saved);")
        o.close()

    def _requantize_store16(self, s: Step, o: Source, acc: str):
        """Output channels 16*b .. 16*b+15 of one pixel: requantize the int32 sums ``acc`` (bias
        included) and store their low bytes at ``yp + 16 * b``, the channels past O masked off.
        32-bit lanes from the high half of the product where every shift allows it
        (nq_requantize16_hi), else 64-bit lanes (nq_requantize16)."""
        lo, hi = s.node.attrs["clamp"]
        M, S = self.const_name(s, "multv"), self.const_name(s, "shiftv")
        if s.plan.hi_requant:
            R, T = self.const_name(s, "rqv"), self.const_name(s, "tv")
            o(f"const __m512i q = _mm512_min_epi32(_mm512_max_epi32(nq_requantize16_hi({acc}, "
              f"_mm512_loadu_si512((const void *)({M} + 16 * b)), _mm512_loadu_si512((const void *)({R} + 16 * b)), "
              f"_mm512_loadu_si512((const void *)({T} + 16 * b))), _mm512_set1_epi32({lo})), _mm512_set1_epi32({hi}));")
        else:
            o(f"const __m512i q = nq_requantize16({acc}, _mm512_loadu_si512((const void *)({M} + 16 * b)), "
              f"_mm512_loadu_si512((const void *)({S} + 16 * b)), {lo}, {hi});")
        o("const __mmask16 keep = O - 16 * b >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (O - 16 * b)) - 1);")
        o("_mm512_mask_cvtepi32_storeu_epi8(yp + 16 * b, keep, q);  /* in range already: the low byte */")

    def conv_enum(self, s: Step) -> str:
        """The shapes of conv ``s`` as one C enum (C, H, W in; O, OH, OW out; taps, strides,
        padding, dilation; CG input and OG output channels per group)."""
        a = s.node.attrs
        c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
        oc, oh, ow = self.hwc(self.buf(s.output).shape)
        kh, kw = s.node.params["weight"].shape[2:]
        g = a["groups"]
        return (f"enum {{ C = {c}, H = {h}, W = {w}, O = {oc}, OH = {oh}, OW = {ow}, KH = {kh}, KW = {kw}, "
                f"SH = {a['stride'][0]}, SW = {a['stride'][1]}, PH = {a['padding'][0]}, PW = {a['padding'][1]}, "
                f"DH = {a['dilation'][0]}, DW = {a['dilation'][1]}, CG = {c // g}, OG = {oc // g} }};")

    @staticmethod
    def open_taps(o: Source):
        """Open the loops over the filter taps (kh, kw) of output pixel (oh, ow), skipping taps
        in the zero padding; inside, (ih, iw) is the input pixel. The caller closes both."""
        o.open("for (int kh = 0; kh < KH; ++kh)")
        o("const int ih = oh * SH - PH + kh * DH;")
        o("if ((unsigned)ih >= (unsigned)H) continue;")
        o.open("for (int kw = 0; kw < KW; ++kw)")
        o("const int iw = ow * SW - PW + kw * DW;")
        o("if ((unsigned)iw >= (unsigned)W) continue;")

    def conv_dw(self, s: Step, o: Source):
        """A depthwise conv on c_conv_dw's kernel (channels in vector lanes, unpadded input), one
        call per output row so the rows split across threads; the portable loop nest on the same
        weights where the build lacks the ISA."""
        isa = self.dw_isa()
        lo, hi = s.node.attrs["clamp"]
        b, m, sh = (self.const_name(s, k) for k in ("biasd", "multd", "shiftd"))
        oh = self.hwc(self.buf(s.output).shape)[1]
        o(f"#if {'NQ_DW_AVX2' if isa == 'avx2' else 'NQ_DW_AVX512'}")
        # the weight table travels in the context: a 4-bit layer's is the caller's unpacked copy
        self.run_items(s, o, "rows", oh, "output rows across threads", f", {self.const_name(s, 'wd')}")
        o("#else")
        o.open()
        self.conv_loops(s, o, "wd")
        o.close()
        o("#endif")

    def dw_prelude(self, s: Step, o: Source):
        """The item function of depthwise conv ``s`` for nq_run (c_pool.py): output row r."""
        isa = self.dw_isa()
        lo, hi = s.node.attrs["clamp"]
        b, m, sh = (self.const_name(s, k) for k in ("biasd", "multd", "shiftd"))
        signed = [int(self.buf(n).dtype == "int8") for n in (s.inputs[0], s.output)]
        fn, xin, yt = self.fn_name(s), self.buf(s.inputs[0]).ctype, self.buf(s.output).ctype
        o(f"#if {'NQ_DW_AVX2' if isa == 'avx2' else 'NQ_DW_AVX512'}")
        wt = np.asarray(self.step_consts(s)["wd"]).dtype
        o(f"typedef struct {{ const {xin} *x0; {yt} *y; const {'int16_t' if wt == np.int16 else 'int8_t'} *wd; }} {fn}_ctx;")
        o.open(f"static void {fn}_rows(void *arg, int r)")
        o(f"const {fn}_ctx *c = arg;")
        o(self.conv_enum(s))
        o(f"{c_conv_dw.fn_name(isa)}(c->x0, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, "
          f"c->wd, {b}, {m}, {sh}, {lo}, {hi}, c->y, OH, OW, r, r + 1, {signed[0]}, {signed[1]});")
        o.close()
        o("#endif")

    def weight_index(self, s: Step, layout: str) -> str:
        """The offset of weight (o, kh, kw, k) (k: input channel within the group) in the
        ``layout`` the printed kernels read: "w" (O, KH, KW, CG); "wv" [KH][KW][CP/4][OB][16][4]
        and "ww" [KH][KW][CP/2][OB][8][2] (x86_pack.pack_vnni, pack_avx2) reordered by
        c_conv_simd.tile_order; "wa" [KH][J][NB][16][64]
        with byte b = kw * C + k of filter row kh at [b / 64][o / 16][b % 64 / 4][4 (o % 16) + b % 4]
        (x86_pack.pack_amx). The portable kernel reads the one layout the source holds."""
        if layout == "w":
            return "((o * KH + kh) * KW + kw) * CG + k"
        if layout == "wd":   # c_conv_dw.pack_dw: [CB][NP][2][B], lane order of _lane_channels (k = 0)
            blk, npairs = c_conv_dw.BLOCK[self.dw_isa()], self.step_consts(s)["wd"].shape[1]
            return (f"(((o / {blk}) * {npairs} + (kh * KW + kw) / 2) * 2 + o % 8 / 4) * {blk} "
                    f"+ 2 * (4 * (o % {blk} / 8) + o % 4) + (kh * KW + kw) % 2")
        if layout in ("wv", "ww"):   # c_conv_simd.tile_order
            return self.simd(s).weight_index(s)
        j, nb = self.step_consts(s)["wa"].shape[1:3]
        return (f"(((kh * {j} + (kw * C + k) / 64) * {nb} + o / 16) * 16 + (kw * C + k) % 64 / 4) * 64 "
                f"+ o % 16 * 4 + (kw * C + k) % 4")

    def conv_loops(self, s: Step, o: Source, layout: str = "w"):
        """The portable conv: every output (oh, ow, o) in turn (conv_output), weights in ``layout``."""
        o(self.conv_enum(s))
        o("/* |acc| <= %d < 2^31 (lowering checked the bound on these weights) */" % s.node.attrs["acc_bound"])
        with self.each_position(o, "o", "O"):
            self.conv_output(s, o, layout)

    def conv_output(self, s: Step, o: Source, layout: str):
        """Output channel ``o`` of output pixel (oh, ow) of integer conv ``s`` (its shapes an enum,
        conv_enum): bias plus the products of every tap inside the image (conv_tap), requantized."""
        lo, hi = s.node.attrs["clamp"]
        tables = ("biasd", "multd", "shiftd") if layout == "wd" else ("bias", "mult", "shift")
        B, M, S = (self.const_name(s, k) for k in tables)
        o("const int cg = (o / OG) * CG;")
        o(f"int32_t acc = {B}[o];")
        self.open_taps(o)
        o(f"const {self.buf(s.inputs[0]).ctype} *xp = x0 + (ih * W + iw) * C + cg;")
        self.conv_tap(s, o, layout)
        o.close().close()
        if s.fused_add is None:
            o(f"y[(oh * OW + ow) * O + o] = ({self.buf(s.output).ctype})nq_requantize(acc, {M}[o], {S}[o], {lo}, {hi});")
            return
        o(f"const int32_t c = nq_requantize(acc, {M}[o], {S}[o], {lo}, {hi});  /* the conv's output, as its own step */")
        o(f"/* + the other input: add {s.fused_add[0].name} */")
        o(f"y[(oh * OW + ow) * O + o] = ({self.buf(s.output).ctype})"
          f"{self.fused_add_value(s, 'c', 'x1[(oh * OW + ow) * O + o]')};")

    def conv_tap(self, s: Step, o: Source, layout: str):
        """acc += the CG products of tap (kh, kw) for output channel o: inputs xp[k], weights in ``layout``."""
        W = self.const_name(s, layout)
        if layout == "wd":
            o(f"acc += (int32_t)xp[0] * (int32_t){W}[{self.weight_index(s, layout)}];  /* one channel per group */")
        elif layout == "w":
            o(f"const int8_t *wp = {W} + ((o * KH + kh) * KW + kw) * CG;")
            o("for (int k = 0; k < CG; ++k) acc += (int32_t)xp[k] * (int32_t)wp[k];")
        else:
            o(f"for (int k = 0; k < CG; ++k) acc += (int32_t)xp[k] * (int32_t){W}[{self.weight_index(s, layout)}];")

    LINEAR_BLOCK = 16   # outputs of a fully connected layer per nq_run item

    def vector_linear(self, s: Step) -> bool:
        """Whether linear step ``s`` runs on nq_dot8 in blocks of outputs (x86 profiles, 8-bit input)."""
        return self.profile != "scalar" and s.kind == "linear" and self.buf(s.inputs[0]).dtype in ("int8", "uint8")

    def linear_prelude(self, s: Step, o: Source):
        """The item function of linear ``s`` for nq_run: outputs 16 item .. 16 item + 15, each a
        bias plus nq_dot8 of the input and its weight row, requantized."""
        fn, xt, yt = self.fn_name(s), self.buf(s.inputs[0]).ctype, self.buf(s.output).ctype
        lo, hi = s.node.attrs["clamp"]
        B, M, S = (self.const_name(s, key) for key in ("bias", "mult", "shift"))
        signed = int(self.buf(s.inputs[0]).dtype == "int8")
        o(f"typedef struct {{ const {xt} *x0; {yt} *y; const int8_t *w; }} {fn}_ctx;")
        o.open(f"static void {fn}_outputs(void *arg, int item)")
        o(f"const {fn}_ctx *c = arg;")
        o(f"enum {{ K = {self.buf(s.inputs[0]).elements}, O = {self.buf(s.output).elements}, BLOCK = {self.LINEAR_BLOCK} }};")
        o(f"const {xt} *restrict x0 = c->x0;")
        o(f"{yt} *restrict y = c->y;")
        o.open("for (int o = BLOCK * item; o < O && o < BLOCK * (item + 1); ++o)")
        o(f"const int32_t acc = {B}[o] + nq_dot8(x0, {signed}, c->w + (long)o * K, K);")
        o(f"y[o] = ({yt})nq_requantize(acc, {M}[o], {S}[o], {lo}, {hi});")
        o.close()
        o.close()

    def k_linear(self, s: Step, o: Source):
        k = self.buf(s.inputs[0]).elements
        oc = self.buf(s.output).elements
        if self.vector_linear(s):
            # the weight table travels in the context: a 4-bit layer's is the caller's unpacked copy
            self.run_items(s, o, "outputs", -(-oc // self.LINEAR_BLOCK),
                           f"blocks of {self.LINEAR_BLOCK} outputs across threads", f", {self.const_name(s, 'w')}")
            return
        o(f"enum {{ K = {k}, O = {oc} }};")
        with self.each_offset(o, "o", "O"):
            self.linear_output(s, o, "o")

    def linear_output(self, s: Step, o: Source, i: str):
        """Output ``i`` of integer linear ``s`` (K, its input length, is an enum of the caller)."""
        lo, hi = s.node.attrs["clamp"]
        W, B, M, S = (self.const_name(s, key) for key in ("w", "bias", "mult", "shift"))
        o(f"int32_t acc = {B}[{i}];")
        o(f"for (int k = 0; k < K; ++k) acc += (int32_t)x0[k] * (int32_t){W}[{i} * K + k];")
        o(f"y[{i}] = ({self.buf(s.output).ctype})nq_requantize(acc, {M}[{i}], {S}[{i}], {lo}, {hi});")

    def k_add(self, s: Step, o: Source):
        o(f"enum {{ N = {self.buf(s.output).elements} }};")
        vector = self.add_vectors(s, o)
        with self.each_offset(o, "i", "N", resume=vector):
            self.add_element(s, o, "i")

    def add_vectors(self, s: Step, o: Source) -> bool:
        """The vector loops of an add of 8-bit tensors under a profile that has them (AVX-512: 64,
        then 16 elements at a time; AVX2: 32); whether they were printed (the scalar loop then
        resumes at ``i``). Only the profile's instruction set is printed."""
        t0, t1 = (self.buf(i).dtype for i in s.inputs)
        out_t = self.buf(s.output).dtype
        if not {t0, t1, out_t} <= {"int8", "uint8"}:
            return False
        sh = int(s.node.params["shift"][0])
        if self.profile in ("amx", "vnni"):
            self.add_avx512(s, o, sh)
            return True
        if self.profile == "avx2" and ADD_PAIR_SHIFTS[0] <= sh <= ADD_PAIR_SHIFTS[1]:
            self.add_avx2(s, o, sh)
            return True
        return False

    # the vector loop of an 8-bit add in the 15-bit-piece form, per vector width: elements per
    # iteration, the lane type the inputs widen to, the pair function and the saturating pack
    ADD_LOOPS = {"avx2": dict(v="_mm256", bits=256, step=32, lane="epi16", pair="nq_add16x16_pairs", pack="nq_pack2x16"),
                 "avx512": dict(v="_mm512", bits=512, step=64, lane="epi32", pair="nq_add16_pairs", pack="nq_pack4")}

    def add_pair_loop(self, s: Step, o: Source, sh: int, width: str):
        """ADD_LOOPS[width] elements at a time: 16 of each input per load, widened, summed by the
        pair function with the multipliers' pieces, clamped in the lanes where the clamp is
        narrower than the output type, packed with saturation (the clamp) and stored."""
        k = self.ADD_LOOPS[width]
        v, vt, lane = k["v"], f"__m{k['bits']}i", k["lane"]
        t0, t1 = (self.buf(i).dtype for i in s.inputs)
        out_t = self.buf(s.output).dtype
        lo, hi = s.node.attrs["clamp"]

        def widen(t: str) -> str:
            return f"{v}_cvtep{'u' if t == 'uint8' else 'i'}8_{lane}"

        o.open()
        o("/* 15-bit pieces of the multipliers, as (x0, x1) int16 pairs: see nq_add16_pairs */")
        o(f"const {vt} " + ", ".join(f"{n} = {v}_set1_epi32({p})"
                                     for n, p in zip(("lu", "uu", "hu"), add_pieces(*s.node.params["multiplier"])))
          + ";")
        o.open(f"for (; i + {k['step']} <= N; i += {k['step']})")
        qs = [f"q{j}" for j in range(k["step"] // 16)]
        for j, qj in enumerate(qs):
            q = (f"{k['pair']}({widen(t0)}(_mm_loadu_si128((const __m128i *)(x0 + i + {16 * j}))), "
                 f"{widen(t1)}(_mm_loadu_si128((const __m128i *)(x1 + i + {16 * j}))), lu, uu, hu, {sh})")
            if (lo, hi) != dtype_range(out_t):
                q = f"{v}_min_{lane}({v}_max_{lane}({q}, {v}_set1_{lane}({lo})), {v}_set1_{lane}({hi}))"
            o(f"const {vt} {qj} = {q};")
        o(f"{v}_storeu_si{k['bits']}((void *)(y + i), {k['pack']}_{'u8' if out_t == 'uint8' else 's8'}({', '.join(qs)}));"
          "  /* saturating: the clamp */")
        o.close().close()

    def add_avx2(self, s: Step, o: Source, sh: int):
        """32 elements at a time: both inputs widened to int16, nq_add16x16_pairs, a saturating pack."""
        o("int i = 0;")
        o("#if NQ_AVX2")
        self.add_pair_loop(s, o, sh, "avx2")
        o("#endif")

    def add_avx512(self, s: Step, o: Source, sh: int):
        """64 elements at a time in 32-bit lanes (nq_add16_pairs) where the shift allows, then 16
        at a time in 64-bit lanes (nq_add16)."""
        t0, t1 = (self.buf(i).dtype for i in s.inputs)
        lo, hi = s.node.attrs["clamp"]
        m = s.node.params["multiplier"]
        widen = {"uint8": "_mm512_cvtepu8_epi32", "int8": "_mm512_cvtepi8_epi32"}
        o("int i = 0;")
        o("#if NQ_VNNI")
        if ADD_PAIR_SHIFTS[0] <= sh <= ADD_PAIR_SHIFTS[1]:
            self.add_pair_loop(s, o, sh, "avx512")
        o.open("for (; i + 16 <= N; i += 16)")
        o(f"const __m512i a = {widen[t0]}(_mm_loadu_si128((const __m128i *)(x0 + i)));")
        o(f"const __m512i b = {widen[t1]}(_mm_loadu_si128((const __m128i *)(x1 + i)));")
        o(f"_mm_storeu_si128((__m128i *)(y + i), _mm512_cvtepi32_epi8(nq_add16(a, b, {int(m[0])}, {int(m[1])}, "
          f"{sh}, {lo}, {hi})));  /* in range already: the low bytes */")
        o.close()
        o("#endif")

    def add_element(self, s: Step, o: Source, i: str):
        """Element ``i`` of integer add ``s``: both inputs times their
        multipliers, one rounding shift, clamp."""
        o(f"y[{i}] = ({self.buf(s.output).ctype}){self.add_value(s.node, f'x0[{i}]', f'x1[{i}]')};")

    def concat_parts(self, s: Step):
        """For each input j of concat ``s``: (j, first output channel, channels, a function giving
        the requantized value of input element ``index`` as a C expression)."""
        lo, hi = s.node.attrs["clamp"]
        M, S = s.node.params["multiplier"], s.node.params["shift"]
        off = 0
        for j, name in enumerate(s.inputs):
            cj = self.hwc(self.buf(name).shape)[0]
            yield j, off, cj, (lambda index, j=j: f"({self.buf(s.output).ctype})nq_requantize(x{j}[{index}], "
                                                  f"{int(M[j])}, {int(S[j])}, {lo}, {hi})")
            off += cj

    def k_concat(self, s: Step, o: Source):
        oc, h, w = self.hwc(self.buf(s.output).shape)
        o(f"enum {{ P = {h * w}, C = {oc} }};")
        o.open("for (int p = 0; p < P; ++p)")
        for j, off, cj, value in self.concat_parts(s):
            o(f"for (int c = 0; c < {cj}; ++c) y[p * C + {off} + c] = {value(f'p * {cj} + c')};")
        o.close()

    def k_gather(self, s: Step, o: Source):
        o(f"enum {{ N = {self.buf(s.output).elements} }};")
        with self.each_offset(o, "i", "N"):
            self.gather_element(s, o, "i")

    def gather_element(self, s: Step, o: Source, i: str):
        """Element ``i`` of integer gather ``s``: input element index[i], or 0 at -1."""
        o(f"const int32_t t = {self.const_name(s, 'index')}[{i}];")
        o(f"y[{i}] = t < 0 ? 0 : x0[t];  /* -1: zero padding (real 0 is integer 0) */")

    def pool_enum(self, s: Step, o: Source):
        """The shapes of pool ``s`` as one C enum (C, H, W in; OH, OW out; window, strides, padding)."""
        a = s.node.attrs
        c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
        kh, kw = a["kernel"]
        o(f"enum {{ C = {c}, H = {h}, W = {w}, OH = {(h + 2 * a['padding'][0] - kh) // a['stride'][0] + 1}, "
          f"OW = {(w + 2 * a['padding'][1] - kw) // a['stride'][1] + 1}, KH = {kh}, KW = {kw},")
        o(f"       SH = {a['stride'][0]}, SW = {a['stride'][1]}, PH = {a['padding'][0]}, PW = {a['padding'][1]} }};")

    def k_maxpool(self, s: Step, o: Source):
        if self.vector_maxpool(s):
            self.run_items(s, o, "rows", self.hwc(self.buf(s.output).shape)[1], "output rows across threads")
        elif self.pixel_maxpool(s):
            self.pool_enum(s, o)
            o.open("for (int oh = 0; oh < OH; ++oh)")
            self.max_pool_row(s, o)
            o.close()
        else:
            self.pool_loops(s, o, "max")

    def k_avgpool(self, s: Step, o: Source):
        self.pool_loops(s, o, "avg")

    def pool_loops(self, s: Step, o: Source, kind: str):
        self.pool_enum(s, o)
        with self.each_position(o, "c", "C"):
            self.pool_element_int(s, o, kind)

    def pixel_maxpool(self, s: Step) -> bool:
        """Whether max pool ``s`` runs a whole pixel at a time (8-bit, channels-last; max_pool_row)."""
        return self.buf(s.output).dtype in ("uint8", "int8") and len(self.buf(s.output).shape) == 3

    def vector_maxpool(self, s: Step) -> bool:
        """Whether max pool ``s`` runs as output-row items of nq_run (x86 profiles): the pool after
        ResNet-18's stem took 30 us on one core, and 73 us serial after a stem split over two
        cores, whose output rows then lie in the other core's cache."""
        return self.profile != "scalar" and s.kind == "maxpool" and self.pixel_maxpool(s)

    def maxpool_prelude(self, s: Step, o: Source):
        """The item function of max pool ``s`` for nq_run: output row oh (max_pool_row)."""
        fn, t = self.fn_name(s), self.buf(s.output).ctype
        o(f"typedef struct {{ const {t} *x0; {t} *y; }} {fn}_ctx;")
        o.open(f"static void {fn}_rows(void *arg, int oh)")
        o(f"const {fn}_ctx *c = arg;")
        o(f"const {t} *restrict x0 = c->x0;")
        o(f"{t} *restrict y = c->y;")
        self.pool_enum(s, o)
        self.max_pool_row(s, o)
        o.close()

    @staticmethod
    def pool_windows_meet_input(s: Step, hw: tuple) -> bool:
        """Whether every window of pool ``s`` over an (H, W) input holds at least one input
        position (true of torch's pools, whose padding is at most half the window). Example: a
        3x3 window, stride 2, padding 1 over 112 rows: the first covers rows -1..1, the last
        (55) rows 109..111."""
        a = s.node.attrs
        for n, k, st, p in zip(hw, a["kernel"], a["stride"], a["padding"]):
            out = (n + 2 * p - k) // st + 1
            if k - 1 - p < 0 or (out - 1) * st - p > n - 1:
                return False
        return True

    def max_pool_row(self, s: Step, o: Source):
        """Output row ``oh`` of an 8-bit max pool a whole pixel at a time: channels innermost, so
        the compiler vectorises the max (vpmaxub). Where every window meets the input
        (pool_windows_meet_input), a tap in the padding reads the nearest input position
        instead, which lies in the same window: the max of a window is then the max of KH * KW
        loads, no branch per tap (ResNet-18's pool after the stem, 112x112x64 to 56x56x64: from
        52-73 to 37-42 us an image on one Zen 4 core, three runs each). Else a window entirely in
        the padding stores (type)INT32_MIN as pool_element_int does."""
        t = self.buf(s.output).ctype
        if self.pool_windows_meet_input(s, self.hwc(self.buf(s.inputs[0]).shape)[1:]):
            o.open("for (int ow = 0; ow < OW; ++ow)")
            o(f"const {t} *xp[KH * KW];  /* the window's taps, those in the padding moved inside it */")
            o.open("for (int kh = 0; kh < KH; ++kh)")
            o("int ih = oh * SH - PH + kh;")
            o("ih = ih < 0 ? 0 : ih >= H ? H - 1 : ih;")
            o.open("for (int kw = 0; kw < KW; ++kw)")
            o("int iw = ow * SW - PW + kw;")
            o("iw = iw < 0 ? 0 : iw >= W ? W - 1 : iw;")
            o("xp[kh * KW + kw] = x0 + (ih * W + iw) * C;")
            o.close().close()
            o(f"{t} *restrict yp = y + (oh * OW + ow) * C;")
            o.open("for (int c = 0; c < C; ++c)")
            o(f"{t} m = xp[0][c];")
            o("for (int i = 1; i < KH * KW; ++i) m = xp[i][c] > m ? xp[i][c] : m;")
            o("yp[c] = m;")
            o.close().close()
            return
        o.open("for (int ow = 0; ow < OW; ++ow)")
        o(f"{t} *restrict yp = y + (oh * OW + ow) * C;")
        o("int first = 1;")
        o.open("for (int kh = 0; kh < KH; ++kh)")
        o("const int ih = oh * SH - PH + kh;")
        o("if ((unsigned)ih >= (unsigned)H) continue;  /* padding: -inf */")
        o.open("for (int kw = 0; kw < KW; ++kw)")
        o("const int iw = ow * SW - PW + kw;")
        o("if ((unsigned)iw >= (unsigned)W) continue;")
        o(f"const {t} *restrict xp = x0 + (ih * W + iw) * C;")
        o("if (first) for (int c = 0; c < C; ++c) yp[c] = xp[c];")
        o("else for (int c = 0; c < C; ++c) yp[c] = xp[c] > yp[c] ? xp[c] : yp[c];")
        o("first = 0;")
        o.close().close()
        o(f"if (first) for (int c = 0; c < C; ++c) yp[c] = ({t})INT32_MIN;")
        o.close()

    def pool_element_int(self, s: Step, o: Source, kind: str):
        """Output (oh, ow, c) of an integer pool (``kind`` "max" or "avg"): the window's max, or
        its int32 sum requantized."""
        a = s.node.attrs
        o("int32_t acc = %s;" % ("INT32_MIN" if kind == "max" else "0"))
        o.open("for (int kh = 0; kh < KH; ++kh)")
        o("const int ih = oh * SH - PH + kh;")
        o("if ((unsigned)ih >= (unsigned)H) continue;  /* padding: -inf for max, 0 for the sum */")
        o.open("for (int kw = 0; kw < KW; ++kw)")
        o("const int iw = ow * SW - PW + kw;")
        o("if ((unsigned)iw >= (unsigned)W) continue;")
        o("const int32_t v = x0[(ih * W + iw) * C + c];")
        o("acc = v > acc ? v : acc;" if kind == "max" else "acc += v;")
        o.close().close()
        if kind == "max":
            o(f"y[(oh * OW + ow) * C + c] = ({self.buf(s.output).ctype})acc;")
        else:
            lo, hi = a["clamp"]
            M, S = int(s.node.params["multiplier"][0]), int(s.node.params["shift"][0])
            o(f"y[(oh * OW + ow) * C + c] = ({self.buf(s.output).ctype})nq_requantize(acc, {M}, {S}, {lo}, {hi});")

    def k_act(self, s: Step, o: Source):
        o(f"enum {{ N = {self.buf(s.output).elements} }};")
        with self.each_offset(o, "i", "N"):
            o(f"y[i] = {self.act_value(s, 'i')};")

    def act_value(self, s: Step, i: str) -> str:
        """Element ``i`` of integer act ``s``, clamped (a C expression)."""
        lo, hi = s.node.attrs["clamp"]
        return f"({self.buf(s.output).ctype})nq_clamp(x0[{i}], {lo}, {hi})"

    def k_dequantize(self, s: Step, o: Source):
        o(f"/* channels-last integers in, {self.buf(s.output).layout.upper()} float out */")
        with self.each_pixel(s, o):
            self.dequantize_pixel(s, o, "c", "i")

    def dequantize_pixel(self, s: Step, o: Source, c: str, i: str):
        """Channel ``c`` of pixel ``i`` of dequantize ``s``: q * scale in float32 (nq_dequantize)."""
        o(f"y[{self.pix_off(s.output, c, i)}] = nq_dequantize(x0[{self.pix_off(s.inputs[0], c, i)}], "
          f"{self.flt(s.node.scale)});")

    # --- float layers and lookup tables: one body per output element, shared with CUDA ----------
    # Each e_* method prints the statements that compute y[e], the output element at offset e of
    # the output buffer (in its layout), from x0, x1, ...: the C kernel loops e over the tensor, the
    # CUDA kernel runs one thread per e. Float32 throughout, no fused multiply-add (C:
    # -ffp-contract=off, CUDA: --fmad=false), so the IEEE basic operations (+, *, /, max, clamp)
    # round as torch's do; libm functions (expf, erff, tanhf) may differ from torch by an ulp.
    def is_element_step(self, s: Step) -> bool:
        """A lookup step, or a float layer other than the affine and the int <-> float conversions."""
        return s.kind == "lut" or (not s.node.quantized and s.kind not in ("affine", "dequantize", "quantize"))

    def float_label(self, s: Step) -> str:
        if s.kind == "lut":
            per = " per channel" if s.node.attrs["per_channel"] else ""
            out = "int8 out, bit-exact" if s.node.quantized else "float32 out, the reference's values"
            return f"lookup table of {LUT_SIZE} entries{per} for {' > '.join(s.node.attrs['fns'])} ({out})"
        what = s.node.attrs["fn"] if s.kind == "float" else s.kind
        exact = (s.kind in ("add", "act", "gather", "concat", "maxpool")
                 or (s.kind == "float" and s.node.attrs["fn"] in ("mul", "hardswish", "hardsigmoid", "leaky_relu")))
        return f"float32 {what}, one output element at a time" + (" (IEEE-exact operations)" if exact else "")

    def coords(self, o: Source, name: str, names=("c", "h", "w"), e: str = "e") -> tuple:
        """Declare the (channel, row, column) of element offset ``e`` of buffer ``name`` under
        ``names`` (a None name is not declared); returns the three expressions (a 1-D tensor: c, 0, 0)."""
        b = self.buf(name)
        ch, h, w = self.hwc(b.shape)
        if len(b.shape) == 1:
            if names[0]:
                o(f"const int {names[0]} = {e};")
            return names[0], "0", "0"
        if b.layout == "nchw":
            exprs = (f"{e} / {h * w}", f"({e} / {w}) % {h}", f"{e} % {w}")
        else:
            exprs = (f"{e} % {ch}", f"{e} / {w * ch}", f"({e} / {ch}) % {w}")
        decl = [f"{n} = {x}" for n, x in zip(names, exprs) if n]
        if decl:
            o("const int " + ", ".join(decl) + ";")
        return names

    def off(self, name: str, c: str, h: str = "0", w: str = "0") -> str:
        """Offset of element (c, h, w) in buffer ``name``, by its layout."""
        b = self.buf(name)
        ch, hh, ww = self.hwc(b.shape)
        if len(b.shape) == 1:
            return c
        if b.layout == "nchw":
            return f"(({c}) * {hh} + ({h})) * {ww} + ({w})"
        return f"(({h}) * {ww} + ({w})) * {ch} + ({c})"

    def same_index(self, s: Step, name: str) -> bool:
        """Whether input ``name`` holds element e of the output at offset e too (same shape and layout)."""
        a, b = self.buf(name), self.buf(s.output)
        return a.shape == b.shape and (a.layout == b.layout or len(a.shape) == 1)

    @staticmethod
    def flt(v: float) -> str:
        """A float32 literal, exact (hex)."""
        return float(np.float32(v)).hex() + "f"

    def clamp_expr(self, v: str, act) -> str:
        """``v`` clamped to a float activation's (lo, hi) (infinite bounds skipped), as torch.clamp."""
        if act is None:
            return v
        lo, hi = act
        if lo != -np.inf:
            v = f"fmaxf({v}, {self.flt(lo)})"
        if hi != np.inf:
            v = f"fminf({v}, {self.flt(hi)})"
        return v

    def element(self, s: Step, o: Source):
        """The statements computing y[e] of step ``s`` (see above)."""
        if s.kind == "lut":
            return self.e_lut(s, o)
        if s.kind == "float":
            fn = s.node.attrs["fn"]
            return self.unary(s, o) if fn in ELEMENTWISE_FNS else getattr(self, f"e_{fn}")(s, o)
        return getattr(self, f"e_{s.kind}")(s, o)

    def element_loop(self, s: Step, o: Source):
        o(f"enum {{ N = {self.buf(s.output).elements} }};")
        with self.each_offset(o, "e", "N"):
            self.element(s, o)

    def e_lut(self, s: Step, o: Source):
        """A chain of elementwise float ops on an 8-bit tensor, read from its table (program.lut_table)."""
        x = s.inputs[0]
        per = s.node.attrs["per_channel"]
        if self.same_index(s, x):
            idx = "e"
            if per:
                self.coords(o, s.output, ("c", None, None))
        else:
            idx = self.off(x, *self.coords(o, s.output))
        lo = s.node.attrs["lo"]
        row = f"c * {LUT_SIZE} + " if per else ""
        o(f"y[e] = {self.const_name(s, 'table')}[{row}(int)x0[{idx}] - ({lo})];  "
          f"/* {' > '.join(s.node.attrs['fns'])} */")

    UNARY = {
        "sigmoid": "1.0f / (1.0f + expf(-v))",
        "tanh": "tanhf(v)",
        "gelu": "v * 0.5f * (1.0f + erff(v * 0x1.6a09e6p-1f))",   # x * 0.5 * (1 + erf(x / sqrt(2))), as torch
        "silu": "v / (1.0f + expf(-v))",
        "hardswish": "v * fminf(fmaxf(v + 3.0f, 0.0f), 6.0f) / 6.0f",
        "hardsigmoid": "fminf(fmaxf(v + 3.0f, 0.0f), 6.0f) / 6.0f",
        "leaky_relu": "v > 0.0f ? v : v * {negative_slope}",
        "elu": "v > 0.0f ? v : expm1f(v) * {alpha}",
        "exp": "expf(v)",
    }
    UNARY_DEFAULTS = {"negative_slope": 0.01, "alpha": 1.0}

    def unary(self, s: Step, o: Source):
        fn = s.node.attrs["fn"]
        kw = {**self.UNARY_DEFAULTS, **s.node.attrs.get("kwargs", {})}
        x = s.inputs[0]
        idx = "e" if self.same_index(s, x) else self.off(x, *self.coords(o, s.output))
        o(f"const float v = x0[{idx}];")
        o(f"y[e] = {self.UNARY[fn].format(**{k: self.flt(v) for k, v in kw.items()})};  /* {fn} */")

    def _operands(self, s: Step, o: Source) -> list:
        """x_j[...] of output element e for each input (dimensions of size 1 broadcast)."""
        if all(self.same_index(s, x) for x in s.inputs):
            return [f"x{j}[e]" for j in range(len(s.inputs))]
        c, h, w = self.coords(o, s.output)
        out_shape = self.hwc(self.buf(s.output).shape)
        refs = []
        for j, x in enumerate(s.inputs):
            shape = self.hwc(self.buf(x).shape)
            ix = [v if n == m else "0" for v, n, m in zip((c, h, w), shape, out_shape)]
            refs.append(f"x{j}[{self.off(x, *ix)}]")
        return refs

    def e_mul(self, s: Step, o: Source):
        a, b = self._operands(s, o)
        o(f"y[e] = {a} * {b};")

    def e_add(self, s: Step, o: Source):
        o(f"const float v = {' + '.join(self._operands(s, o))};")
        o(f"y[e] = {self.clamp_expr('v', s.node.attrs.get('act'))};")

    def e_act(self, s: Step, o: Source):
        (v,) = self._operands(s, o)
        o(f"y[e] = {self.clamp_expr(v, s.node.attrs['act'])};")

    def e_gather(self, s: Step, o: Source):
        o(f"const int32_t t = {self.const_name(s, 'index')}[e];")
        o("y[e] = t < 0 ? 0.0f : x0[t];  /* -1: zero padding */")

    def e_concat(self, s: Step, o: Source):
        c, h, w = self.coords(o, s.output)
        start = 0
        for j, x in enumerate(s.inputs):
            cj = self.hwc(self.buf(x).shape)[0]
            cond = f"if ({c} < {start + cj}) " if j < len(s.inputs) - 1 else ""
            o(f"{'else ' if j else ''}{cond}y[e] = x{j}[{self.off(x, f'{c} - {start}', h, w)}];")
            start += cj

    def pool_element(self, s: Step, o: Source):
        a = s.node.attrs
        x = s.inputs[0]
        c, h, w = self.hwc(self.buf(x).shape)
        kh, kw = a["kernel"]
        oc, oh, ow = self.coords(o, s.output, ("c", "oh", "ow"))
        o(f"float acc = {'-INFINITY' if s.kind == 'maxpool' else '0.0f'};")
        o.open(f"for (int kh = 0; kh < {kh}; ++kh)")
        o(f"const int ih = {oh} * {a['stride'][0]} - {a['padding'][0]} + kh;")
        o(f"if ((unsigned)ih >= {h}u) continue;  /* padding: -inf for max, 0 for the sum */")
        o.open(f"for (int kw = 0; kw < {kw}; ++kw)")
        o(f"const int iw = {ow} * {a['stride'][1]} - {a['padding'][1]} + kw;")
        o(f"if ((unsigned)iw >= {w}u) continue;")
        o(f"const float v = x0[{self.off(x, oc, 'ih', 'iw')}];")
        o("acc = v > acc ? v : acc;" if s.kind == "maxpool" else "acc += v;")
        o.close().close()
        o("y[e] = acc;" if s.kind == "maxpool" else f"y[e] = acc / {float(kh * kw)!r}f;  /* count includes padding */")

    e_maxpool = e_avgpool = pool_element

    def e_conv(self, s: Step, o: Source):
        x = s.inputs[0]
        W, B = self.const_name(s, "w"), self.const_name(s, "bias")
        o(self.conv_enum(s))
        self.coords(o, s.output, ("o", "oh", "ow"))
        o("const int cg = (o / OG) * CG;")
        o("float acc = 0.0f;")
        self.open_taps(o)
        o(f"for (int k = 0; k < CG; ++k) acc += x0[{self.off(x, 'cg + k', 'ih', 'iw')}] * "
          f"{W}[((o * CG + k) * KH + kh) * KW + kw];")
        o.close().close()
        o(f"y[e] = {self.clamp_expr(f'acc + {B}[o]', s.node.attrs.get('act'))};")

    def e_linear(self, s: Step, o: Source):
        k = self.buf(s.inputs[0]).elements
        W, B = self.const_name(s, "w"), self.const_name(s, "bias")
        o("float acc = 0.0f;")
        o(f"for (int k = 0; k < {k}; ++k) acc += x0[k] * {W}[e * {k} + k];  /* weights in the input's layout */")
        o(f"y[e] = {self.clamp_expr(f'acc + {B}[e]', s.node.attrs.get('act'))};")

    def e_interpolate(self, s: Step, o: Source):
        """Bilinear (K = 2 taps per axis) or bicubic (K = 4) resampling from the tap tables of
        program.resample_taps, in torch's order: along W within each of the K source rows, then the
        rows weighted along H, each sum left to right."""
        x = s.inputs[0]
        k = s.plan.hidx.shape[1]
        c, oh, ow = self.coords(o, s.output, ("c", "oh", "ow"))
        hi, hw, wi, ww = (self.const_name(s, key) for key in ("hidx", "hwt", "widx", "wwt"))
        o(f"const int32_t *hi = {hi} + {oh} * {k}, *wi = {wi} + {ow} * {k};")
        o(f"const float *hw = {hw} + {oh} * {k}, *ww = {ww} + {ow} * {k};")
        rows = []
        for i in range(k):
            terms = [f"x0[{self.off(x, c, f'hi[{i}]', f'wi[{j}]')}] * ww[{j}]" for j in range(k)]
            o(f"const float r{i} = {' + '.join(terms)};")
            rows.append(f"r{i} * hw[{i}]")
        o(f"y[e] = {' + '.join(rows)};")

    def softmax_axis(self, s: Step) -> int:
        """The axis of (C, H, W) (or (C,)) that softmax reduces: torch's dim minus the batch."""
        dim = s.node.attrs.get("kwargs", {}).get("dim", 1)
        rank = len(self.buf(s.output).shape)
        return (dim if dim > 0 else dim + rank + 1) - 1

    def _softmax_row(self, s: Step, o: Source, whole_row: bool):
        """max and sum of exp over the reduced axis through output element e; then y[e] (CUDA) or
        the whole row (C: once per row, from the row's first element)."""
        x = s.inputs[0]
        ax = self.softmax_axis(s)
        n = self.hwc(self.buf(x).shape)[ax]
        c = self.coords(o, s.output)
        at = lambda v: tuple(v if i == ax else c[i] for i in range(3))  # noqa: E731
        if whole_row:
            o(f"if ({c[ax]} != 0) continue;  /* one row per first element */")
        o(f"float m = x0[{self.off(x, *at('0'))}], sum = 0.0f;")
        o(f"for (int j = 1; j < {n}; ++j) m = x0[{self.off(x, *at('j'))}] > m ? x0[{self.off(x, *at('j'))}] : m;")
        o(f"for (int j = 0; j < {n}; ++j) sum += expf(x0[{self.off(x, *at('j'))}] - m);")
        xj, xe = f"x0[{self.off(x, *at('j'))}]", f"x0[{self.off(x, *c)}]"
        if s.node.attrs["fn"] == "log_softmax":
            val = lambda v: f"({v} - m) - logf(sum)"  # noqa: E731  (torch: (x - max) - log(sum))
        else:
            val = lambda v: f"expf({v} - m) / sum"  # noqa: E731
        if whole_row:
            o(f"for (int j = 0; j < {n}; ++j) y[{self.off(s.output, *at('j'))}] = {val(xj)};")
        else:
            o(f"y[e] = {val(xe)};")

    def e_softmax(self, s: Step, o: Source):
        self._softmax_row(s, o, whole_row=False)

    e_log_softmax = e_softmax

    def softmax_rows(self, s: Step, o: Source):
        o(f"enum {{ N = {self.buf(s.output).elements} }};")
        o.open("for (int e = 0; e < N; ++e)")
        self._softmax_row(s, o, whole_row=True)
        o.close()

    def emit_kernel(self, s: Step, o: Source):
        """The body of step ``s``'s C function."""
        for line in c_int4.unpack_lines(self, s):   # 4-bit weights: the table unpacked for the kernel
            o(line)
        if s.kind == "float" and s.node.attrs["fn"] in ("softmax", "log_softmax"):
            self.softmax_rows(s, o)
        elif self.is_element_step(s):
            self.element_loop(s, o)
        else:
            self.kernels[s.kind](s, o)

    # --- files ----------------------------------------------------------------------------
    # constants only some conv paths use, guarded so that no build warns of an unused one
    SIMD_ONLY = ("wv", "ww", "biasv", "multv", "shiftv", "wa", "biasx", "rqv", "tv")

    def simd_tables(self, s: Step) -> dict:
        """{build macro: the tables of ``s`` its kernel there reads} for the conv path of this
        profile (conv_path): its weight layout, the multipliers, the bias of its input type, the
        shift tables of its requantization (the high-half ones where every shift allows them;
        AVX2 falls back to the scalar ones), and the portable kernel's under the negated macro
        (it reads the same weights)."""
        if s.kind != "conv" or not s.node.quantized:
            return {}
        path = self.conv_path(s)
        if path == "scalar":
            return {}
        if path == "dw":
            return {"": {"wd", "biasd", "multd", "shiftd"}}
        shifts = {"rqv", "tv"} if s.plan.hi_requant else {"shiftv"}
        w = self.WEIGHTS[path]
        fallback = {w, "bias", "mult", "shift"}
        if path == "vnni":
            fast = {w, "multv", "biasx" if s.plan.signed_input else "biasv"} | shifts
        elif path == "avx2":
            fast = {w, "biasv"} | ({"multv", "rqv", "tv"} if s.plan.hi_requant else {"mult", "shift"})
        else:   # AMX: the portable kernel runs too where Linux refuses the tiles
            fast = {w, "multv", "biasv"} | shifts
            return {"NQ_AMX": fast - fallback, "": fallback}
        return {self.MACRO[path]: fast, f"!{self.MACRO[path]}": fallback}

    def const_guard(self, s: Step, key: str):
        """The preprocessor condition under which constant ``key`` of ``s`` is used ("" always,
        None never: not printed)."""
        tables = self.simd_tables(s)
        if not tables:
            return None if key in self.SIMD_ONLY else ""
        used = [m for m, keys in tables.items() if key in keys]
        if not used:
            return None
        return "" if len(used) > 1 or "" in used else used[0]

    def const_attributes(self, s: Step, key: str) -> str:
        """What constant ``key`` of ``s`` declares after its name: the alignment of vector loads."""
        return "__attribute__((aligned(64)))" if key in self.SIMD_ONLY else ""

    def constants(self) -> str:
        """The constant tables the printed kernels read: those of BLOB_MIN_BYTES or more appended to
        ``self.blob`` (the binary weights file, 64-byte aligned, included by .incbin) and named by
        a macro; the small ones as C arrays under their build guard."""
        out = []
        for s in self.p.steps:
            for key, arr in self.step_consts(s).items():
                guard = self.const_guard(s, key)
                if guard is None:
                    continue
                name, arr = c_int4.stored(s, key, self.const_name(s, key), np.asarray(arr))  # 4-bit: two per byte
                ctype = CTYPE[arr.dtype]
                if arr.nbytes >= BLOB_MIN_BYTES:
                    data = arr.astype({"int32_t": np.int32, "float": np.float32}.get(ctype, arr.dtype)).tobytes()
                    self.blob += bytes(-len(self.blob) % 64)
                    self.blob_offsets[name] = len(self.blob)
                    out.append(self.blob_reference(name, ctype, len(self.blob), arr.size))
                    self.blob += data
                    continue
                text = c_array(ctype, name, arr, self.const_qualifier, self.const_attributes(s, key))
                out.append(f"#if {guard}\n{text}#endif\n" if guard else text)
        return "\n".join(out)

    def blob_reference(self, name: str, ctype: str, offset: int, size: int) -> str:
        """How the source names a table of the weights file: a pointer into the library's blob."""
        return f"#define {name} ((const {ctype} *)({self.p.name}_blob + {offset}))  /* {size} x {ctype} */"

    def blob_file(self) -> str:
        return f"{self.p.name}_weights.bin"

    def blob_decl(self) -> str:
        """The binary weights file as a read-only symbol of the library (GNU as .incbin, found in the
        compiler's working directory: the folder of the sources)."""
        n = self.p.name
        return f"""/* ---- the large constants: {len(self.blob):,} bytes in {self.blob_file()}, in the layouts the kernels read ---- */
__asm__(".section .rodata\\n\\t.balign 64\\n\\t.globl {n}_blob\\n\\t.hidden {n}_blob\\n{n}_blob:\\n\\t"
        ".incbin \\"{self.blob_file()}\\"\\n\\t.byte 0\\n\\t.previous");
extern const uint8_t {n}_blob[] __attribute__((visibility("hidden")));
"""

    def step_functions(self) -> str:
        return "".join(self.step_function_texts())

    def step_function_texts(self):
        """The step functions one at a time (the source is written as it is printed)."""
        for s in self.p.steps:
            o = Source()
            o(f"/* {s.node.name} = {s.kind}({', '.join(s.node.inputs)}) [{'+'.join(s.node.layers)}] */")
            if s.kind == "conv" and self.conv_path(s) in ("vnni", "avx2"):   # its item functions (nq_run)
                o(f"#if {self.MACRO[self.conv_path(s)]}")
                self.simd(s).prelude(s, o)
                o("#endif")
            elif s.kind == "conv" and self.conv_path(s) == "dw":
                self.dw_prelude(s, o)
            elif self.vector_linear(s):
                self.linear_prelude(s, o)
            elif self.vector_quantize(s):
                self.quantize_prelude(s, o)
            elif self.vector_maxpool(s):
                self.maxpool_prelude(s, o)
            o.open(self.signature(s))
            self.emit_kernel(s, o)
            o.close()
            o()
            yield o.text()

    def ptr(self, name: str, img: str = "") -> str:
        """The C pointer to buffer ``name`` of an image whose arguments carry the suffix ``img``
        (run_pair's "0" and "1": in0, out0, arena0)."""
        b = self.buf(name)
        if b.name == self.p.input:
            return f"in{img}"
        if b.name == self.p.output:
            return f"out{img}"
        return f"(({b.ctype} *)(arena{img} + {b.offset}))"

    def run_statements(self, img: str = "") -> list:
        """One image's forward pass as statements in order, each a list of C lines (``img``: the
        suffix of its arguments, as ptr). With ``qin`` (the int8-input entry point) the steps up to
        the input quantization are replaced by a copy: the first statement."""
        p = self.p
        call = lambda s: f"{self.fn_name(s)}({', '.join(self.ptr(i, img) for i in s.inputs)}, {self.ptr(s.output, img)});"
        k = next((i for i, s in enumerate(p.steps) if s.output == p.int_input), -1)
        out = []
        if p.int_input is None:
            out.append([f"(void)qin{img};  /* no int8-input entry point: the input feeds more than its quantization */"])
        else:
            qb = self.buf(p.int_input)
            c, h, w = self.hwc(qb.shape)
            out.append([f"if (qin{img}) {{",
                        f"    {qb.ctype} *q = {self.ptr(qb.name, img)};",
                        f"    for (int c = 0; c < {c}; ++c) for (int i = 0; i < {h * w}; ++i) "
                        f"q[i * {c} + c] = ({qb.ctype})qin{img}[c * {h * w} + i];  /* NCHW -> HWC */",
                        "} else {", *("    " + call(s) for s in p.steps[:k + 1]), "}"])
        for s in p.steps[k + 1:]:
            lines = [call(s)]
            if s.output == p.int_output:
                c, h, w = self.hwc(self.buf(s.output).shape)
                lines.append(f"if (int_out{img}) for (int c = 0; c < {c}; ++c) for (int i = 0; i < {h * w}; ++i) "
                             f"int_out{img}[c * {h * w} + i] = {self.ptr(s.output, img)}[i * {c} + c];")
            out.append(lines)
        return out

    def run_one(self) -> str:
        """The per-image function: every step in order on the thread's arena."""
        o = Source()
        o.open("static void run_one(const float *in, const int8_t *qin, float *out, int32_t *int_out, uint8_t *arena)")
        for lines in self.run_statements():
            for line in lines:
                o(line)
        o.close()
        return o.text()

    def pair_from(self) -> Optional[int]:
        """Where run_pair turns from one image after the other to step by step: the statement
        (of run_statements) from which the steps' constants outweigh their tensors most, or None
        where no tail of the network reads more constant than tensor bytes. At batch > 1 every
        image reads all the weights; a thread that runs each of these steps for two images in
        turn reads them once from memory for both (the second image finds them in its caches),
        while the steps before, whose tensors are the larger (ResNet's stem: 9 KB of weights,
        950 KB of tensors), run each image through in turn, keeping its tensors in the caches.
        Example: ResNet-18 turns at layer3's first conv (295 KB of weights, 150 KB of tensors),
        ResNet-50 at layer3's first 3x3 conv; ResNet-50 at batch 16 on two Zen 4 cores ran
        1.4-2.6% faster an image (interleaved medians)."""
        steps = self.p.steps
        first = next((i for i, s in enumerate(steps) if s.output == self.p.int_input), -1) + 1
        score, best, at = 0, 0, None
        for i in range(len(steps) - 1, first - 1, -1):
            s = steps[i]
            score += self.step_const_bytes(s) - sum(self.buf(n).nbytes for n in {*s.inputs, s.output})
            if score > best:
                best, at = score, i
        return None if at is None else at - first + 1   # statement 0 is the input (quantization or copy)

    def run_pair(self) -> str:
        """Two images on one thread (two arenas: the second allocated by the thread's first pair
        and kept for the thread's life, c_entry.c.in), step by step from pair_from() on; ""
        where pair_from() is None (the entry then runs every image alone)."""
        k = self.pair_from()
        if k is None:
            return ""
        o = Source()
        o("#define NQ_RUN_PAIR 1")
        o.open("static void run_pair(const float *in0, const int8_t *qin0, float *out0, int32_t *int_out0, uint8_t *arena0, "
               "const float *in1, const int8_t *qin1, float *out1, int32_t *int_out1, uint8_t *arena1)")
        a, b = self.run_statements("0"), self.run_statements("1")
        o("/* one image after the other: the steps whose tensors outweigh their constants */")
        for lines in a[:k] + b[:k]:
            for line in lines:
                o(line)
        o("/* step by step: each step's constants read once for both images */")
        for la, lb in zip(a[k:], b[k:]):
            for line in la + lb:
                o(line)
        o.close()
        return o.text()

    def device_entry_declaration(self) -> str:
        """Declarations the header adds after {name}_set_num_threads (the CUDA target's device entry point)."""
        return ""

    def header(self) -> str:
        p = self.p
        n = p.name
        in_c, in_h, in_w = self.hwc(self.buf(p.input).shape)
        return fill("c_header.h.in", header_comment=self.header_comment(), NET=n.upper(), net=n, in_c=in_c, in_h=in_h,
                    in_w=in_w, classes=p.classes, int_out=self.buf(p.int_output).elements,
                    device_entry=self.device_entry_declaration())

    def source(self) -> str:
        return "".join(self.source_chunks())

    def source_chunks(self):
        """The library source in pieces, in order (constants first: they fill ``self.blob``)."""
        p = self.p
        n = p.name
        in_size = self.buf(p.input).elements
        q_size = self.buf(p.int_input).elements if p.int_input else 0
        yield fill("c_prelude.c.in", header_comment=self.header_comment(), net=n, runtime_header=RUNTIME_HEADER,
                   extra_includes=self.extra_includes(), arena_bytes=max(p.arena_bytes, 64), in_size=in_size,
                   q_size=q_size, classes=p.classes, int_out=self.buf(p.int_output).elements)
        yield self.constants() + "\n"
        yield self.blob_decl()
        yield self.amx_runtime() + "\n"
        yield POOL_RUNTIME + "\n"
        yield self.simd_runtime() + "\n"
        yield c_int4.runtime(self)
        if any(s.kind == "conv" and self.conv_path(s) == "dw" for s in self.p.steps):
            yield "/* ---- depthwise convs: channels in vector lanes (c_conv_dw.py) ---- */\n"
            yield c_conv_dw.print_dw_kernel(self.dw_isa()) + "\n"
        yield "/* ---- kernels, one per layer, shapes fixed ---- */\n"
        yield from self.step_function_texts()
        yield "\n/* ---- one image ---- */\n"
        yield self.run_one() + "\n"
        yield self.run_pair() + "\n"
        yield fill("c_entry.c.in", net=n, kernels_expr=self.kernels_expr())

    def extra_includes(self) -> str:
        """Lines after the runtime header's #include (a subclass's own kernels and build macros)."""
        return ""

    def kernels_expr(self) -> str:
        """The C expression that {name}_kernels() returns."""
        return 'NQ_VNNI ? "avx512-vnni" : NQ_AVX2 ? "avx2" : "portable"'

    def simd_runtime(self) -> str:
        convs = [s for s in self.p.steps if s.kind == "conv" and self.conv_path(s) in ("vnni", "avx2")]
        staged = max([self.simd(s).staged_bytes(s) for s in convs],
                     default=0)
        if not convs:
            return ""
        return f"""#if NQ_VNNI || NQ_AVX2
/* the padded input of the register-tiled conv kernels, one per thread (c_conv_simd.py) */
static _Thread_local uint8_t nq_vpad[{-(-max(staged, 64) // 64) * 64}] __attribute__((aligned(64)));
#endif
"""

    def amx_runtime(self) -> str:
        pad, acc = self.amx_buffers()
        return fill("c_amx.c.in", pad=pad, acc=acc)

    def bench(self) -> str:
        n = self.p.name
        return fill("c_bench.c.in", header_comment=self.header_comment(), net=n, NET=n.upper())

    def makefile(self, cflags: str) -> str:
        n = self.p.name
        return fill("c_makefile.in", version=__version__, net=n, cflags=cflags, runtime_header=RUNTIME_HEADER)

    def write(self, folder, cflags: str) -> dict:
        """Write every file into ``folder`` (a pathlib.Path), the library source piece by piece as
        it is printed and the binary weights file after it; returns {file name: (lines, bytes)}.
        Each file is written atomically (a temporary file beside it, renamed at the end), so an
        interrupted generate leaves the old file or none under each name, never half a source."""

        n = self.p.name
        sizes = {}
        src = f"{n}{self.file_suffix}"
        lines = size = 0
        with atomic_write(folder / src, "w", encoding="utf-8") as f:
            for chunk in self.source_chunks():
                f.write(chunk)
                lines += chunk.count("\n")
                size += len(chunk.encode())
        sizes[src] = (lines, size)
        write_bytes(folder / self.blob_file(), bytes(self.blob))
        sizes[self.blob_file()] = (0, len(self.blob))
        runtime = runtime_text(RUNTIME_HEADER)
        for name, text in {f"{n}.h": self.header(), RUNTIME_HEADER: runtime, "main.c": self.bench(),
                           "Makefile": self.makefile(cflags)}.items():
            write_text(folder / name, text)
            sizes[name] = (text.count("\n"), len(text.encode()))
        return sizes

    def step_const_bytes(self, s: Step) -> int:
        """Bytes of the constants of step ``s`` that the source holds (the kernels printed read them)."""
        return sum(int(c_int4.stored(s, k, "", np.asarray(a))[1].nbytes) for k, a in self.step_consts(s).items()
                   if self.const_guard(s, k) is not None)

    def compiled_const_bytes(self) -> int:
        """Bytes of the constants the source holds (after ``write``): the weights file and the C arrays."""
        small = sum(int(arr.nbytes) for s in self.p.steps for k, a in self.step_consts(s).items()
                    if self.const_guard(s, k) is not None
                    for name, arr in [c_int4.stored(s, k, self.const_name(s, k), np.asarray(a))]
                    if name not in self.blob_offsets)
        return len(self.blob) + small

    def files(self, cflags: str) -> dict:
        n = self.p.name
        runtime = runtime_text(RUNTIME_HEADER)
        return {f"{n}.h": self.header(), f"{n}{self.file_suffix}": self.source(), RUNTIME_HEADER: runtime,
                "main.c": self.bench(), "Makefile": self.makefile(cflags)}
