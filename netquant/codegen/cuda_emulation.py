"""A CPU emulation of the CUDA the generated .cu uses, for machines without a GPU (the test
suite, and ``bench/gpu_check.py --cpu-dry-run``): ``emulate(cu_source)`` returns C++ that g++
builds into a library with the same entry points (``build_emulated``). It checks what the kernels
compute, not how fast: ResNet-20 runs at about 3 images a second. Only the parts of CUDA the
printer emits are emulated, each with the semantics a kernel bug would break:

- every thread of a block is a coroutine (ucontext); a block's threads run one after another
  until each reaches a point that needs others: ``__syncthreads()`` (all threads of the block),
  or a warp-wide instruction (``ldmatrix``, ``mma.sync``: all 32 lanes of its warp, which then
  exchange their registers as the PTX ISA lays them out). A barrier or warp instruction that not
  every thread reaches aborts (undefined on a GPU: a hang or garbage);
- ``cp.async`` copies are held per thread and made at the ``cp.async.wait_group`` that covers
  them, so a kernel that reads shared memory before the wait (or before the barrier after it:
  the other threads' copies) reads stale bytes and fails the bit-exact check;
- ``__shared__`` arrays are statics (blocks run one at a time); device memory is host memory;
  ``dp4a`` is a function. Kernels without barriers or warp instructions run thread after
  thread without coroutines (fast).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

EMULATION = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <functional>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))
#define __ldg(p) (*(p))
struct nq_dim3 { unsigned x; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { uint4 v = {x, y, z, w}; return v; }
static inline uint2 make_uint2(unsigned x, unsigned y) { uint2 v = {x, y}; return v; }
static nq_dim3 blockIdx, blockDim;
enum { cudaSuccess = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
typedef int cudaError_t;
static int cudaMalloc(void **p, size_t n) { *p = calloc(1, n ? n : 1); return *p ? 0 : 2; }  /* 2: out of memory */
static int cudaFree(void *p) { free(p); return 0; }
static int cudaMemcpy(void *d, const void *s, size_t n, int) { memcpy(d, s, n); return 0; }
static int cudaGetLastError(void) { return 0; }
template <class T> static int cudaMemcpyToSymbol(T &symbol, const void *src, size_t n) { memcpy((void *)&symbol, src, n); return 0; }
static int cudaDeviceSynchronize(void) { return 0; }
static void nq_fail(const char *what) { fprintf(stderr, "CUDA emulation: %s\n", what); abort(); }
/* streams run their work at once; a stream being captured records launches into a graph instead,
 * and launching the graph replays them (so a graph replayed with stale arguments computes wrong
 * results, as on a GPU) */
struct NqStream { int unused; };
static NqStream nq_the_stream;
typedef NqStream *cudaStream_t;
typedef std::vector<std::function<void()> > *cudaGraph_t, *cudaGraphExec_t;
enum { cudaStreamCaptureModeThreadLocal = 1 };
static cudaGraph_t nq_capture = NULL;
static int nq_graphs_alive = 0;
enum { cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2 };
#define cudaStreamLegacy ((cudaStream_t)0x1)
typedef int *cudaEvent_t;
static int nq_the_event;
static int cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { *s = &nq_the_stream; return 0; }
static int cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { *e = &nq_the_event; return 0; }
static int cudaEventRecord(cudaEvent_t, cudaStream_t) { if (nq_capture) nq_fail("an event recorded during capture"); return 0; }
static int cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return 0; }
static int cudaMemcpyAsync(void *d, const void *s, size_t n, int, cudaStream_t) {
    if (nq_capture) nq_fail("a copy during capture");
    memcpy(d, s, n);
    return 0;
}
static int cudaStreamSynchronize(cudaStream_t) { return 0; }
static int cudaStreamBeginCapture(cudaStream_t, int) {
    if (nq_capture) nq_fail("capture begun twice");
    nq_capture = new std::vector<std::function<void()> >();
    ++nq_graphs_alive;
    return 0;
}
static int cudaStreamEndCapture(cudaStream_t, cudaGraph_t *g) { *g = nq_capture; nq_capture = NULL; return 0; }
static int cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long) {
    *e = new std::vector<std::function<void()> >(*g);
    ++nq_graphs_alive;
    return 0;
}
static int cudaGraphDestroy(cudaGraph_t g) { delete g; --nq_graphs_alive; return 0; }
static int cudaGraphExecDestroy(cudaGraphExec_t e) { delete e; --nq_graphs_alive; return 0; }
static int cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
    if (nq_capture) nq_fail("a graph launched during capture");
    for (auto &f : *e) f();
    return 0;
}
static void nq_launch(std::function<void()> f) {
    if (nq_capture) nq_capture->push_back(f); else f();
}
/* graphs and executable graphs alive (for tests: one executable graph per entry kind at most) */
extern "C" int nq_emulated_graphs(void) { return nq_graphs_alive; }
static const char *cudaGetErrorString(int e) { return e == 2 ? "out of memory" : "emulated"; }
/* PTX dp4a.u32.s32: four unsigned bytes of a times four signed bytes of b */
static inline int32_t nq_dp4a(uint32_t a, uint32_t b) {
    int32_t s = 0;
    for (int j = 0; j < 4; ++j) s += (int32_t)((a >> (8 * j)) & 255u) * (int32_t)(int8_t)((b >> (8 * j)) & 255u);
    return s;
}

enum { NQ_RUN, NQ_BARRIER, NQ_LDMATRIX, NQ_MMA, NQ_DONE };
struct NqCopy { void *dst; const void *src; int bytes; long group; };
struct NqThread {
    ucontext_t ctx; nq_dim3 tid; int state;
    int32_t *acc; uint32_t a[4], b[2];          /* mma.sync operands */
    uint32_t *ldm_out; const uint8_t *ldm_row;  /* ldmatrix: where the registers go, this lane's row address, */
    int ldm_count;                              /* and how many matrices */
    std::vector<NqCopy> copies; long groups;    /* cp.async: copies not yet made, groups committed */
};
enum { NQ_MAX_THREADS = 1024, NQ_STACK = 1 << 16 };
static NqThread nq_thr[NQ_MAX_THREADS];
static int nq_cur = 0;
static ucontext_t nq_sched;
static std::function<void()> nq_body;
static char *nq_stacks = NULL;
#define threadIdx (nq_thr[nq_cur].tid)

static void nq_park(int state) { NqThread &me = nq_thr[nq_cur]; me.state = state; swapcontext(&me.ctx, &nq_sched); }
static void nq_thread_entry() { nq_body(); nq_thr[nq_cur].state = NQ_DONE; swapcontext(&nq_thr[nq_cur].ctx, &nq_sched); }

static void __syncthreads(void) { nq_park(NQ_BARRIER); }

static void nq_cp_async16(void *smem, const void *gmem, int src_bytes) {
    NqThread &me = nq_thr[nq_cur];
    me.copies.push_back(NqCopy{smem, gmem, src_bytes, me.groups});
}
static void nq_cp_async16_l1(void *smem, const void *gmem, int src_bytes) { nq_cp_async16(smem, gmem, src_bytes); }
static void nq_cp_async_commit(void) { ++nq_thr[nq_cur].groups; }
/* the copies of every group but the newest N are made now (and only now) */
template <int N> static void nq_cp_async_wait(void) {
    NqThread &me = nq_thr[nq_cur];
    std::vector<NqCopy> later;
    for (const NqCopy &c : me.copies) {
        if (c.group < me.groups - N) {
            memset(c.dst, 0, 16);
            memcpy(c.dst, c.src, (size_t)c.bytes);
        } else {
            later.push_back(c);
        }
    }
    me.copies.swap(later);
}
static void nq_ldmatrix(uint32_t *r, const void *smem, int count) {
    NqThread &me = nq_thr[nq_cur];
    me.ldm_out = r; me.ldm_row = (const uint8_t *)smem; me.ldm_count = count;
    nq_park(NQ_LDMATRIX);
}
static void nq_ldmatrix_x4(uint32_t *r, const void *smem) { nq_ldmatrix(r, smem, 4); }
static void nq_ldmatrix_x2(uint32_t *r, const void *smem) { nq_ldmatrix(r, smem, 2); }
static void nq_mma_u8s8(int32_t *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    NqThread &me = nq_thr[nq_cur];
    me.acc = d; memcpy(me.a, a, sizeof me.a); me.b[0] = b0; me.b[1] = b1;
    nq_park(NQ_MMA);
}

/* ldmatrix.x4 (.x2) over the warp of lanes L[0..31]: matrix j's 8 row addresses come from lanes
 * 8j..8j+7; lane l receives bytes 4(l%4)..+3 of row l/4 of matrix j in register j */
static void nq_ldmatrix_warp(NqThread *L) {
    const int count = L[0].ldm_count;
    uint32_t got[32][4];
    for (int l = 0; l < 32; ++l)
        if (L[l].ldm_count != count) nq_fail("ldmatrix .x2 and .x4 in one warp");
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < count; ++j) memcpy(&got[l][j], L[8 * j + l / 4].ldm_row + 4 * (l % 4), 4);
    for (int l = 0; l < 32; ++l) memcpy(L[l].ldm_out, got[l], sizeof(uint32_t) * count);
}

/* D = A (16x32 u8, row) x B (32x8 s8, col) + C over the 32 lanes: lane = 4g + t holds
 * A[g + 8(r&1)][16(r>>1) + 4t + byte] in register r, B[16h + 4t + byte][g] in register h, and
 * C[g + 8(j>>1)][2t + (j&1)] in accumulator j (PTX ISA, mma.m16n8k32 with 8-bit operands). */
static void nq_mma_warp(NqThread *L) {
    uint8_t A[16][32]; int8_t B[32][8]; int32_t D[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < 4; ++r)
            for (int by = 0; by < 4; ++by) A[g + 8 * (r & 1)][16 * (r >> 1) + 4 * t + by] = (uint8_t)(L[l].a[r] >> (8 * by));
        for (int h = 0; h < 2; ++h)
            for (int by = 0; by < 4; ++by) B[16 * h + 4 * t + by][g] = (int8_t)(uint8_t)(L[l].b[h] >> (8 * by));
    }
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) D[(l >> 2) + 8 * (j >> 1)][2 * (l & 3) + (j & 1)] = L[l].acc[j];
    for (int m = 0; m < 16; ++m)
        for (int c = 0; c < 8; ++c)
            for (int k = 0; k < 32; ++k) D[m][c] += (int32_t)A[m][k] * (int32_t)B[k][c];
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) L[l].acc[j] = D[(l >> 2) + 8 * (j >> 1)][2 * (l & 3) + (j & 1)];
}

/* one block of `threads` threads. cooperative: the kernel has barriers or warp instructions (its
 * threads are coroutines); otherwise they run one after another */
static void nq_run_block(unsigned threads, bool cooperative, const std::function<void()> &body) {
    if (!cooperative) {
        nq_cur = 0;
        for (unsigned t = 0; t < threads; ++t) { nq_thr[0].tid.x = t; body(); }
        return;
    }
    if (threads > NQ_MAX_THREADS || threads % 32) nq_fail("block size");
    if (!nq_stacks && !(nq_stacks = (char *)malloc((size_t)NQ_MAX_THREADS * NQ_STACK))) nq_fail("out of memory");
    nq_body = body;
    for (unsigned t = 0; t < threads; ++t) {
        NqThread &th = nq_thr[t];
        th.tid.x = t; th.state = NQ_RUN; th.copies.clear(); th.groups = 0;
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = nq_stacks + (size_t)t * NQ_STACK; th.ctx.uc_stack.ss_size = NQ_STACK;
        th.ctx.uc_link = NULL;
        makecontext(&th.ctx, nq_thread_entry, 0);
    }
    for (;;) {
        /* each warp as far as it goes alone (to a barrier or its end) before the next starts: a
         * warp that reads what another has not yet copied sees stale bytes */
        bool moved = false;
        for (unsigned w = 0; w < threads; w += 32) {
            NqThread *L = nq_thr + w;
            for (;;) {
                for (int l = 0; l < 32; ++l)
                    if (L[l].state == NQ_RUN) { nq_cur = (int)(w + l); swapcontext(&nq_sched, &L[l].ctx); moved = true; }
                const int s = L[0].state;
                bool all = s == NQ_LDMATRIX || s == NQ_MMA;
                for (int l = 1; l < 32 && all; ++l) all = L[l].state == s;
                if (!all) break;
                if (s == NQ_LDMATRIX) nq_ldmatrix_warp(L); else nq_mma_warp(L);
                for (int l = 0; l < 32; ++l) L[l].state = NQ_RUN;
            }
        }
        int done = 0, barrier = 0;
        for (unsigned t = 0; t < threads; ++t) { done += nq_thr[t].state == NQ_DONE; barrier += nq_thr[t].state == NQ_BARRIER; }
        if (done == (int)threads) break;
        if (!moved && barrier + done == (int)threads) {
            if (done) nq_fail("__syncthreads() after some threads of the block returned");
            for (unsigned t = 0; t < threads; ++t) nq_thr[t].state = NQ_RUN;
            moved = true;
        }
        if (!moved) nq_fail("a barrier or warp instruction that not every thread reached");
    }
}
"""

PTX_BLOCK = re.compile(r"/\* ---- PTX of the tensor-core kernels.*?/\* ---- end of the PTX ---- \*/\n", re.S)


def emulate(cu_source: str) -> str:
    """The generated .cu rewritten to run on the CPU: launches become loops over blocks (see
    EMULATION), the PTX helper functions and dp4a their CPU versions. Everything else, indexing
    and the kernels' own synchronization included, is unchanged."""
    src = cu_source.replace("#include <cuda_runtime.h>", EMULATION)
    src, n_ptx = PTX_BLOCK.subn("", src)
    src, n_asm = re.subn(r'asm\("dp4a\.u32\.s32 %0, %1, %2, %0;" : "\+r"\(acc\) : "r"\(xa\), "r"\(wb\)\);',
                         "acc += nq_dp4a(xa, wb);", src)
    assert n_asm + n_ptx > 0 and not re.search(r"\basm\s*(volatile\s*)?\(", src), "PTX left in the emulated source"
    # kernels that synchronize (barriers, warp instructions) run their threads as coroutines
    cooperative = {name for name, body in _kernels(src) if re.search(r"__syncthreads|nq_ldmatrix|nq_mma_u8s8", body)}

    def launch(m):   # the arguments by value: a captured launch runs when its graph is launched
        name, grid, block, args = m.group(1), m.group(2), m.group(3), m.group(4)
        return (f"nq_launch([=] {{ for (unsigned nq_b = 0; nq_b < {grid}; ++nq_b) {{ blockIdx.x = nq_b; "
                f"blockDim.x = {block}; nq_run_block({block}, {'true' if name in cooperative else 'false'}, "
                f"[&] {{ {name}({args}); }}); }} }});")

    src, n_launch = re.subn(r"(\w+)<<<(.+?), (\d+), 0, nq_stream>>>\((.*?)\);", launch, src)
    assert n_launch > 2 and "<<<" not in src   # every launch rewritten
    return src


def _kernels(src: str):
    """(name, body text) of each kernel: from its signature to the next kernel's."""
    heads = list(re.finditer(r"static __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src))
    for h, nxt in zip(heads, heads[1:] + [None]):
        yield h.group(1), src[h.end():nxt.start() if nxt else len(src)]


def build_emulated(gen, optimize: str = "-O2"):
    """The CUDA library of ``gen`` (a Generated for target "cuda") emulated: its .cu rewritten by
    ``emulate`` into ``<name>_emulated.cpp`` beside it, built with g++ (in its folder, where the
    weights file it pulls in lies) and loaded as a CompiledNetwork."""
    from .build import BuildError, CompiledNetwork

    folder, name = Path(gen.folder), gen.program.name
    cpp = folder / f"{name}_emulated.cpp"
    cpp.write_text(emulate((folder / f"{name}.cu").read_text()))
    lib = folder / f"lib{name}_emulated.so"
    cmd = ["g++", optimize, "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-o", str(lib), str(cpp)]
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if r.returncode:
        raise BuildError(f"building the CPU emulation of {folder / (name + '.cu')} failed ({' '.join(cmd)}):\n"
                         f"{r.stderr[-4000:]}")
    return CompiledNetwork(lib, gen.program)
