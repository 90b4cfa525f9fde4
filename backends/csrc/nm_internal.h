/* Helpers shared by the kernel sources; not part of the cffi interface. */
#ifndef NM_INTERNAL_H
#define NM_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "nmopt_kernels.h"

#define NM_MAX_M 64
#define NM_MAX_THREADS 256

/* A task processes items [lo, hi) of a parallel loop. */
typedef void (*nm_task_fn)(void *ctx, int64_t lo, int64_t hi);

/* Run fn over [0, ntasks) in chunks of `grain` items, handed out dynamically to up to
 * `nthreads` threads (the caller is one of them). Falls back to fewer threads, down to the
 * caller alone, when threads cannot be started. */
void nm_parallel_for(int nthreads, int64_t ntasks, int64_t grain, nm_task_fn fn, void *ctx);

/* Record the first error code of a parallel loop (thread-safe). */
static inline void nm_set_error(int *slot, int code)
{
    int expected = 0;
    __atomic_compare_exchange_n(slot, &expected, code, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static inline int nm_get_error(int *slot) { return __atomic_load_n(slot, __ATOMIC_RELAXED); }

/* Set keep[0..m) to 1 for the n largest of s[0..m), ties to the lower index (numpy's stable
 * argsort of -s), 0 elsewhere. Returns the (n+1)-th largest value (-HUGE_VAL if n >= m).
 * Rank counting: O(m^2) but branch-free and vectorised, faster than a selection for m <= 64. */
static inline __attribute__((always_inline)) double nm_row_topn(const double *s, int m, int n,
                                                                uint8_t *keep)
{
    double next = -HUGE_VAL;
    for (int j = 0; j < m; j++) {
        const double sj = s[j];
        int rank = 0;
        for (int k = 0; k < m; k++)
            rank += (s[k] > sj) | ((s[k] == sj) & (k < j));
        keep[j] = (uint8_t)(rank < n);
        next = rank == n ? sj : next;
    }
    return next;
}

/* Grain (items per chunk) that gives each of nthreads about `per_thread` chunks. */
static inline int64_t nm_grain(int64_t ntasks, int nthreads, int per_thread, int64_t min_grain)
{
    int64_t g = ntasks / ((int64_t)(nthreads < 1 ? 1 : nthreads) * per_thread);
    return g < min_grain ? min_grain : g;
}

/* GCC vector types of NM_W = 4 lanes of 64 bits (256 bits): native registers in the AVX2
 * and AVX-512 clones, pairs of SSE registers otherwise. (512-bit generic vectors compile to
 * slow code without AVX-512, and gain little on CPUs that execute them as two halves.) */
#define NM_W 4
typedef double nm_vd __attribute__((vector_size(8 * NM_W)));
typedef int64_t nm_vi __attribute__((vector_size(8 * NM_W)));
#define NM_LANE ((nm_vi){0, 1, 2, 3})

/* SIMD clones (baseline, AVX2, AVX-512) picked at load time by the CPU's features; off with
 * -DNMOPT_PORTABLE, or where the toolchain lacks ifunc support. The baseline x86-64 clone is
 * correct but several times slower: GCC lowers the 256-bit vector code poorly to SSE2. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(NMOPT_PORTABLE)
#define NM_SIMD_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define NM_SIMD_CLONES
#endif

#endif
