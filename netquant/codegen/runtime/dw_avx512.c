
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

