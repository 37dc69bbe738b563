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


_SIGNATURE = """(const void *x_, int H, int W, int C, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
        const int16_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift, int lo, int hi,
        void *y_, int OH, int OW, int oh0, int oh1, int in_signed, int out_signed)"""

_DOC = """/* {name}: depthwise conv (groups = C in = C out), netquant numerics (netquant_rt.h), bit-exact
 * with the reference executor. x: unpadded channels-last (H, W, C) uint8 (in_signed = 0) or
 * int8 (in_signed = 1); y: (OH, OW, C) uint8 or int8 (out_signed), output rows oh0..oh1-1
 * written (callers may split rows across threads). w: pack_dw(weight, "{isa}") (int16); bias,
 * mult, shift: int32 per channel, in channel order; lo, hi: the clamp (ReLU/ReLU6 folded in).
 * Taps in the zero padding read a block of zeros. Requires: {req}. */
"""

_COMMON_HELPERS = """static const uint8_t nq_dw_zero[64] __attribute__((aligned(64))) = {0};

/* the input pixel of tap (kh, kw) of output (oh, ow) at channel c, or zeros outside the image */
static inline __attribute__((always_inline)) const uint8_t *nq_dw_tap(const uint8_t *x, int H, int W, int C, int ih,
                                                                      int iw, int c) {
    return ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W) ? x + ((long)ih * W + iw) * C + c : nq_dw_zero;
}

/* [*owa, *owb): the output pixels of the row starting at input row ih0 whose taps all lie inside
 * the image (empty where a filter row is outside), read without bounds checks */
static inline void nq_dw_interior(int ih0, int H, int W, int KH, int KW, int SW, int PW, int DH, int DW, int OW,
                                  int *owa, int *owb) {
    if (ih0 < 0 || ih0 + (KH - 1) * DH >= H) {
        *owa = *owb = OW;
        return;
    }
    const int last = W - 1 + PW - (KW - 1) * DW;   /* ow * SW - PW + (KW - 1) * DW <= W - 1 */
    int b = last < 0 ? 0 : last / SW + 1, a = (PW + SW - 1) / SW;
    b = b < OW ? b : OW;
    *owa = a < b ? a : b;
    *owb = b;
}

/* the input pixel of a tap: checked, or (fast: an interior pixel) straight */
static inline __attribute__((always_inline)) const uint8_t *nq_dw_at(const uint8_t *x, int H, int W, int C, int ih,
                                                                     int iw, int c, const int fast) {
    return fast ? x + ((long)ih * W + iw) * C + c : nq_dw_tap(x, H, W, C, ih, iw, c);
}

/* 1 when every shift is in 33..62, so requantization can use the high half of acc * M in
 * 32-bit lanes (docs/NUMERICS.md, "Requantization from the high half") */
static inline int nq_dw_hi_form(const int32_t *shift, int C) {
    for (int c = 0; c < C; ++c)
        if (shift[c] < 33 || shift[c] > 62) return 0;
    return 1;
}
"""

_AVX512 = r"""
/* (acc * M + 2^(shift-1)) >> shift clamped to [lo, hi], 16 int32 lanes, 64-bit products: even
 * lanes directly (vpmuldq reads the low dword of each qword), odd lanes moved down. */
static inline __m512i nq_dw512_rq64(__m512i acc, __m512i M, __m512i S, int32_t lo, int32_t hi) {
    const __m512i one = _mm512_set1_epi64(1), low32 = _mm512_set1_epi64(0xffffffffLL);
    const __m512i vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
    const __m512i se = _mm512_and_si512(S, low32), so = _mm512_srli_epi64(S, 32);
    __m512i pe = _mm512_mul_epi32(acc, M);
    __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), _mm512_srli_epi64(M, 32));
    pe = _mm512_srav_epi64(_mm512_add_epi64(pe, _mm512_sllv_epi64(one, _mm512_sub_epi64(se, one))), se);
    po = _mm512_srav_epi64(_mm512_add_epi64(po, _mm512_sllv_epi64(one, _mm512_sub_epi64(so, one))), so);
    pe = _mm512_min_epi64(_mm512_max_epi64(pe, vlo), vhi);   /* may exceed int32 before the clamp */
    po = _mm512_min_epi64(_mm512_max_epi64(po, vlo), vhi);
    return _mm512_or_si512(_mm512_and_si512(pe, low32), _mm512_slli_epi64(po, 32));
}

/* The same integers when every shift is in 33..62: H = floor(acc * M / 2^32) (|H| <= 2^30),
 * then (H + R) >> T with T = shift - 32, R = 2^(T-1); clamped to [lo, hi] in 32 bits. */
static inline __m512i nq_dw512_rqhi(__m512i acc, __m512i M, __m512i R, __m512i T, __m512i vlo, __m512i vhi) {
    const __m512i pe = _mm512_mul_epi32(acc, M);
    const __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), _mm512_srli_epi64(M, 32));
    const __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
    return _mm512_min_epi32(_mm512_max_epi32(_mm512_srav_epi32(_mm512_add_epi32(h, R), T), vlo), vhi);
}

static inline __attribute__((always_inline)) __m512i nq_dw512_load(const uint8_t *p, __mmask32 m, int full,
                                                                    int in_signed) {
    const __m256i b = full ? _mm256_loadu_si256((const __m256i *)p)
                           : _mm512_castsi512_si256(_mm512_maskz_loadu_epi8((__mmask64)m, p));
    return in_signed ? _mm512_cvtepi8_epi16(b) : _mm512_cvtepu8_epi16(b);
}

static inline __attribute__((always_inline)) __m512i nq_dw512_dot(__m512i acc, __m512i x, __m512i w) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, x, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}

/* output pixel ow of one block of 32 channels (c .. c+31, lanes past C masked) */
static inline __attribute__((always_inline)) void nq_dw512_px(
        const uint8_t *x, int H, int W, int C, const int KH, const int KW, int SW, int PW, int DH, int DW,
        int ih0, const int16_t *wb, __m512i B0, __m512i B1, __m512i M0, __m512i M1, __m512i S0, __m512i S1,
        __m512i R0, __m512i R1, __m512i T0, __m512i T1, int hi_form, int lo, int hi, uint8_t *yr, int ow, int c,
        __mmask32 m, const int full, const int in_signed, const int fast) {
    const int T = KH * KW, NP = (T + 1) / 2;
    const int iw0 = ow * SW - PW;
    __m512i a0 = B0, a1 = B1;
    for (int p = 0; p < NP; ++p) {
        const int t0 = 2 * p, t1 = 2 * p + 1;
        const uint8_t *pa = nq_dw_at(x, H, W, C, ih0 + (t0 / KW) * DH, iw0 + (t0 % KW) * DW, c, fast);
        const uint8_t *pb = t1 < T ? nq_dw_at(x, H, W, C, ih0 + (t1 / KW) * DH, iw0 + (t1 % KW) * DW, c, fast)
                                   : nq_dw_zero;
        const __m512i xa = nq_dw512_load(pa, m, full, in_signed), xb = nq_dw512_load(pb, m, full, in_signed);
        a0 = nq_dw512_dot(a0, _mm512_unpacklo_epi16(xa, xb), _mm512_loadu_si512((const void *)(wb + 64 * p)));
        a1 = nq_dw512_dot(a1, _mm512_unpackhi_epi16(xa, xb), _mm512_loadu_si512((const void *)(wb + 64 * p + 32)));
    }
    __m512i q0, q1;
    if (hi_form) {
        const __m512i vlo = _mm512_set1_epi32(lo), vhi = _mm512_set1_epi32(hi);
        q0 = nq_dw512_rqhi(a0, M0, R0, T0, vlo, vhi);
        q1 = nq_dw512_rqhi(a1, M1, R1, T1, vlo, vhi);
    } else {
        q0 = nq_dw512_rq64(a0, M0, S0, lo, hi);
        q1 = nq_dw512_rq64(a1, M1, S1, lo, hi);
    }
    /* in range already: packs_epi32 puts channels back in order, vpmovwb keeps the low bytes */
    _mm512_mask_cvtepi16_storeu_epi8(yr + (long)ow * C + c, m, _mm512_packs_epi32(q0, q1));
}

/* one block of 32 channels for the output pixels of one row: the border pixels with checked
 * taps, the interior ones without */
static inline __attribute__((always_inline)) void nq_dw512_block(
        const uint8_t *x, int H, int W, int C, const int KH, const int KW, int SW, int PW, int DH, int DW,
        int ih0, const int16_t *wb, __m512i B0, __m512i B1, __m512i M0, __m512i M1, __m512i S0, __m512i S1,
        int hi_form, int lo, int hi, uint8_t *yr, int OW, int c, __mmask32 m, const int full, const int in_signed) {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i T0 = _mm512_sub_epi32(S0, _mm512_set1_epi32(32)), T1 = _mm512_sub_epi32(S1, _mm512_set1_epi32(32));
    const __m512i R0 = _mm512_sllv_epi32(one, _mm512_sub_epi32(T0, one)), R1 = _mm512_sllv_epi32(one, _mm512_sub_epi32(T1, one));
    int owa, owb, ow = 0;
    nq_dw_interior(ih0, H, W, KH, KW, SW, PW, DH, DW, OW, &owa, &owb);
#define NQ_DW512_PX(fast) nq_dw512_px(x, H, W, C, KH, KW, SW, PW, DH, DW, ih0, wb, B0, B1, M0, M1, S0, S1, R0, R1, \
                                      T0, T1, hi_form, lo, hi, yr, ow, c, m, full, in_signed, fast)
    for (; ow < owa; ++ow) NQ_DW512_PX(0);
    for (; ow < owb; ++ow) NQ_DW512_PX(1);
    for (; ow < OW; ++ow) NQ_DW512_PX(0);
#undef NQ_DW512_PX
}

static inline __attribute__((always_inline)) void nq_dw512_rows(
        const uint8_t *x, int H, int W, int C, const int KH, const int KW, int SH, int SW, int PH, int PW, int DH,
        int DW, const int16_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift, int lo, int hi,
        uint8_t *y, int OW, int oh0, int oh1, const int in_signed) {
    const int NP = (KH * KW + 1) / 2, CB = (C + 31) / 32;
    const int hi_form = nq_dw_hi_form(shift, C);
    /* lane d of the lo accumulator is channel 8*(d/4) + d%4 of the block; hi: that + 4 */
    const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(4));
    for (int oh = oh0; oh < oh1; ++oh) {
        uint8_t *yr = y + (long)oh * OW * C;
        for (int cb = 0; cb < CB; ++cb) {
            const int c = 32 * cb, n = C - c;
            const __mmask32 m = n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1);
            const __mmask16 m0 = (__mmask16)m, m1 = (__mmask16)(m >> 16);
            const __m512i b0 = _mm512_maskz_loadu_epi32(m0, bias + c), b1 = _mm512_maskz_loadu_epi32(m1, bias + c + 16);
            const __m512i M0 = _mm512_maskz_loadu_epi32(m0, mult + c), M1 = _mm512_maskz_loadu_epi32(m1, mult + c + 16);
            const __m512i S0 = _mm512_maskz_loadu_epi32(m0, shift + c), S1 = _mm512_maskz_loadu_epi32(m1, shift + c + 16);
            const int16_t *wb = w + (long)cb * NP * 64;
            if (n >= 32)
                nq_dw512_block(x, H, W, C, KH, KW, SW, PW, DH, DW, oh * SH - PH, wb,
                               _mm512_permutex2var_epi32(b0, i0, b1), _mm512_permutex2var_epi32(b0, i1, b1),
                               _mm512_permutex2var_epi32(M0, i0, M1), _mm512_permutex2var_epi32(M0, i1, M1),
                               _mm512_permutex2var_epi32(S0, i0, S1), _mm512_permutex2var_epi32(S0, i1, S1),
                               hi_form, lo, hi, yr, OW, c, m, 1, in_signed);
            else
                nq_dw512_block(x, H, W, C, KH, KW, SW, PW, DH, DW, oh * SH - PH, wb,
                               _mm512_permutex2var_epi32(b0, i0, b1), _mm512_permutex2var_epi32(b0, i1, b1),
                               _mm512_permutex2var_epi32(M0, i0, M1), _mm512_permutex2var_epi32(M0, i1, M1),
                               _mm512_permutex2var_epi32(S0, i0, S1), _mm512_permutex2var_epi32(S0, i1, S1),
                               hi_form, lo, hi, yr, OW, c, m, 0, in_signed);
        }
    }
}

"""

_AVX512_ENTRY = r""" {
    const uint8_t *x = (const uint8_t *)x_;
    uint8_t *y = (uint8_t *)y_;
    (void)OH; (void)out_signed;   /* the clamp already fits the output type: the low byte is the value */
    /* 3x3 and 5x5 with the taps unrolled; every other filter size with runtime tap loops */
    if (KH == 3 && KW == 3) {
        if (in_signed) nq_dw512_rows(x, H, W, C, 3, 3, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1);
        else nq_dw512_rows(x, H, W, C, 3, 3, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0);
    } else if (KH == 5 && KW == 5) {
        if (in_signed) nq_dw512_rows(x, H, W, C, 5, 5, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1);
        else nq_dw512_rows(x, H, W, C, 5, 5, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0);
    } else {
        if (in_signed) nq_dw512_rows(x, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1);
        else nq_dw512_rows(x, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0);
    }
}
"""

_AVX2 = r"""
/* arithmetic right shift of 64-bit lanes by 1..62 (AVX2 has only the logical one): with
 * u = v + 2^63 (flip the sign bit), floor(v / 2^s) = (u >> s) - 2^(63-s) */
static inline __m256i nq_dw256_sra64(__m256i v, __m256i s) {
    const __m256i sign = _mm256_set1_epi64x((long long)0x8000000000000000ULL), one = _mm256_set1_epi64x(1);
    return _mm256_sub_epi64(_mm256_srlv_epi64(_mm256_xor_si256(v, sign), s),
                            _mm256_sllv_epi64(one, _mm256_sub_epi64(_mm256_set1_epi64x(63), s)));
}

static inline __m256i nq_dw256_clamp64(__m256i v, __m256i vlo, __m256i vhi) {
    v = _mm256_blendv_epi8(v, vhi, _mm256_cmpgt_epi64(v, vhi));
    return _mm256_blendv_epi8(v, vlo, _mm256_cmpgt_epi64(vlo, v));
}

/* (acc * M + 2^(shift-1)) >> shift clamped to [lo, hi], 8 int32 lanes, 64-bit products */
static inline __m256i nq_dw256_rq64(__m256i acc, __m256i M, __m256i S, int32_t lo, int32_t hi) {
    const __m256i one = _mm256_set1_epi64x(1), low32 = _mm256_set1_epi64x(0xffffffffLL);
    const __m256i vlo = _mm256_set1_epi64x(lo), vhi = _mm256_set1_epi64x(hi);
    const __m256i se = _mm256_and_si256(S, low32), so = _mm256_srli_epi64(S, 32);
    __m256i pe = _mm256_mul_epi32(acc, M);
    __m256i po = _mm256_mul_epi32(_mm256_srli_epi64(acc, 32), _mm256_srli_epi64(M, 32));
    pe = nq_dw256_sra64(_mm256_add_epi64(pe, _mm256_sllv_epi64(one, _mm256_sub_epi64(se, one))), se);
    po = nq_dw256_sra64(_mm256_add_epi64(po, _mm256_sllv_epi64(one, _mm256_sub_epi64(so, one))), so);
    pe = nq_dw256_clamp64(pe, vlo, vhi);
    po = nq_dw256_clamp64(po, vlo, vhi);
    return _mm256_or_si256(_mm256_and_si256(pe, low32), _mm256_slli_epi64(po, 32));
}

/* the same integers when every shift is in 33..62 (see nq_dw512_rqhi) */
static inline __m256i nq_dw256_rqhi(__m256i acc, __m256i M, __m256i R, __m256i T, __m256i vlo, __m256i vhi) {
    const __m256i pe = _mm256_mul_epi32(acc, M);
    const __m256i po = _mm256_mul_epi32(_mm256_srli_epi64(acc, 32), _mm256_srli_epi64(M, 32));
    const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_srav_epi32(_mm256_add_epi32(h, R), T), vlo), vhi);
}

static inline __attribute__((always_inline)) __m256i nq_dw256_load(const uint8_t *p, int in_signed) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return in_signed ? _mm256_cvtepi8_epi16(b) : _mm256_cvtepu8_epi16(b);
}

/* output pixel ow of one block of 16 channels */
static inline __attribute__((always_inline)) void nq_dw256_px(
        const uint8_t *x, int H, int W, int C, const int KH, const int KW, int SW, int PW, int DH, int DW,
        int ih0, const int16_t *wb, __m256i B0, __m256i B1, __m256i M0, __m256i M1, __m256i S0, __m256i S1,
        __m256i R0, __m256i R1, __m256i T0, __m256i T1, int hi_form, int lo, int hi, uint8_t *yr, int ow, int c,
        const int in_signed, const int out_signed, const int fast) {
    const int T = KH * KW, NP = (T + 1) / 2;
    const int iw0 = ow * SW - PW;
    __m256i a0 = B0, a1 = B1;
    for (int p = 0; p < NP; ++p) {
        const int t0 = 2 * p, t1 = 2 * p + 1;
        const uint8_t *pa = nq_dw_at(x, H, W, C, ih0 + (t0 / KW) * DH, iw0 + (t0 % KW) * DW, c, fast);
        const uint8_t *pb = t1 < T ? nq_dw_at(x, H, W, C, ih0 + (t1 / KW) * DH, iw0 + (t1 % KW) * DW, c, fast)
                                   : nq_dw_zero;
        const __m256i xa = nq_dw256_load(pa, in_signed), xb = nq_dw256_load(pb, in_signed);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_unpacklo_epi16(xa, xb),
                                                     _mm256_loadu_si256((const __m256i *)(wb + 32 * p))));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_unpackhi_epi16(xa, xb),
                                                     _mm256_loadu_si256((const __m256i *)(wb + 32 * p + 16))));
    }
    __m256i q0, q1;
    if (hi_form) {
        const __m256i vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi);
        q0 = nq_dw256_rqhi(a0, M0, R0, T0, vlo, vhi);
        q1 = nq_dw256_rqhi(a1, M1, R1, T1, vlo, vhi);
    } else {
        q0 = nq_dw256_rq64(a0, M0, S0, lo, hi);
        q1 = nq_dw256_rq64(a1, M1, S1, lo, hi);
    }
    /* packs_epi32 puts channels back in order (in range already: exact) */
    const __m256i q = _mm256_packs_epi32(q0, q1);
    const __m128i l = _mm256_castsi256_si128(q), u = _mm256_extracti128_si256(q, 1);
    _mm_storeu_si128((__m128i *)(yr + (long)ow * C + c), out_signed ? _mm_packs_epi16(l, u) : _mm_packus_epi16(l, u));
}

static inline __attribute__((always_inline)) void nq_dw256_rows(
        const uint8_t *x, int H, int W, int C, const int KH, const int KW, int SH, int SW, int PH, int PW, int DH,
        int DW, const int16_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift, int lo, int hi,
        uint8_t *y, int OW, int oh0, int oh1, const int in_signed, const int out_signed) {
    const int T = KH * KW, NP = (T + 1) / 2, CV = C / 16 * 16;
    const int hi_form = nq_dw_hi_form(shift, C);
    const __m256i one = _mm256_set1_epi32(1);
    for (int oh = oh0; oh < oh1; ++oh) {
        const int ih0 = oh * SH - PH;
        uint8_t *yr = y + (long)oh * OW * C;
        for (int c = 0; c < CV; c += 16) {
            /* lane d of the lo accumulator is channel 8*(d/4) + d%4 of the block; hi: that + 4 */
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(bias + c)), b1 = _mm256_loadu_si256((const __m256i *)(bias + c + 8));
            const __m256i m0 = _mm256_loadu_si256((const __m256i *)(mult + c)), m1 = _mm256_loadu_si256((const __m256i *)(mult + c + 8));
            const __m256i s0 = _mm256_loadu_si256((const __m256i *)(shift + c)), s1 = _mm256_loadu_si256((const __m256i *)(shift + c + 8));
            const __m256i B0 = _mm256_permute2x128_si256(b0, b1, 0x20), B1 = _mm256_permute2x128_si256(b0, b1, 0x31);
            const __m256i M0 = _mm256_permute2x128_si256(m0, m1, 0x20), M1 = _mm256_permute2x128_si256(m0, m1, 0x31);
            const __m256i S0 = _mm256_permute2x128_si256(s0, s1, 0x20), S1 = _mm256_permute2x128_si256(s0, s1, 0x31);
            const __m256i T0 = _mm256_sub_epi32(S0, _mm256_set1_epi32(32)), T1 = _mm256_sub_epi32(S1, _mm256_set1_epi32(32));
            const __m256i R0 = _mm256_sllv_epi32(one, _mm256_sub_epi32(T0, one)), R1 = _mm256_sllv_epi32(one, _mm256_sub_epi32(T1, one));
            const int16_t *wb = w + (long)(c / 16) * NP * 32;
            int owa, owb, ow = 0;
            nq_dw_interior(ih0, H, W, KH, KW, SW, PW, DH, DW, OW, &owa, &owb);
#define NQ_DW256_PX(fast) nq_dw256_px(x, H, W, C, KH, KW, SW, PW, DH, DW, ih0, wb, B0, B1, M0, M1, S0, S1, R0, R1, \
                                      T0, T1, hi_form, lo, hi, yr, ow, c, in_signed, out_signed, fast)
            for (; ow < owa; ++ow) NQ_DW256_PX(0);
            for (; ow < owb; ++ow) NQ_DW256_PX(1);
            for (; ow < OW; ++ow) NQ_DW256_PX(0);
#undef NQ_DW256_PX
        }
        if (CV == C) continue;
        /* the last C % 16 channels in scalar C, from the same packed weights: channel j of a
         * block sits in half (j % 8) / 4, dword 4 * (j / 8) + j % 4 of each tap pair */
        const int16_t *wt = w + (long)(CV / 16) * NP * 32;
        for (int ow = 0; ow < OW; ++ow) {
            const int iw0 = ow * SW - PW;
            for (int c = CV; c < C; ++c) {
                const int j = c - CV;
                const int16_t *wc = wt + ((j % 8) / 4) * 16 + 2 * (4 * (j / 8) + j % 4);
                int32_t acc = bias[c];
                for (int t = 0; t < T; ++t) {
                    const uint8_t *p = nq_dw_tap(x, H, W, C, ih0 + (t / KW) * DH, iw0 + (t % KW) * DW, c);
                    acc += (in_signed ? (int32_t)(int8_t)*p : (int32_t)*p) * (int32_t)wc[32 * (t / 2) + t % 2];
                }
                const int32_t q = nq_requantize(acc, mult[c], shift[c], lo, hi);
                yr[(long)ow * C + c] = out_signed ? (uint8_t)(int8_t)q : (uint8_t)q;
            }
        }
    }
}

"""

_AVX2_ENTRY = r""" {
    const uint8_t *x = (const uint8_t *)x_;
    uint8_t *y = (uint8_t *)y_;
    (void)OH;
    /* 3x3 and 5x5 with the taps unrolled; every other filter size with runtime tap loops */
    if (KH == 3 && KW == 3) {
        if (in_signed) nq_dw256_rows(x, H, W, C, 3, 3, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1, out_signed);
        else nq_dw256_rows(x, H, W, C, 3, 3, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0, out_signed);
    } else if (KH == 5 && KW == 5) {
        if (in_signed) nq_dw256_rows(x, H, W, C, 5, 5, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1, out_signed);
        else nq_dw256_rows(x, H, W, C, 5, 5, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0, out_signed);
    } else {
        if (in_signed) nq_dw256_rows(x, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 1, out_signed);
        else nq_dw256_rows(x, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, w, bias, mult, shift, lo, hi, y, OW, oh0, oh1, 0, out_signed);
    }
}
"""

_REQUIRES = {"avx512": "AVX-512F and BW (vpdpwssd where built with AVX-512 VNNI)",
             "avx2": "AVX2; netquant_rt.h included before (nq_requantize for the tail channels)"}


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
    helpers, entry = (_AVX512, _AVX512_ENTRY) if isa == "avx512" else (_AVX2, _AVX2_ENTRY)
    macro = "NQ_DW_AVX512" if isa == "avx512" else "NQ_DW_AVX2"
    return "".join([
        f"#if {guard(isa)}\n#include <immintrin.h>\n#define {macro} 1\n",
        "#if !defined(NQ_DW_HELPERS)  /* shared by both ISAs' strings in one file */\n#define NQ_DW_HELPERS 1\n",
        _COMMON_HELPERS, "#endif\n", helpers, "\n",
        _DOC.format(name=fn_name(isa), isa=isa, req=_REQUIRES[isa]),
        f"static void __attribute__((unused)) {fn_name(isa)}{_SIGNATURE}", entry,
        f"#else\n#define {macro} 0\n#endif\n"])
