/* netquant runtime: the integer numerics of docs/NUMERICS.md, function for function with
 * netquant/quant/numerics.py. Copied verbatim next to every generated network.
 *
 * Representation: real = scale * q, zero point 0. Rounding: ROUND_HALF_UP, floor(v + 1/2).
 * Right shifts of negative values are arithmetic (floor) in GCC, Clang and NVCC, which this
 * file relies on. Compile with -ffp-contract=off so x * inv + 0.5f is never fused.
 */
#ifndef NETQUANT_RT_H
#define NETQUANT_RT_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define NQ_FN static __host__ __device__ __forceinline__
#else
#define NQ_FN static inline
#endif

/* NQ_ERR_BUFFER: an entry point was given a buffer length (in elements) shorter than n images
 * or n outputs; nothing was read or written. */
enum { NQ_OK = 0, NQ_ERR_ARGUMENT = 1, NQ_ERR_NONFINITE = 2, NQ_ERR_RUNTIME = 3, NQ_ERR_UNSUPPORTED = 4,
       NQ_ERR_BUFFER = 5 };

/* round_half_up(v / 2^shift) = (v + 2^(shift-1)) >> shift, 1 <= shift <= 62 */
NQ_FN int64_t nq_rounding_shift(int64_t v, int32_t shift) {
    return (v + ((int64_t)1 << (shift - 1))) >> shift;
}

NQ_FN int32_t nq_clamp(int64_t v, int32_t lo, int32_t hi) {
    return (int32_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* requantize: clamp((acc * M + 2^(shift-1)) >> shift, lo, hi); |acc| < 2^31, M < 2^31 */
NQ_FN int32_t nq_requantize(int64_t acc, int32_t M, int32_t shift, int32_t lo, int32_t hi) {
    return nq_clamp(nq_rounding_shift(acc * (int64_t)M, shift), lo, hi);
}

/* quantize a float: clamp(floor(x * inv + 0.5f), lo, hi), every step rounded to float32 */
NQ_FN int32_t nq_quantize(float x, float inv, int32_t lo, int32_t hi) {
    float v = x * inv;
    v = floorf(v + 0.5f);
    return v < (float)lo ? lo : (v > (float)hi ? hi : (int32_t)v);
}

NQ_FN float nq_dequantize(int32_t q, float scale) {
    return scale * (float)q;
}

#if defined(NQ_VNNI) && NQ_VNNI
/* The end of every 16-lane requantization: 64-bit even lanes p_e and odd lanes p_o (vpmuldq
 * multiplies the low 32 bits of each 64-bit lane) are rounded half up and shifted arithmetically
 * per lane, clamped, then put back into 16 int32 lanes. */
static inline __m512i nq_round_clamp16(__m512i p_e, __m512i p_o, __m512i sh_e, __m512i sh_o, int32_t lo, int32_t hi) {
    const __m512i low32 = _mm512_set1_epi64(0xffffffffLL), one = _mm512_set1_epi64(1);
    const __m512i vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
    p_e = _mm512_srav_epi64(_mm512_add_epi64(p_e, _mm512_sllv_epi64(one, _mm512_sub_epi64(sh_e, one))), sh_e);
    p_o = _mm512_srav_epi64(_mm512_add_epi64(p_o, _mm512_sllv_epi64(one, _mm512_sub_epi64(sh_o, one))), sh_o);
    p_e = _mm512_min_epi64(_mm512_max_epi64(p_e, vlo), vhi);
    p_o = _mm512_min_epi64(_mm512_max_epi64(p_o, vlo), vhi);
    return _mm512_or_si512(_mm512_and_si512(p_e, low32), _mm512_slli_epi64(p_o, 32));
}

/* nq_requantize on 16 int32 lanes at once (AVX-512F): the same integers as the scalar function. */
static inline __m512i nq_requantize16(__m512i acc, __m512i M, __m512i shift, int32_t lo, int32_t hi) {
    const __m512i low32 = _mm512_set1_epi64(0xffffffffLL);
    return nq_round_clamp16(_mm512_mul_epi32(acc, M),
                            _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), _mm512_srli_epi64(M, 32)),
                            _mm512_and_si512(shift, low32), _mm512_srli_epi64(shift, 32), lo, hi);
}

/* The residual add on 16 int32 lanes: clamp((a * m0 + b * m1 + 2^(shift-1)) >> shift, lo, hi),
 * the same integers as the scalar loop (64-bit products, even and odd lanes apart). */
static inline __m512i nq_add16(__m512i a, __m512i b, int32_t m0, int32_t m1, int32_t shift, int32_t lo, int32_t hi) {
    const __m512i M0 = _mm512_set1_epi64(m0), M1 = _mm512_set1_epi64(m1), sh = _mm512_set1_epi64(shift);
    const __m512i e = _mm512_add_epi64(_mm512_mul_epi32(a, M0), _mm512_mul_epi32(b, M1));
    const __m512i o = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(a, 32), M0),
                                       _mm512_mul_epi32(_mm512_srli_epi64(b, 32), M1));
    return nq_round_clamp16(e, o, sh, sh, lo, hi);
}

/* The residual add of two 8-bit tensors on 16 lanes in 32-bit arithmetic, for 16 <= shift <= 46
 * (program.ADD_PAIR_SHIFTS): the same integers as nq_add16. With 15-bit pieces
 * m_i = h_i 2^30 + u_i 2^15 + l_i (h_i is 0 or 1) and int16 pairs (a, b), vpmaddwd forms
 *     S_l = a l0 + b l1,  S_u = a u0 + b u1,  S_h = a h0 + b h1        (exact: |S| < 2^24)
 *     V = S_h 2^15 + S_u + (S_l >> 15) = floor((a m0 + b m1) / 2^15)    (|V| < 2^25)
 *     result = (V + 2^(shift-16)) >> (shift-15)
 * the last step exact since the dropped S_l mod 2^15 adds less than 1 to an integer before the
 * floor. Worked: a = 100, b = -20, m0 = 1500000000, m1 = 1200000000, shift = 30: S_l = 1141760,
 * S_u = 1223740, S_h = 80, V = 3845214, (3845214 + 2^14) >> 15 = 117
 * = (126000000000 + 2^29) >> 30. lu, uu, hu: the pieces as (m0 piece, m1 piece) int16 pairs. */
static inline __m512i nq_add16_pairs(__m512i a, __m512i b, __m512i lu, __m512i uu, __m512i hu, int32_t shift) {
    const __m512i ab = _mm512_mask_blend_epi16(0xAAAAAAAAu, a, _mm512_slli_epi32(b, 16));  /* (a, b) int16 pairs */
    const __m512i v = _mm512_add_epi32(_mm512_add_epi32(_mm512_madd_epi16(ab, uu), _mm512_srai_epi32(_mm512_madd_epi16(ab, lu), 15)),
                                       _mm512_slli_epi32(_mm512_madd_epi16(ab, hu), 15));
    return _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(1 << (shift - 16))), shift - 15);
}

/* The (a, b) int16 pairs of nq_add16_pairs in two instructions: a holds 16 8-bit values in int32
 * lanes (a conv's requantized outputs), b points at the other input's 16 bytes (int8 where
 * b_signed, else uint8), which the load widens to words; a masked vpermw moves word i of them into
 * the odd word of pair i and keeps a's even words (its low halves). Against a widening load to
 * dwords, a shift and a blend. Example: a lane 0x0000007B (123) and byte 0xF9 (int8 -7) give the
 * pair 0xFFF9007B. */
static inline __m512i nq_pairs16(__m512i a, const void *b, int b_signed) {
    const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                         7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)b);
    const __m256i w = b_signed ? _mm256_cvtepi8_epi16(bytes) : _mm256_cvtepu8_epi16(bytes);
    return _mm512_mask_permutexvar_epi16(a, 0xAAAAAAAAu, idx, _mm512_castsi256_si512(w));
}

/* The residual add of nq_add16_pairs in two 16-bit pieces (AVX-512 VNNI), the same integers: for
 * multipliers below 2^31 - 2^15 (c.add_pieces16), m_i = P1_i 2^16 + P0_i with P0_i the signed
 * low digit in [-2^15, 2^15) and P1_i = (m_i - P0_i) / 2^16 <= 32767, so both fit int16 and with
 * pairs ab = (a, b)
 *     S0 = a P0_a + b P0_b, S1 = a P1_a + b P1_b      (int16 pair products: |S| < 2^24)
 *     a m_a + b m_b = S1 2^16 + S0
 *     (S1 2^16 + S0 + 2^(shift-1)) >> shift = (S1 + ((S0 + 2^(shift-1)) >> 16)) >> (shift - 16)
 * (nested floor divisions; 16 <= shift <= 31 keeps S0 + 2^(shift-1) in int32; above 31 the
 * rounding 2^(shift-17) is added after the first shift instead). Two vpdpwssd and two shifts
 * against nq_add16_pairs's three products, five additions and shifts. Worked (a = 100, b = -20,
 * m_a = 1500000000 = 22888 * 2^16 + 12032, m_b = 1200000000 = 18311 * 2^16 - 29696, shift = 30):
 * S0 = 1797120, S1 = 1922580, (1797120 + 2^29) >> 16 = 8219, (1922580 + 8219) >> 14 = 117. */
static inline __m512i nq_add16_dp(__m512i ab, __m512i p0, __m512i p1, int32_t shift) {
    __m512i v;
    if (shift <= 31) {
        v = _mm512_srai_epi32(_mm512_dpwssd_epi32(_mm512_set1_epi32((int32_t)(1u << (shift - 1))), ab, p0), 16);
    } else {
        v = _mm512_add_epi32(_mm512_srai_epi32(_mm512_madd_epi16(ab, p0), 16), _mm512_set1_epi32(1 << (shift - 17)));
    }
    return _mm512_srai_epi32(_mm512_dpwssd_epi32(v, ab, p1), shift - 16);
}

/* nq_requantize without its clamp on 16 int32 lanes, when every shift is in [33, 62]
 * (program.HI_SHIFTS): with t = shift - 32 and H = floor(acc * M / 2^32), the high half of the
 * 64-bit product,
 *     (acc * M + 2^(shift-1)) >> shift  ==  (H + 2^(t-1)) >> t      exactly,
 * since the low half adds L / 2^32 in [0, 1) to the integer H + 2^(t-1), which cannot carry it
 * past a multiple of 2^t. Worked: acc = 1000, M = 1690499128, shift = 37: acc * M =
 * 1690499128000, H = 393, t = 5: (393 + 16) >> 5 = 12 = (1690499128000 + 2^36) >> 37.
 * |H| < 2^30 and 2^(t-1) <= 2^29, so the sum fits 32 bits. round = 2^(t-1), t per lane.
 * vpmuldq multiplies the low 32 bits of each 64-bit lane: even lanes as they are, odd lanes
 * moved down; the high halves are then gathered back into lane order. */
static inline __m512i nq_requantize16_hi(__m512i acc, __m512i M, __m512i round, __m512i t) {
    const __m512i hi = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    const __m512i pe = _mm512_mul_epi32(acc, M);
    const __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), _mm512_srli_epi64(M, 32));
    return _mm512_srav_epi32(_mm512_add_epi32(_mm512_permutex2var_epi32(pe, hi, po), round), t);
}

/* Four vectors of 16 int32 lanes -> 64 bytes a0..a15 b0..b15 c0..c15 d0..d15, saturated to
 * uint8 (0..255) or int8 (-128..127), which is the clamp where it is the type's whole range.
 * The packs work within 128-bit lanes (lane l gets a, b, c, d [4l..4l+3]); the dword
 * permutation idx[4j + l] = 4l + j puts each source back in one piece. */
static inline __m512i nq_pack4_u8(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_epi32(idx, _mm512_packus_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d)));
}
static inline __m512i nq_pack4_s8(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_epi32(idx, _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d)));
}

#endif

#if defined(NQ_AVX2) && NQ_AVX2
/* nq_requantize16_hi on 8 int32 lanes (AVX2): the same identity, every shift in [33, 62]. */
static inline __m256i nq_requantize8_hi(__m256i acc, __m256i M, __m256i round, __m256i t) {
    const __m256i pe = _mm256_mul_epi32(acc, M);
    const __m256i po = _mm256_mul_epi32(_mm256_srli_epi64(acc, 32), _mm256_srli_epi64(M, 32));
    /* the high halves: even lanes moved down from their products, odd lanes in place */
    const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
    return _mm256_srav_epi32(_mm256_add_epi32(h, round), t);
}

/* Four vectors of 8 int32 lanes -> 32 bytes a0..a7 b0..b7 c0..c7 d0..d7, saturated to uint8 or
 * int8 (the clamp where it is the type's whole range). The packs work within 128-bit lanes
 * (lane l gets a, b, c, d [4l..4l+3]); the dword permutation (0, 4, 1, 5, 2, 6, 3, 7) joins them. */
static inline __m256i nq_pack4x8_u8(__m256i a, __m256i b, __m256i c, __m256i d) {
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)),
                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
static inline __m256i nq_pack4x8_s8(__m256i a, __m256i b, __m256i c, __m256i d) {
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)),
                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* nq_add16_pairs on 16 elements (AVX2), for 16 <= shift <= 46: a and b hold the 16 8-bit inputs
 * widened to int16 lanes; the result is the 16 sums (V + 2^(shift-16)) >> (shift-15), unclamped,
 * as int16 lanes in element order, saturated to int16 (which keeps any clamp to 8-bit bounds
 * exact). The (a, b) pairs come from unpacklo/unpackhi, which work within 128-bit lanes
 * (elements 0-3, 8-11 and 4-7, 12-15); packs_epi32 puts them back in the same in-lane order, so
 * the output is in element order. Worked: as nq_add16_pairs, a = 100, b = -20 -> 117. */
static inline __m256i nq_add16x16_pairs(__m256i a, __m256i b, __m256i lu, __m256i uu, __m256i hu, int32_t shift) {
    const __m256i rnd = _mm256_set1_epi32(1 << (shift - 16));
    const __m256i p0 = _mm256_unpacklo_epi16(a, b), p1 = _mm256_unpackhi_epi16(a, b);
    const __m256i v0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(p0, uu), _mm256_srai_epi32(_mm256_madd_epi16(p0, lu), 15)),
                                        _mm256_slli_epi32(_mm256_madd_epi16(p0, hu), 15));
    const __m256i v1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(p1, uu), _mm256_srai_epi32(_mm256_madd_epi16(p1, lu), 15)),
                                        _mm256_slli_epi32(_mm256_madd_epi16(p1, hu), 15));
    return _mm256_packs_epi32(_mm256_srai_epi32(_mm256_add_epi32(v0, rnd), shift - 15),
                              _mm256_srai_epi32(_mm256_add_epi32(v1, rnd), shift - 15));
}

/* nq_add16_pairs on 8 int32 lanes (AVX2): a and b hold 8-bit values in int32 lanes (a conv's
 * requantized outputs and the residual input, in the fused epilogue); the same integers. */
static inline __m256i nq_add8_pairs(__m256i a, __m256i b, __m256i lu, __m256i uu, __m256i hu, int32_t shift) {
    const __m256i ab = _mm256_blend_epi16(a, _mm256_slli_epi32(b, 16), 0xAA);  /* (a, b) int16 pairs */
    const __m256i v = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(ab, uu), _mm256_srai_epi32(_mm256_madd_epi16(ab, lu), 15)),
                                       _mm256_slli_epi32(_mm256_madd_epi16(ab, hu), 15));
    return _mm256_srai_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(1 << (shift - 16))), shift - 15);
}

/* nq_add16_dp on 8 int32 lanes (AVX2, no vpdpwssd: vpmaddwd and an addition): ab holds the
 * (a, b) int16 pairs, p0 / p1 the 16-bit pieces; the same integers. */
static inline __m256i nq_add8_dp(__m256i ab, __m256i p0, __m256i p1, int32_t shift) {
    const __m256i r = shift <= 31 ? _mm256_set1_epi32((int32_t)(1u << (shift - 1))) : _mm256_setzero_si256();
    __m256i v = _mm256_srai_epi32(_mm256_add_epi32(_mm256_madd_epi16(ab, p0), r), 16);
    if (shift > 31) v = _mm256_add_epi32(v, _mm256_set1_epi32(1 << (shift - 17)));
    return _mm256_srai_epi32(_mm256_add_epi32(v, _mm256_madd_epi16(ab, p1)), shift - 16);
}

/* Two vectors of 16 int16 lanes -> 32 bytes a0..a15 b0..b15, saturated to uint8 or int8. */
static inline __m256i nq_pack2x16_u8(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);   /* qwords 0, 2, 1, 3 */
}
static inline __m256i nq_pack2x16_s8(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
}
#endif

#if !defined(__CUDACC__)
/* Dot products of a fully connected layer: sum_k x[k] * w[k] over K 8-bit values (x uint8 or
 * int8, w int8), the same int32 as the scalar loop. Both sides are widened to int16 and multiplied
 * in pairs (vpdpwssd on AVX-512 VNNI: 32 products an instruction; vpmaddwd + vpaddd on AVX2: 16):
 * a pair sum is at most 2 * 255 * 128 = 65,280 in magnitude, and int32 lanes wrap modulo 2^32,
 * so the lane sums add up to the exact total whenever it fits int32 (lowering checks |acc| <
 * 2^31). Example: K = 1280 (MobileNetV2's classifier) is 40 vpdpwssd and one horizontal sum.
 * A build without either instruction set (-DNQ_NO_SIMD, the portable fallback) runs the loop. */
static inline __attribute__((always_inline)) int32_t nq_dot8(const void *xv, int x_signed, const int8_t *w, int K) {
    const uint8_t *xu = (const uint8_t *)xv;
    int k = 0;
    int32_t s = 0;
#if defined(NQ_VNNI) && NQ_VNNI
    /* two accumulators: each vpdpwssd waits for the one before it on the same register */
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
#define NQ_DOT8_STEP(a, k) { \
        const __m256i xb = _mm256_loadu_si256((const __m256i *)(xu + (k))); \
        a = _mm512_dpwssd_epi32(a, x_signed ? _mm512_cvtepi8_epi16(xb) : _mm512_cvtepu8_epi16(xb), \
                                _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + (k))))); }
    for (; k + 64 <= K; k += 64) {
        NQ_DOT8_STEP(a0, k)
        NQ_DOT8_STEP(a1, k + 32)
    }
    if (k + 32 <= K) {
        NQ_DOT8_STEP(a0, k)
        k += 32;
    }
#undef NQ_DOT8_STEP
    s = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
#elif defined(NQ_AVX2) && NQ_AVX2
    __m256i acc = _mm256_setzero_si256();
    for (; k + 16 <= K; k += 16) {
        const __m128i xb = _mm_loadu_si128((const __m128i *)(xu + k));
        const __m256i x16 = x_signed ? _mm256_cvtepi8_epi16(xb) : _mm256_cvtepu8_epi16(xb);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x16, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)))));
    }
    const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    s = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1)));
#endif
    for (; k < K; ++k) s += (x_signed ? (int32_t)((const int8_t *)xv)[k] : (int32_t)xu[k]) * (int32_t)w[k];
    return s;
}

/* nq_quantize on n floats, 8 at a time: the same float32 operations (x * inv, + 0.5f, floor)
 * and the clamp in float, where lo and hi are exact, before the conversion (the input was
 * checked finite, so no NaN reaches it). Example: x = 0.5, inv = 255: 127.5 + 0.5 = 128 -> 128. */
static inline void nq_quantize_n(const float *x, float inv, int32_t lo, int32_t hi, int32_t *q, int n) {
    int i = 0;
#if (defined(NQ_VNNI) && NQ_VNNI) || (defined(NQ_AVX2) && NQ_AVX2)
    const __m256 vi = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
    const __m256 vlo = _mm256_set1_ps((float)lo), vhi = _mm256_set1_ps((float)hi);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi), half));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, vlo), vhi)));
    }
#endif
    for (; i < n; ++i) q[i] = nq_quantize(x[i], inv, lo, hi);
}
#endif

#endif /* NETQUANT_RT_H */
