/* netquant NEON runtime: the convolution of the aarch64 build (netquant/codegen/arm_neon.py).
 * Copied verbatim next to every network generated with --isa neon / neon-v8.
 *
 * One kernel serves every ungrouped conv over 8-bit channels-last input whose filter taps are
 * adjacent along W (dilation 1 there). The input is copied into a zero-padded (HP, WP, C) buffer,
 * so for output pixel (oh, ow) and filter row kh the KW taps x C channels are R0 = KW*C
 * consecutive bytes; the weights of that row are the same R0 bytes of (O, KH, KW, C), zero padded
 * to R = R0 rounded up to 16 where R0 is not a multiple of 16 (the bytes read past the run then
 * meet zero weights). uint8 input (after a ReLU) is read as x ^ 0x80 = x - 128, an int8, with
 * the padding 0x80 (real 0): sum((x - 128) w) = sum(x w) - 128 sum(w), so the bias of that
 * kernel (biasn) adds back 128 sum(w) and the int32 sum is exact. Example: x = [200, 0],
 * w = [3, -5]: (72 * 3 + -128 * -5) + 128 * (3 - 5) = 856 - 256 = 600 = 200 * 3 + 0 * -5.
 *
 * Tile: 4 output pixels (along W) x 4 output channels, 16 int32x4 accumulators. Per 16 bytes of
 * the run: 4 + 4 vector loads and 16 dot products of 16 int8 pairs:
 *   Armv8.2-A dot product (__ARM_FEATURE_DOTPROD): SDOT, 4 int32 lanes of 4 products each;
 *   plain NEON (Armv8.0): SMULL + SMLAL2 (two products per int16 lane: |x w| <= 128 * 127, two
 *   sum to at most 32512 < 2^15) then SADALP into int32 lanes.
 * The four lane sums of an accumulator are reduced with ADDP; requantization is netquant_rt.h's
 * nq_requantize. A tile's missing pixels or channels repeat the last one and are not stored. */
#ifndef NETQUANT_NEON_H
#define NETQUANT_NEON_H

#include <arm_neon.h>
#include <stdint.h>
#include <string.h>
#include "netquant_rt.h"

#if defined(__ARM_FEATURE_DOTPROD)
#define NQ_NEON_DOT 1
#define NQ_DOT(acc, a, b) vdotq_s32(acc, a, b)
#else
#define NQ_NEON_DOT 0
#define NQ_DOT(acc, a, b) vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b))
#endif

typedef struct {
    int C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW, DH;
    int R;               /* bytes of one filter row of the weights: KW*C, or that rounded up to 16 */
    int x_unsigned;      /* uint8 input, read as x ^ 0x80 */
    int32_t lo, hi;
    const int8_t *w;     /* (O, KH, R) */
    const int32_t *bias; /* + 128 sum(w) for uint8 input */
    const int32_t *mult, *shift;
} nq_neon_conv;

/* bytes of the padded input of a conv: HP * WP * C and 16 bytes of slack read past the last run */
#define NQ_NEON_PAD_BYTES(HP, WP, C, R) ((HP) * (WP) * (C) + (R) + 16)

static void nq_conv_neon(const nq_neon_conv *k, const void *x, void *y, int8_t *pad) {
    const int C = k->C, WP = k->W + 2 * k->PW, HP = k->H + 2 * k->PH, R = k->R;
    const uint8_t flip = k->x_unsigned ? 0x80 : 0;
    memset(pad, flip, (size_t)HP * WP * C + R + 16);
    const uint8x16_t vflip = vdupq_n_u8(flip);
    for (int h = 0; h < k->H; ++h) {
        const uint8_t *src = (const uint8_t *)x + (size_t)h * k->W * C;
        uint8_t *dst = (uint8_t *)pad + ((size_t)(h + k->PH) * WP + k->PW) * C;
        int i = 0;
        for (; i + 16 <= k->W * C; i += 16) vst1q_u8(dst + i, veorq_u8(vld1q_u8(src + i), vflip));
        for (; i < k->W * C; ++i) dst[i] = src[i] ^ flip;
    }
    uint8_t *out = (uint8_t *)y;   /* int8 or uint8: the low byte of the clamped value */
    for (int oh = 0; oh < k->OH; ++oh) {
        for (int ow0 = 0; ow0 < k->OW; ow0 += 4) {
            const int8_t *xp[4];
            for (int j = 0; j < 4; ++j) {
                const int ow = ow0 + j < k->OW ? ow0 + j : k->OW - 1;
                xp[j] = pad + ((size_t)oh * k->SH * WP + (size_t)ow * k->SW) * C;
            }
            for (int o0 = 0; o0 < k->O; o0 += 4) {
                const int8_t *wp[4];
                for (int j = 0; j < 4; ++j)
                    wp[j] = k->w + (size_t)(o0 + j < k->O ? o0 + j : k->O - 1) * k->KH * R;
                int32x4_t a00 = vdupq_n_s32(0), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
                          a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00,
                          a33 = a00;
                for (int kh = 0; kh < k->KH; ++kh) {
                    const size_t xo = (size_t)kh * k->DH * WP * C, wo = (size_t)kh * R;
                    for (int r = 0; r < R; r += 16) {
                        const int8x16_t x0 = vld1q_s8(xp[0] + xo + r), x1 = vld1q_s8(xp[1] + xo + r);
                        const int8x16_t x2 = vld1q_s8(xp[2] + xo + r), x3 = vld1q_s8(xp[3] + xo + r);
                        const int8x16_t w0 = vld1q_s8(wp[0] + wo + r), w1 = vld1q_s8(wp[1] + wo + r);
                        const int8x16_t w2 = vld1q_s8(wp[2] + wo + r), w3 = vld1q_s8(wp[3] + wo + r);
                        a00 = NQ_DOT(a00, x0, w0); a01 = NQ_DOT(a01, x0, w1); a02 = NQ_DOT(a02, x0, w2); a03 = NQ_DOT(a03, x0, w3);
                        a10 = NQ_DOT(a10, x1, w0); a11 = NQ_DOT(a11, x1, w1); a12 = NQ_DOT(a12, x1, w2); a13 = NQ_DOT(a13, x1, w3);
                        a20 = NQ_DOT(a20, x2, w0); a21 = NQ_DOT(a21, x2, w1); a22 = NQ_DOT(a22, x2, w2); a23 = NQ_DOT(a23, x2, w3);
                        a30 = NQ_DOT(a30, x3, w0); a31 = NQ_DOT(a31, x3, w1); a32 = NQ_DOT(a32, x3, w2); a33 = NQ_DOT(a33, x3, w3);
                    }
                }
                int32_t s[4][4];   /* [pixel][channel]: the lane sums */
                vst1q_s32(s[0], vpaddq_s32(vpaddq_s32(a00, a01), vpaddq_s32(a02, a03)));
                vst1q_s32(s[1], vpaddq_s32(vpaddq_s32(a10, a11), vpaddq_s32(a12, a13)));
                vst1q_s32(s[2], vpaddq_s32(vpaddq_s32(a20, a21), vpaddq_s32(a22, a23)));
                vst1q_s32(s[3], vpaddq_s32(vpaddq_s32(a30, a31), vpaddq_s32(a32, a33)));
                for (int j = 0; j < 4 && ow0 + j < k->OW; ++j) {
                    uint8_t *yp = out + ((size_t)oh * k->OW + ow0 + j) * k->O;
                    for (int c = 0; c < 4 && o0 + c < k->O; ++c) {
                        const int o = o0 + c;
                        /* the int32 sum wraps like the exact one: the true accumulator is below 2^31 */
                        const int32_t acc = (int32_t)((uint32_t)s[j][c] + (uint32_t)k->bias[o]);
                        yp[o] = (uint8_t)nq_requantize(acc, k->mult[o], k->shift[o], k->lo, k->hi);
                    }
                }
            }
        }
    }
}

#endif
