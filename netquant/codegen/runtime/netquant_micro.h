/* netquant micro runtime: the convolution of the Cortex-M target (netquant/codegen/micro.py).
 * Copied verbatim next to every generated micro network. C99, no heap, no libm, no OpenMP.
 *
 * One function serves every ungrouped conv over 8-bit channels-last input, its shapes and
 * constants in a const nq_conv (flash). Integer arithmetic is netquant_rt.h's (docs/NUMERICS.md):
 * acc = bias + sum x * w (exact int32), nq_requantize, then, where the graph's residual add was
 * fused into the conv, the add of netquant_rt.h's terms (nq_rounding_shift of the two int64
 * products, nq_clamp) on the requantized value and the skip element at the same position,
 * written over the skip (it is read once, just before): the add needs no buffer of its own.
 *
 * Kernels, picked by the compiler's target:
 *   MVE (Helium, Cortex-M55, __ARM_FEATURE_MVE): 8 int16 lanes, vmladavaq_s16, 2 pixels x 2 outputs;
 *   DSP (Cortex-M4/M7/M33, __ARM_FEATURE_DSP): SMLAD dual 16-bit MACs, 2 pixels x 2 outputs, as CMSIS-NN;
 *   portable C otherwise (or with -DNQ_NO_SIMD).
 * Both SIMD kernels first copy the KH*KW*C inputs of two output pixels into a small int16 column
 * buffer (zeros for the padding) in the arena; the portable one reads the input in place. */
#ifndef NETQUANT_MICRO_H
#define NETQUANT_MICRO_H

#include <stdint.h>
#include <string.h>
#include "netquant_rt.h"

#if !defined(NQ_NO_SIMD) && defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#define NQ_MICRO_MVE 1
#include <arm_mve.h>
#else
#define NQ_MICRO_MVE 0
#endif
#if !NQ_MICRO_MVE && !defined(NQ_NO_SIMD) && defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#define NQ_MICRO_DSP 1
#include <arm_acle.h>
#else
#define NQ_MICRO_DSP 0
#endif

typedef struct {
    int16_t C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
    uint8_t x_signed, y_signed;     /* int8 (1) or uint8 (0) input and output */
    int32_t lo, hi;                 /* the conv's clamp */
    const int8_t *w;                /* (O, KH, KW, C) int8, exactly the network's weights */
    const int32_t *bias, *mult, *shift;
    /* fused residual add: y = clamp((conv * m_conv + skip * m_skip + 2^(s-1)) >> s, add_lo, add_hi) */
    uint8_t add, skip_signed;
    int32_t m_conv, m_skip, add_shift, add_lo, add_hi;
} nq_conv;

/* element i of an 8-bit tensor, signed or not */
static inline int32_t nq_at(const void *p, uint8_t is_signed, long i) {
    return is_signed ? (int32_t)((const int8_t *)p)[i] : (int32_t)((const uint8_t *)p)[i];
}

/* requantize one accumulator of output channel o and store it at y[i] (after the fused add) */
static inline void nq_conv_store(const nq_conv *k, int32_t acc, int o, const void *skip, void *y, long i) {
    int32_t v = nq_requantize(acc, k->mult[o], k->shift[o], k->lo, k->hi);
    if (k->add) {
        const int64_t s = (int64_t)v * k->m_conv + (int64_t)nq_at(skip, k->skip_signed, i) * k->m_skip;
        v = nq_clamp(nq_rounding_shift(s, k->add_shift), k->add_lo, k->add_hi);
    }
    ((uint8_t *)y)[i] = (uint8_t)v;   /* in range: its low byte, int8 or uint8 */
}

/* the portable kernel: one output at a time, padding taps skipped */
static inline void nq_conv_portable(const nq_conv *k, const void *x, const void *skip, void *y) {
    const int C = k->C, K = k->KH * k->KW * C;
    for (int oh = 0; oh < k->OH; ++oh)
        for (int ow = 0; ow < k->OW; ++ow)
            for (int o = 0; o < k->O; ++o) {
                int32_t acc = k->bias[o];
                const int8_t *wo = k->w + (long)o * K;
                for (int kh = 0; kh < k->KH; ++kh) {
                    const int ih = oh * k->SH - k->PH + kh * k->DH;
                    if ((unsigned)ih >= (unsigned)k->H) continue;
                    for (int kw = 0; kw < k->KW; ++kw) {
                        const int iw = ow * k->SW - k->PW + kw * k->DW;
                        if ((unsigned)iw >= (unsigned)k->W) continue;
                        const int8_t *wp = wo + (kh * k->KW + kw) * C;
                        const long base = ((long)ih * k->W + iw) * C;
                        if (k->x_signed) {
                            const int8_t *xp = (const int8_t *)x + base;
                            for (int c = 0; c < C; ++c) acc += (int32_t)xp[c] * wp[c];
                        } else {
                            const uint8_t *xp = (const uint8_t *)x + base;
                            for (int c = 0; c < C; ++c) acc += (int32_t)xp[c] * wp[c];
                        }
                    }
                }
                nq_conv_store(k, acc, o, skip, y, ((long)oh * k->OW + ow) * k->O + o);
            }
}

#if NQ_MICRO_DSP || NQ_MICRO_MVE
/* The K = KH*KW*C inputs of output pixel p as int16 (0 for padding), in the weights' order.
 * permute (the DSP kernel): each group of 4 stored as (x0, x2, x1, x3), the order in which
 * SXTB16 and SXTB16 ROR #8 split a word of 4 weights; the K % 4 last ones as they are. */
static void nq_column(const nq_conv *k, const void *x, int p, int16_t *col, int permute) {
    const int C = k->C, oh = p / k->OW, ow = p % k->OW;
    const int K4 = permute ? (k->KH * k->KW * C) & ~3 : 0;
    int16_t *out = col;
    for (int kh = 0; kh < k->KH; ++kh) {
        const int ih = oh * k->SH - k->PH + kh * k->DH;
        for (int kw = 0; kw < k->KW; ++kw, out += C) {
            const int iw = ow * k->SW - k->PW + kw * k->DW;
            const int inside = (unsigned)ih < (unsigned)k->H && (unsigned)iw < (unsigned)k->W;
            const long base = ((long)ih * k->W + iw) * C;
#if NQ_MICRO_DSP
            if (permute && C % 4 == 0) {   /* whole groups per tap: a word in, two words out */
                for (int c = 0; c < C; c += 4) {
                    uint32_t v = 0, lo = 0, hi = 0;
                    if (inside) memcpy(&v, (const uint8_t *)x + base + c, 4);
                    if (k->x_signed) {
                        __asm__("sxtb16 %0, %1" : "=r"(lo) : "r"(v));
                        __asm__("sxtb16 %0, %1, ror #8" : "=r"(hi) : "r"(v));
                    } else {
                        __asm__("uxtb16 %0, %1" : "=r"(lo) : "r"(v));
                        __asm__("uxtb16 %0, %1, ror #8" : "=r"(hi) : "r"(v));
                    }
                    memcpy(out + c, &lo, 4);
                    memcpy(out + c + 2, &hi, 4);
                }
                continue;
            }
#endif
            for (int c = 0; c < C; ++c) {
                const int kk = (int)(out - col) + c;
                const int at = kk < K4 ? (kk & ~3) | ((kk & 1) << 1) | ((kk >> 1) & 1) : kk;
                col[at] = (int16_t)(inside ? nq_at(x, k->x_signed, base + c) : 0);
            }
        }
    }
}
#endif

#if NQ_MICRO_DSP
static inline int32_t nq_sxtb16_ror8(uint32_t v) {
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

/* SMLAD kernel: 2 output pixels x 2 output channels; per 4 k: 2 weight words (4 SXTB16),
 * 4 column words, 8 SMLAD = 16 MACs. A missing second pixel or channel is computed from the
 * first again and not stored. */
static void nq_conv_dsp(const nq_conv *k, const void *x, const void *skip, void *y, int16_t *col) {
    const int K = k->KH * k->KW * k->C, K4 = K & ~3, P = k->OH * k->OW;
    int16_t *col1 = col + ((K + 3) & ~3);
    for (int p = 0; p < P; p += 2) {
        const int two = p + 1 < P;
        nq_column(k, x, p, col, 1);
        if (two) nq_column(k, x, p + 1, col1, 1);
        const int16_t *c1 = two ? col1 : col;
        for (int o = 0; o < k->O; o += 2) {
            const int o1 = o + 1 < k->O ? o + 1 : o;
            const int8_t *wa = k->w + (long)o * K, *wb = k->w + (long)o1 * K;
            int32_t a00 = k->bias[o], a01 = k->bias[o1], a10 = a00, a11 = a01;
            /* pointers stepped in the loop (post-increment loads), so the 4 accumulators, 4
             * operands and 4 pointers stay in registers */
            const int8_t *pa = wa, *pb = wb, *const pend = wa + K4;
            const int16_t *q0 = col, *q1 = c1;
            while (pa < pend) {
                uint32_t va, vb, x0, x1, y0, y1;
                memcpy(&va, pa, 4); pa += 4;
                memcpy(&vb, pb, 4); pb += 4;
                memcpy(&x0, q0, 4); memcpy(&x1, q0 + 2, 4); q0 += 4;
                memcpy(&y0, q1, 4); memcpy(&y1, q1 + 2, 4); q1 += 4;
                const int32_t a02 = __sxtb16(va), a13 = nq_sxtb16_ror8(va);
                const int32_t b02 = __sxtb16(vb), b13 = nq_sxtb16_ror8(vb);
                a00 = __smlad(a02, (int32_t)x0, a00); a00 = __smlad(a13, (int32_t)x1, a00);
                a01 = __smlad(b02, (int32_t)x0, a01); a01 = __smlad(b13, (int32_t)x1, a01);
                a10 = __smlad(a02, (int32_t)y0, a10); a10 = __smlad(a13, (int32_t)y1, a10);
                a11 = __smlad(b02, (int32_t)y0, a11); a11 = __smlad(b13, (int32_t)y1, a11);
            }
            for (int i = K4; i < K; ++i) {
                a00 += wa[i] * col[i]; a01 += wb[i] * col[i];
                a10 += wa[i] * c1[i]; a11 += wb[i] * c1[i];
            }
            nq_conv_store(k, a00, o, skip, y, (long)p * k->O + o);
            if (o1 != o) nq_conv_store(k, a01, o1, skip, y, (long)p * k->O + o1);
            if (two) {
                nq_conv_store(k, a10, o, skip, y, (long)(p + 1) * k->O + o);
                if (o1 != o) nq_conv_store(k, a11, o1, skip, y, (long)(p + 1) * k->O + o1);
            }
        }
    }
}
#endif

#if NQ_MICRO_MVE
/* MVE kernel: 2 output pixels x 2 output channels, 8 int16 lanes per VMLADAVA (weights widened
 * by VLDRB.S16), the K % 8 tail predicated with VCTP. */
static void nq_conv_mve(const nq_conv *k, const void *x, const void *skip, void *y, int16_t *col) {
    const int K = k->KH * k->KW * k->C, P = k->OH * k->OW;
    int16_t *col1 = col + ((K + 7) & ~7);
    for (int p = 0; p < P; p += 2) {
        const int two = p + 1 < P;
        nq_column(k, x, p, col, 0);
        if (two) nq_column(k, x, p + 1, col1, 0);
        const int16_t *c1 = two ? col1 : col;
        for (int o = 0; o < k->O; o += 2) {
            const int o1 = o + 1 < k->O ? o + 1 : o;
            const int8_t *wa = k->w + (long)o * K, *wb = k->w + (long)o1 * K;
            int32_t a00 = k->bias[o], a01 = k->bias[o1], a10 = a00, a11 = a01;
            int i = 0;
            for (; i + 8 <= K; i += 8) {   /* whole vectors: no predication */
                const int16x8_t w0 = vldrbq_s16(wa + i), w1 = vldrbq_s16(wb + i);
                const int16x8_t x0 = vldrhq_s16(col + i), x1 = vldrhq_s16(c1 + i);
                a00 = vmladavaq_s16(a00, w0, x0);
                a01 = vmladavaq_s16(a01, w1, x0);
                a10 = vmladavaq_s16(a10, w0, x1);
                a11 = vmladavaq_s16(a11, w1, x1);
            }
            if (i < K) {   /* the K % 8 last: lanes past K load as 0 */
                const mve_pred16_t m = vctp16q((uint32_t)(K - i));
                const int16x8_t w0 = vldrbq_z_s16(wa + i, m), w1 = vldrbq_z_s16(wb + i, m);
                const int16x8_t x0 = vldrhq_z_s16(col + i, m), x1 = vldrhq_z_s16(c1 + i, m);
                a00 = vmladavaq_s16(a00, w0, x0);
                a01 = vmladavaq_s16(a01, w1, x0);
                a10 = vmladavaq_s16(a10, w0, x1);
                a11 = vmladavaq_s16(a11, w1, x1);
            }
            nq_conv_store(k, a00, o, skip, y, (long)p * k->O + o);
            if (o1 != o) nq_conv_store(k, a01, o1, skip, y, (long)p * k->O + o1);
            if (two) {
                nq_conv_store(k, a10, o, skip, y, (long)(p + 1) * k->O + o);
                if (o1 != o) nq_conv_store(k, a11, o1, skip, y, (long)(p + 1) * k->O + o1);
            }
        }
    }
}
#endif

/* bytes of int16 column scratch the SIMD kernels need for a conv of K = KH*KW*C taps (2 pixels) */
#define NQ_COLUMN_BYTES(K) (2 * 2 * (((K) + 7) & ~7))

static void nq_conv_run(const nq_conv *k, const void *x, const void *skip, void *y, int16_t *col) {
#if NQ_MICRO_MVE
    nq_conv_mve(k, x, skip, y, col);
#elif NQ_MICRO_DSP
    nq_conv_dsp(k, x, skip, y, col);
#else
    (void)col;
    nq_conv_portable(k, x, skip, y);
#endif
}

/* which kernels this build uses */
#define NQ_MICRO_KERNELS (NQ_MICRO_MVE ? "mve" : NQ_MICRO_DSP ? "dsp-smlad" : "portable")

#endif
