
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

