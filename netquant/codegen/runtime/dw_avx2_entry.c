/* nq_dw_conv_avx2: depthwise conv (groups = C in = C out), netquant numerics (netquant_rt.h), bit-exact
 * with the reference executor. x: unpadded channels-last (H, W, C) uint8 (in_signed = 0) or
 * int8 (in_signed = 1); y: (OH, OW, C) uint8 or int8 (out_signed), output rows oh0..oh1-1
 * written (callers may split rows across threads). w: pack_dw(weight, "avx2") (int16); bias,
 * mult, shift: int32 per channel, in channel order; lo, hi: the clamp (ReLU/ReLU6 folded in).
 * Taps in the zero padding read a block of zeros. Requires: AVX2; netquant_rt.h included before (nq_requantize for the tail channels). */
static void __attribute__((unused)) nq_dw_conv_avx2(const void *x_, int H, int W, int C, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
        const int16_t *w, const int32_t *bias, const int32_t *mult, const int32_t *shift, int lo, int hi,
        void *y_, int OH, int OW, int oh0, int oh1, int in_signed, int out_signed) {
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
