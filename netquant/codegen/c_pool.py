"""The generated C's own thread pool for splitting one image's kernels: ``nq_run(fn, ctx, n, macs)``.

OpenMP's parallel regions end in a barrier that every thread of the team must reach: where the
machine runs more threads than it has cores (a shared server, a laptop with a browser open), a
worker the OS has not scheduled holds the caller at every kernel's barrier while the others spin
through their time slices. Measured on a 2-core machine under a load of ~12: ResNet-18 at batch
1 took 526-772 ms per image with 2 OpenMP threads against 88-154 ms with 1.

``nq_run`` never waits for work nobody took. Items are claimed one at a time from a shared
counter by the caller and by whichever workers are awake; the caller, once none is left, waits
only for the items a worker has started. A worker that is not scheduled simply takes nothing:
the call then costs what one thread costs, plus one atomic per item.

The counter packs (job generation: 16 bits, item count n: 24 bits, next item: 24 bits) into one
64-bit word, so a claim is one compare-and-swap that also checks the item belongs to the job
being run; the job's function and context are read after a successful claim, when the job
cannot end before that item is done. Workers spin a little (about 50 us) after a job, then sleep
on a condition variable; they are started on the first split call, one fewer than
``omp_get_max_threads()`` (the library's thread count: ``set_num_threads``), and a lower count
later leaves the extra ones idle.

Inside an OpenMP parallel region (the images of a batch already running in parallel), with one
thread, for less than NQ_POOL_MIN_MACS (1M) of work, or while another caller's job is running,
the items run in order on the calling thread. Without OpenMP (no -fopenmp) likewise. The work
``macs`` is counted in dense-conv multiply-adds (CPrinter.split_effort): a conv's MACs, a
depthwise conv's times 8, one per quantized input value, a pool's outputs times its window, a
fully connected layer's K x O. Example: ResNet-18's layer1 conv (115.6M MACs, 4 block groups x
56 rows = 224 items) is split, and so are ResNet-20's 2.4M-MAC convs, MobileNetV2's 14x14x384
depthwise convs (0.68M MACs, weighed 5.4M; rows as items) and its 1280 x 1000 classifier (63
blocks of 16 outputs); a 224x224 RGB input quantization (0.15M values) is not. Measured on a 2-core Zen 4
(MobileNetV2, one image, 2 threads): 480 images/s with only dense convs split, 556 with these.
"""

POOL_RUNTIME = r"""/* ---- nq_run: one image's kernel items across threads, never waiting for an idle worker (c_pool.py) ---- */
typedef void (*nq_item_fn)(void *ctx, int item);
#ifdef _OPENMP
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#define NQ_POOL_MAX 256
/* less work than this runs on the calling thread: a split costs about a wake-up (~10 us where
 * the workers sleep) and one atomic per item; a 1M-MAC conv takes ~20 us on one core */
#ifndef NQ_POOL_MIN_MACS
#define NQ_POOL_MIN_MACS 1000000L
#endif
#ifndef NQ_POOL_SPIN
#define NQ_POOL_SPIN 2000
#endif
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_uint gen;                    /* the job generation: workers wake when it changes */
    atomic_ullong next;                 /* gen:16 | n:24 | next item:24 */
    atomic_int done;                    /* items of the job finished */
    atomic_int busy;                    /* a job is posted: another caller runs its items itself */
    nq_item_fn fn;
    void *ctx;
    atomic_int helpers;                 /* workers that may join the job */
    int started;                        /* workers started */
} nq_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void nq_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* claim and run items of job generation g (low 16 bits) until none is left */
static void nq_take(unsigned g) {
    for (;;) {
        unsigned long long v = atomic_load(&nq_pool.next);
        const unsigned n = (unsigned)(v >> 24) & 0xffffffu, i = (unsigned)v & 0xffffffu;
        if ((unsigned)(v >> 48) != (g & 0xffffu) || i >= n) return;
        if (!atomic_compare_exchange_weak(&nq_pool.next, &v, v + 1)) continue;
        nq_pool.fn(nq_pool.ctx, (int)i);   /* the job cannot end before this item is done */
        atomic_fetch_add(&nq_pool.done, 1);
    }
}

static void *nq_worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&nq_pool.gen);
    for (;;) {
        unsigned g;
        for (int spin = 0; (g = atomic_load(&nq_pool.gen)) == seen; ++spin) {
            if (spin < NQ_POOL_SPIN) { nq_pause(); continue; }
            pthread_mutex_lock(&nq_pool.lock);
            while ((g = atomic_load(&nq_pool.gen)) == seen) pthread_cond_wait(&nq_pool.wake, &nq_pool.lock);
            pthread_mutex_unlock(&nq_pool.lock);
            break;
        }
        seen = g;
        if (id < atomic_load(&nq_pool.helpers)) nq_take(g);
    }
    return NULL;
}

static void __attribute__((unused)) nq_run(nq_item_fn fn, void *ctx, int n, long macs) {
    const int threads = omp_get_max_threads();
    if (n < 2 || n > 0xffffff || macs < NQ_POOL_MIN_MACS || threads < 2 || omp_in_parallel() ||
        atomic_exchange(&nq_pool.busy, 1)) {
        for (int i = 0; i < n; ++i) fn(ctx, i);
        return;
    }
    const int helpers = threads - 1 < NQ_POOL_MAX ? threads - 1 : NQ_POOL_MAX;
    pthread_mutex_lock(&nq_pool.lock);
    while (nq_pool.started < helpers) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&t, &attr, nq_worker, (void *)(intptr_t)nq_pool.started) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;   /* no thread: the items run on the threads there are */
        nq_pool.started++;
    }
    const unsigned g = atomic_load(&nq_pool.gen) + 1;
    nq_pool.fn = fn;
    nq_pool.ctx = ctx;
    atomic_store(&nq_pool.helpers, helpers);
    atomic_store(&nq_pool.done, 0);
    atomic_store(&nq_pool.next, (unsigned long long)(g & 0xffffu) << 48 | (unsigned long long)n << 24);
    atomic_store(&nq_pool.gen, g);
    pthread_cond_broadcast(&nq_pool.wake);
    pthread_mutex_unlock(&nq_pool.lock);
    nq_take(g);
    /* what is left are items a worker has started */
    for (int spin = 0; atomic_load(&nq_pool.done) < n; ++spin) {
        if (spin < NQ_POOL_SPIN) nq_pause();
        else sched_yield();
    }
    atomic_store(&nq_pool.busy, 0);
}
#else
static void __attribute__((unused)) nq_run(nq_item_fn fn, void *ctx, int n, long macs) {
    (void)macs;
    for (int i = 0; i < n; ++i) fn(ctx, i);
}
#endif
"""
