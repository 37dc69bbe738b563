static const uint8_t nq_dw_zero[64] __attribute__((aligned(64))) = {0};

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
