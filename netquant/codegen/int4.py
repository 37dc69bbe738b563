"""4-bit weights in the generated C: stored two per byte, unpacked in registers or per layer.

A conv or linear layer with 4-bit weights (:func:`netquant.quant.int4.is_int4`) keeps its weight
table, in the layout of the kernel compiled ("w", "wv", "ww", "wa", "wd"; program.py and
c_conv_dw.py), packed two per byte (quant/int4.py: element 2i in the low nibble of byte i) under
the name ``<table>_p``, in the weights blob or as a C array. The weights at rest are never
unpacked as a whole. They reach the dot products two ways:

- **in registers** (the register tiles of c_conv_simd.py; :class:`PackedIsa` replaces a tile's
  one vector load of a weight vector by a few instructions):

  - AVX2: a vector of 16 int16 weights (8 output channels x 2 input channels) is 8 bytes, one per
    int32 lane: ``vpmovzxbd`` (8 bytes -> 8 dwords b), ``vpslld $12`` and ``vpor`` (b | b << 12:
    the low nibble at bits 0-3 of the low word, the high nibble at bits 0-3 of the high word),
    ``vpsllw $12`` and ``vpsraw $12`` (each word's nibble sign-extended to int16). Example: byte
    0xE3 (codes 3, -2) -> dword 0x000E_30E3 -> words (0x3000, 0xE000) -> (3, -2).
  - AVX-512 VNNI: a row of 64 int8 weights (16 output channels x 4 input channels) is 32 bytes:
    ``vpmovzxbw`` (32 bytes -> 32 words b), ``vpsllw $4`` (b << 4: the high nibble in bits 0-3 of
    the word's high byte), ``vpternlogd`` ((b | b << 4) & 0x0F0F: each byte's nibble, 0..15), and
    ``vpshufb`` through the table 0..7, -8..-1 (the nibble sign-extended to int8). Example: byte
    0xE3 -> word 0x00E3 -> 0x0E33 | ... & 0x0F0F = 0x0E03 -> bytes (3, -2). The mask and the table
    are two register operands more, so these tiles hold at most 22 accumulators, not 24.
- **per layer into a scratch buffer** (every other kernel: AMX, whose tiles load whole weight
  rows from memory, the depthwise kernels, the portable loops, fully connected layers, and the
  portable fallback of a build without the tiles' instruction set): the step's first statement
  unpacks its table into a per-thread scratch buffer of the largest such table (``nq_w4``) and a
  local pointer with the table's usual name points there, so the kernel itself is unchanged. The
  pointer is a local of the step function, hence shared by the threads of a row split (they
  read the calling thread's buffer).

The packing, the unpacking and both routes are checked bit for bit against the reference
executor in tests/test_int4.py: AVX2 and portable builds run on this project's machines; the
AVX-512 VNNI and AMX builds are compiled here (-march=icelake-server, sapphirerapids) and their
bit-exact test runs only on a CPU that has them.
CUDA has no 4-bit route: :func:`refuse_cuda` names the layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..quant import int4 as q4
from .c_conv_simd import AVX2, VNNI, SimdIsa
from .program import CodegenError, Program, Step

WEIGHT_TABLES = ("w", "wv", "ww", "wa", "wd")   # the weight tables of the kernels (the rest stay as they are)
UNPACK_FN = {np.dtype(np.int8): ("int8_t", "nq_unpack4_s8"), np.dtype(np.int16): ("int16_t", "nq_unpack4_s16")}


def packs(s: Step, key: str) -> bool:
    """Is constant ``key`` of step ``s`` a weight table stored two per byte?"""
    return key in WEIGHT_TABLES and q4.is_int4(s.node)


def packed_name(name: str) -> str:
    return f"{name}_p"


def stored(s: Step, key: str, name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """(C name, array) under which constant ``key`` of ``s`` is stored: a 4-bit layer's weight
    table packed two per byte (uint8) under ``<name>_p``; anything else as it is."""
    if packs(s, key):
        return packed_name(name), q4.pack(arr)
    return name, arr


def weight_table(pr, s: Step) -> str:
    """The weight table the kernels of step ``s`` read under printer ``pr``'s profile."""
    if s.kind == "linear":
        return "w"
    path = pr.conv_path(s)
    return "wd" if path == "dw" else pr.WEIGHTS[path]


def in_registers(pr, s: Step) -> bool:
    """Does the fast kernel of ``s`` unpack its 4-bit weights in registers (the AVX2 and VNNI tiles)?"""
    return s.kind == "conv" and pr.conv_path(s) in ("avx2", "vnni")


@dataclass(frozen=True)
class PackedIsa(SimdIsa):
    """An instruction set of the register tiles reading 4-bit weights packed two per byte: each
    weight vector is loaded and unpacked in registers (module docstring)."""

    @property
    def wbytes(self) -> int:
        return self.lanes * self.k // 2   # AVX2: 16 int16 weights -> 8 bytes; VNNI: 64 int8 -> 32

    def wname(self, name: str) -> str:
        return packed_name(name)

    def wload(self, off: int, reg: int) -> list:
        w = f"%%{self.reg}{reg}"
        if self.reg == "ymm":   # 8 bytes -> 8 lanes of two int16; the product register is free here
            t = f"%%{self.reg}{self.t_regs[1]}"
            return [f"vpmovzxbd {off}(%[w]), {w}", f"vpslld $12, {w}, {t}", f"vpor {t}, {w}, {w}",
                    f"vpsllw $12, {w}, {w}", f"vpsraw $12, {w}, {w}"]
        # 32 bytes -> 64 int8; a broadcast register is free before the tap's broadcasts
        t = f"%%{self.reg}{self.x_regs[0]}"
        return [f"vpmovzxbw {off}(%[w]), {w}", f"vpsllw $4, {w}, {t}", f"vpternlogd $0xA8, %[m], {t}, {w}",
                f"vpshufb {w}, %[l], {w}"]

    def wsetup(self) -> tuple[list, str]:
        if self.reg == "ymm":
            return [], ""
        return (["const __m512i nq4_m = _mm512_set1_epi8(0x0F), nq4_l = _mm512_broadcast_i32x4("
                 "_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1));  /* nibble -> int8 */"],
                ', [m] "v"(nq4_m), [l] "v"(nq4_l)')


# VNNI: two operands more (the mask and the table), so at most 22 accumulators (GCC's 30 operands)
AVX2_PACKED = PackedIsa(**{**asdict(AVX2), "label": "AVX2, 4-bit weights unpacked in registers"})
VNNI_PACKED = PackedIsa(**{**asdict(VNNI), "max_acc": 22, "label": "AVX-512 VNNI, 4-bit weights unpacked in registers"})


def simd_isa(s: Step, isa: SimdIsa) -> SimdIsa:
    """The register-tile instruction set for step ``s``: the packed variant for a 4-bit layer."""
    if not q4.is_int4(s.node):
        return isa
    return AVX2_PACKED if isa is AVX2 else VNNI_PACKED if isa is VNNI else isa


def unpack_lines(pr, s: Step) -> list:
    """The first lines of step ``s``'s function: its weight table unpacked into the scratch
    buffer, under the build condition where its kernels read the table unpacked (not where the
    AVX2 tiles unpack in registers); [] for a layer without 4-bit weights."""
    if not q4.is_int4(s.node):
        return []
    key = weight_table(pr, s)
    arr = np.asarray(pr.step_consts(s)[key])
    ctype, fn = UNPACK_FN[arr.dtype]
    name = pr.const_name(s, key)
    decl = (f"const {ctype} *const {name} = {fn}({packed_name(name)}, {arr.size});  "
            f"/* 4-bit weights, two per byte at rest: unpacked for this layer */")
    guard = "!" + pr.MACRO[pr.conv_path(s)] if in_registers(pr, s) else pr.const_guard(s, key)
    return [f"#if {guard}", decl, "#endif"] if guard else [decl]


def scratch_bytes(pr) -> int:
    """Bytes of the largest weight table unpacked into the scratch buffer (0: none)."""
    return max([np.asarray(pr.step_consts(s)[weight_table(pr, s)]).nbytes
                for s in pr.p.steps if q4.is_int4(s.node)], default=0)


def runtime(pr) -> str:
    """The scratch buffer and the unpacking functions, where the network has 4-bit layers."""
    size = scratch_bytes(pr)
    if not size:
        return ""
    return f"""/* ---- 4-bit weights (codegen/int4.py): tables two per byte, element 2i in the low nibble of
 * byte i; unpacked per layer into this thread's scratch buffer where a kernel reads them whole ---- */
static _Thread_local int8_t nq_w4[{-(-size // 64) * 64}] __attribute__((aligned(64), unused));
__attribute__((unused)) static const int8_t *nq_unpack4_s8(const uint8_t *p, long n) {{
    int8_t *d = nq_w4;
    for (long i = 0; i < n; ++i) d[i] = (int8_t)((((p[i >> 1] >> (4 * (i & 1))) & 15) ^ 8) - 8);
    return d;
}}
__attribute__((unused)) static const int16_t *nq_unpack4_s16(const uint8_t *p, long n) {{
    int16_t *d = (int16_t *)nq_w4;
    for (long i = 0; i < n; ++i) d[i] = (int16_t)((((p[i >> 1] >> (4 * (i & 1))) & 15) ^ 8) - 8);
    return d;
}}
"""


def label(pr, s: Step) -> str:
    """What the report adds to the kernel of ``s``: how its 4-bit weights are read."""
    if not q4.is_int4(s.node):
        return ""
    if in_registers(pr, s):
        return (f" (4-bit weights: unpacked in registers by the {'AVX2' if pr.conv_path(s) == 'avx2' else 'AVX-512 VNNI'}"
                f" tiles, per layer elsewhere)")
    return " (4-bit weights: unpacked per layer into a scratch buffer)"


def refuse_cuda(program: Program) -> None:
    """CUDA has no 4-bit weight route: a CodegenError naming the first 4-bit layer."""
    for s in program.steps:
        if q4.is_int4(s.node):
            raise CodegenError(f"layer {s.node.name}: 4-bit weights (weight_bits {q4.weight_bits(s.node)}) have no "
                               f"CUDA kernels; generate C (target='c'), or quantize this layer with 8-bit weights "
                               f"(QuantConfig overrides {{{s.node.name!r}: {{'weight_bits': 8}}}})")
