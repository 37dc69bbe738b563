/* This CPU's AVX-512 VNNI int8 peak, measured: every OpenMP thread runs 12 independent chains of
 * vpdpbusd on 512-bit registers (64 multiply-accumulates each), enough to cover the
 * instruction's latency on current cores, so the loop runs at the instruction's throughput.
 * Prints the best of several rounds in MAC/s over all threads. Built and run by bench_cpu.py:
 *     cc -O2 -march=native -fopenmp vnni_peak.c -o vnni_peak && ./vnni_peak THREADS */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

enum { CHAINS = 12, ITERS = 200000000, ROUNDS = 8 };

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    omp_set_num_threads(threads);
    double best = 0;
    for (int round = 0; round < ROUNDS; ++round) {
        double t0 = omp_get_wtime();
        long long sink = 0;
#pragma omp parallel reduction(+ : sink)
        {
            __m512i acc[CHAINS];
            __m512i x = _mm512_set1_epi32(0x01020304), w = _mm512_set1_epi32(0x01010101);
            for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_epi32(i);
            for (long k = 0; k < ITERS / CHAINS; ++k) {
#pragma GCC unroll 12
                for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], x, w);
                __asm__ volatile("" : "+v"(x), "+v"(w));  /* keep the operands opaque */
            }
            for (int i = 1; i < CHAINS; ++i) acc[0] = _mm512_add_epi32(acc[0], acc[i]);
            sink += _mm512_reduce_add_epi32(acc[0]);
        }
        double macs = (double)threads * (ITERS / CHAINS) * CHAINS * 64;
        double rate = macs / (omp_get_wtime() - t0);
        if (rate > best) best = rate;
        if (sink == 42) printf(" ");
    }
    printf("%.6e\n", best);
    return 0;
}
