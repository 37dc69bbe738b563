"""Depthwise convolutions for the C target: channels in vector lanes, one kernel per ISA.

A depthwise conv (groups = C_in = C_out = C) computes, for every output pixel and channel c,

    acc[c] = bias[c] + sum_{kh, kw} x[ih, iw, c] * w[c, kh, kw],   ih = oh*SH - PH + kh*DH, ...

then ``nq_requantize(acc, M[c], shift[c], lo, hi)`` (docs/NUMERICS.md). Nothing is reduced
across channels, so the channels of one pixel sit in the lanes of a vector and the filter taps
are the reduction. Each tap's 8-bit channels are widened to int16 (zero-extended for uint8,
sign-extended for int8: no +128 offset, no bias correction) and the taps are taken in pairs:
``unpacklo/hi_epi16(x[tap a], x[tap b])`` gives (x_a[c], x_b[c]) int16 pairs, and one
vpdpwssd (AVX-512 VNNI; vpmaddwd + vpaddd without VNNI and on AVX2) adds x_a*w_a + x_b*w_b to the
int32 accumulator of channel c. Each product is at most 255 * 127 = 32385 in magnitude, and the
sum is exact int32 because lowering bounds |acc| < 2^31.

The unpacks work within 128-bit lanes, so the accumulators hold the channels permuted: the
"lo" vector's dword d is channel 8*(d/4) + d%4 of the block, the "hi" vector's is that + 4.
``pack_dw`` lays the weights out in that order, the kernel permutes bias, multiplier and shift
the same way, and ``packs_epi32(lo, hi)`` puts the requantized int16 back in channel order
(the pack joins the two vectors 128-bit lane by 128-bit lane: lane l gets channels 8l..8l+7).

=========  ==========================================  ==========================================
ISA        ``"avx512"`` (AVX-512F+BW, VNNI if built)    ``"avx2"``
=========  ==========================================  ==========================================
block      32 channels: two zmm of 16 int32             16 channels: two ymm of 8 int32
weights    int16 [CB][NP][2][32]                        int16 [CB][NP][2][16]
tail       masked loads and stores (any C)              C % 16 channels in scalar C (same weights)
requant    high half of acc*M in 32-bit lanes when every shift is in 33..62 (checked per call),
           else 64-bit lanes: (acc*M + 2^(shift-1)) >> shift, clamped in 64 bits
=========  ==========================================  ==========================================

(CB = ceil(C / block), NP = ceil(KH*KW / 2) tap pairs; the last pair of an odd tap count has
zero weights for its second tap.) Example: a 3x3 conv over C = 96 on AVX-512: CB = 3, NP = 5,
so per output pixel 3 blocks x (9 widening loads + 10 unpacks + 10 vpdpwssd).

Loops: output rows (a range, so callers can split rows across threads) -> channel blocks ->
output pixels of the row -> tap pairs. The code size depends only on the shape class: 3x3 and
5x5 filters get an instantiation with the taps unrolled, every other filter size runs the
same body with runtime tap loops; strides, padding, dilation and sizes are runtime arguments.
The input is read unpadded (channels-last H x W x C, as the buffer plan stores it): a tap
outside the image reads a static block of zeros (real 0 is integer 0 in both 8-bit types); the
border pixels of a row check their taps, the interior ones read at fixed offsets.

``dw_call`` prints the call for one layer. Not served here, so they stay on the portable C path
of ``CPrinter.k_conv_scalar``: grouped convs with 2..8 channels per group (ResNeXt, RegNet) and
depthwise convs with a channel multiplier (C_out = k * C_in). A grouped conv with G = CG = OG
could reuse this kernel as a depthwise conv over (2G - 1) * KH * KW taps at channel offsets
-(G-1)..G-1 (weight 0 where the offset leaves the group), at (2G - 1) / G times the work.
"""
from __future__ import annotations

import numpy as np

from ..quant.numerics import INT8
from .runtime_files import runtime_text

DW_ISAS = ("avx512", "avx2")
BLOCK = {"avx512": 32, "avx2": 16}    # channels per block (two vectors of int32 lanes)


def dw_eligible(op: str, groups: int, in_channels: int, out_channels: int, in_dtype: str, quantized: bool) -> bool:
    """Whether the kernels of this module serve a conv: quantized, depthwise with channel
    multiplier 1 (groups = C_in = C_out) and 8-bit input. Example: MobileNetV2's 3x3
    ``groups=hidden_dim`` convs over the uint8 ReLU6 output are eligible; a ResNeXt conv with
    groups=32 over 128 channels (4 per group) is not."""
    return (op == "conv" and quantized and groups > 1 and groups == in_channels == out_channels
            and in_dtype in ("uint8", "int8"))


def _lane_channels(block: int) -> np.ndarray:
    """(2, block/2): the channel (within a block) of each int32 lane of the lo and hi
    accumulators. Example, AVX2 (block 16): lo = [0, 1, 2, 3, 8, 9, 10, 11], hi = [4..7, 12..15]."""
    d = np.arange(block // 2)
    lo = 8 * (d // 4) + d % 4
    return np.stack([lo, lo + 4])


def pack_dw(weight_q: np.ndarray, isa: str) -> np.ndarray:
    """Depthwise weights (C, 1, KH, KW) int8 -> int16 [CB][NP][2][block] in the order the
    kernel of ``isa`` reads them: element [cb][p][h][2*d + j] is w[c, t] with channel
    c = block*cb + lanes[h][d] (``_lane_channels``) and tap t = 2*p + j (t = kh*KW + kw);
    channels past C and the tap past an odd KH*KW are 0.

    Example (avx2, C = 16, 3x3): shape (1, 5, 2, 16); element [0][0][1][3] is h = 1 (the hi
    accumulator), d = 1 (channel 4 + 1 = 5), j = 1 (tap 1 = (kh 0, kw 1)): w[5, 0, 0, 1]."""
    if isa not in BLOCK:
        raise ValueError(f"pack_dw: unknown isa {isa!r}; expected one of {', '.join(DW_ISAS)}")
    w = np.asarray(weight_q)
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"pack_dw: expected depthwise weights of shape (C, 1, KH, KW), got {w.shape}")
    if w.dtype.kind not in "iu" or w.size and (w.min() < INT8[0] or w.max() > INT8[1]):
        raise ValueError(f"pack_dw: expected int8 weights, got dtype {w.dtype} with range "
                         f"{w.min() if w.size else 0}..{w.max() if w.size else 0}")
    c, _, kh, kw = w.shape
    blk = BLOCK[isa]
    cb, t = -(-c // blk), kh * kw
    np_ = -(-t // 2)
    taps = np.zeros((cb * blk, 2 * np_), np.int16)
    taps[:c, :t] = w.reshape(c, t)
    lanes = _lane_channels(blk)                                   # (2, blk/2)
    # (CB*blk, NP*2) -> (CB, blk, NP, 2) -> gather lanes -> (CB, 2 h, blk/2 d, NP, 2 j) -> (CB, NP, h, d, j)
    per_block = taps.reshape(cb, blk, np_, 2)[:, lanes]
    return np.ascontiguousarray(per_block.transpose(0, 3, 1, 2, 4).reshape(cb, np_, 2, blk))


def fn_name(isa: str) -> str:
    """The C function that ``print_dw_kernel(isa)`` defines."""
    return f"nq_dw_conv_{isa}"


def guard(isa: str) -> str:
    """The preprocessor condition under which ``print_dw_kernel(isa)`` defines its function
    (it then also defines the macro NQ_DW_AVX512 or NQ_DW_AVX2 to 1)."""
    return {"avx512": "defined(__AVX512F__) && defined(__AVX512BW__) && !defined(NQ_NO_SIMD)",
            "avx2": "defined(__AVX2__) && !defined(NQ_NO_SIMD)"}[isa]


def dw_call(isa: str, node, in_shape: tuple, out_shape: tuple, in_dtype: str, out_dtype: str, x: str, y: str,
            w: str, bias: str, mult: str, shift: str, rows: tuple = ("0", None)) -> str:
    """The C statement that runs depthwise conv ``node`` (a quantized QNode: attrs stride, padding,
    dilation, clamp; params weight (C, 1, KH, KW)) with the kernel of ``isa``. ``in_shape`` and
    ``out_shape`` are (C, H, W); ``x``, ``y`` and the constant tables ``w`` (``pack_dw(weight,
    isa)``), ``bias``, ``mult``, ``shift`` (int32 per channel) are C expressions; ``rows`` the
    output rows (oh0, oh1) as C expressions (None: OH), e.g. a thread's share.
    Example: ``nq_dw_conv_avx512(x0, 56, 56, 144, 3, 3, 1, 1, 1, 1, 1, 1, k_w, k_b, k_m, k_s, 0, 255,
    y, 56, 56, 0, 56, 0, 0);``"""
    a = node.attrs
    c, h, wd = in_shape
    oc, oh, ow = out_shape
    kh, kw = node.params["weight"].shape[2:]
    if not dw_eligible(node.op, a["groups"], c, oc, in_dtype, node.quantized):
        raise ValueError(f"dw_call: layer {node.name!r} is not a depthwise conv over 8-bit input "
                         f"(groups {a['groups']}, channels {c} -> {oc}, input {in_dtype})")
    if out_dtype not in ("uint8", "int8"):
        raise ValueError(f"dw_call: layer {node.name!r}: expected a uint8 or int8 output, got {out_dtype}")
    lo, hi = a["clamp"]
    r0, r1 = rows[0], oh if rows[1] is None else rows[1]
    return (f"{fn_name(isa)}({x}, {h}, {wd}, {c}, {kh}, {kw}, {a['stride'][0]}, {a['stride'][1]}, "
            f"{a['padding'][0]}, {a['padding'][1]}, {a['dilation'][0]}, {a['dilation'][1]}, {w}, {bias}, {mult}, "
            f"{shift}, {lo}, {hi}, {y}, {oh}, {ow}, {r0}, {r1}, {int(in_dtype == 'int8')}, "
            f"{int(out_dtype == 'int8')});")


def print_dw_kernel(isa: str) -> str:
    """C source that defines ``fn_name(isa)`` (a static function, guarded by ``guard(isa)``, which
    also defines NQ_DW_AVX512 / NQ_DW_AVX2 to 1) and its static helpers. Include it after
    <stdint.h> and netquant_rt.h; it includes <immintrin.h> itself. Both ISAs' strings may be
    printed into one file (the shared helpers are defined once). Signature:

        void nq_dw_conv_<isa>(const void *x, int H, int W, int C, int KH, int KW, int SH, int SW,
                              int PH, int PW, int DH, int DW, const int16_t *w, const int32_t *bias,
                              const int32_t *mult, const int32_t *shift, int lo, int hi, void *y,
                              int OH, int OW, int oh0, int oh1, int in_signed, int out_signed)
    """
    if isa not in BLOCK:
        raise ValueError(f"print_dw_kernel: unknown isa {isa!r}; expected one of {', '.join(DW_ISAS)}")
    macro = "NQ_DW_AVX512" if isa == "avx512" else "NQ_DW_AVX2"
    # the kernels are static C in netquant/codegen/runtime: dw_common.c (both ISAs), dw_<isa>.c
    # (the ISA's helpers) and dw_<isa>_entry.c (the documented entry point)
    return "".join([
        f"#if {guard(isa)}\n#include <immintrin.h>\n#define {macro} 1\n",
        "#if !defined(NQ_DW_HELPERS)  /* shared by both ISAs' strings in one file */\n#define NQ_DW_HELPERS 1\n",
        runtime_text("dw_common.c"), "#endif\n", runtime_text(f"dw_{isa}.c"), "\n",
        runtime_text(f"dw_{isa}_entry.c"), f"#else\n#define {macro} 0\n#endif\n"])
