/* Selection networks on vectors (nm_exact_start.c's price rounds and dual start,
 * nm_descent.c's descent prices): sorting and the k-th largest, branch-free within lanes. */
#ifndef NM_NETWORK_H
#define NM_NETWORK_H

#include "nm_internal.h"

/* float vectors of NM_F lanes (the price rounds) */
#define NM_F 8
typedef float nm_vf __attribute__((vector_size(4 * NM_F)));
typedef int32_t nm_vm __attribute__((vector_size(4 * NM_F)));

/* Batcher's odd-even merge sort of 8 and 16 inputs, F(lo, hi, up) per comparator (19 and 63
 * of them, against 24 and 80 in the bitonic sort), straight-line so that the values stay in
 * registers; tests/test_exact.py checks both by the 0-1 principle. */
#define NM_OEM8(F, a, up) \
    F(a + 0, a + 1, up); F(a + 2, a + 3, up); F(a + 0, a + 2, up); F(a + 1, a + 3, up); \
    F(a + 1, a + 2, up); F(a + 4, a + 5, up); F(a + 6, a + 7, up); F(a + 4, a + 6, up); \
    F(a + 5, a + 7, up); F(a + 5, a + 6, up); F(a + 0, a + 4, up); F(a + 2, a + 6, up); \
    F(a + 2, a + 4, up); F(a + 1, a + 5, up); F(a + 3, a + 7, up); F(a + 3, a + 5, up); \
    F(a + 1, a + 2, up); F(a + 3, a + 4, up); F(a + 5, a + 6, up);
#define NM_OEM16(F, a, up) \
    F(a + 0, a + 1, up); F(a + 2, a + 3, up); F(a + 0, a + 2, up); F(a + 1, a + 3, up); \
    F(a + 1, a + 2, up); F(a + 4, a + 5, up); F(a + 6, a + 7, up); F(a + 4, a + 6, up); \
    F(a + 5, a + 7, up); F(a + 5, a + 6, up); F(a + 0, a + 4, up); F(a + 2, a + 6, up); \
    F(a + 2, a + 4, up); F(a + 1, a + 5, up); F(a + 3, a + 7, up); F(a + 3, a + 5, up); \
    F(a + 1, a + 2, up); F(a + 3, a + 4, up); F(a + 5, a + 6, up); F(a + 8, a + 9, up); \
    F(a + 10, a + 11, up); F(a + 8, a + 10, up); F(a + 9, a + 11, up); \
    F(a + 9, a + 10, up); F(a + 12, a + 13, up); F(a + 14, a + 15, up); \
    F(a + 12, a + 14, up); F(a + 13, a + 15, up); F(a + 13, a + 14, up); \
    F(a + 8, a + 12, up); F(a + 10, a + 14, up); F(a + 10, a + 12, up); \
    F(a + 9, a + 13, up); F(a + 11, a + 15, up); F(a + 11, a + 13, up); \
    F(a + 9, a + 10, up); F(a + 11, a + 12, up); F(a + 13, a + 14, up); \
    F(a + 0, a + 8, up); F(a + 4, a + 12, up); F(a + 4, a + 8, up); F(a + 2, a + 10, up); \
    F(a + 6, a + 14, up); F(a + 6, a + 10, up); F(a + 2, a + 4, up); F(a + 6, a + 8, up); \
    F(a + 10, a + 12, up); F(a + 1, a + 9, up); F(a + 5, a + 13, up); F(a + 5, a + 9, up); \
    F(a + 3, a + 11, up); F(a + 7, a + 15, up); F(a + 7, a + 11, up); F(a + 3, a + 5, up); \
    F(a + 7, a + 9, up); F(a + 11, a + 13, up); F(a + 1, a + 2, up); F(a + 3, a + 4, up); \
    F(a + 5, a + 6, up); F(a + 7, a + 8, up); F(a + 9, a + 10, up); F(a + 11, a + 12, up); \
    F(a + 13, a + 14, up);

/* A selection network on vectors VT (lane masks MT), branch-free within the lanes:
 * - blend_SFX(sel, x, y): x in the lanes of sel, y elsewhere;
 * - cmpx_SFX(lo, hi, up): compare-exchange, lo <= hi after (up != 0), or lo >= hi; up is a
 *   constant at every call, so the exchange is one compare and two blends;
 * - sort_SFX(a, p, up): sort of a[0..p), p a power of two, ascending when up: Batcher's
 *   odd-even merge sort at p = 8 and 16, else bitonic;
 * - kth_SFX(a, len, k): the k-th largest (1 <= k <= len <= NM_MAX_M) of a[0..len), which it
 *   overwrites. The two halves of the next power of two (padding -inf) are sorted in
 *   opposite directions into one bitonic sequence; each half-cleaner step then puts the
 *   larger half above, and the search goes on in the half that holds the k-th. At k = p/2 + 1
 *   or p/2 (the rounds and the start at N = M/2) that is the largest of the lower half or the
 *   smallest of the upper one after the first step: a running max or min. */
#define NM_NETWORK(SFX, VT, MT, NEG_INF)                                                      \
    static inline __attribute__((always_inline)) VT blend_##SFX(MT sel, VT x, VT y)           \
    {                                                                                         \
        return (VT)((sel & (MT)x) | (~sel & (MT)y));                                          \
    }                                                                                         \
    static inline __attribute__((always_inline)) void cmpx_##SFX(VT *lo, VT *hi, int up)      \
    {                                                                                         \
        const VT x = *lo, y = *hi;                                                            \
        const MT sw = up ? x > y : x < y; /* out of order */                                  \
        *lo = blend_##SFX(sw, y, x);                                                          \
        *hi = blend_##SFX(sw, x, y);                                                          \
    }                                                                                         \
    static inline __attribute__((always_inline)) void sort_##SFX(VT *a, int p, int up)        \
    {                                                                                         \
        if (p == 16) {                                                                        \
            NM_OEM16(cmpx_##SFX, a, up);                                                      \
            return;                                                                           \
        }                                                                                     \
        if (p == 8) {                                                                         \
            NM_OEM8(cmpx_##SFX, a, up);                                                       \
            return;                                                                           \
        }                                                                                     \
        for (int size = 2; size <= p; size <<= 1)                                             \
            for (int half = size >> 1; half > 0; half >>= 1)                                  \
                for (int blk = 0; blk < p; blk += 2 * half) {                                 \
                    /* blocks alternate direction until the last merge, which goes up */      \
                    if (size == p ? up : (blk & size) == 0)                                   \
                        for (int i = blk; i < blk + half; i++)                                \
                            cmpx_##SFX(a + i, a + i + half, 1);                               \
                    else                                                                      \
                        for (int i = blk; i < blk + half; i++)                                \
                            cmpx_##SFX(a + i, a + i + half, 0);                               \
                }                                                                             \
    }                                                                                         \
    static inline __attribute__((always_inline)) VT kth_##SFX(VT *a, int len, int k)          \
    {                                                                                         \
        int p = 1;                                                                            \
        while (p < len)                                                                       \
            p <<= 1;                                                                          \
        for (int i = len; i < p; i++)                                                         \
            a[i] = (VT){0} - NEG_INF;                                                         \
        int lo = 0;                                                                           \
        if (p > 1) {                                                                          \
            sort_##SFX(a, p / 2, 1);                                                          \
            sort_##SFX(a + p / 2, p / 2, 0);                                                  \
        }                                                                                     \
        if (p > 1 && (k == p / 2 + 1 || k == p / 2)) {                                        \
            const int h = p / 2;                                                              \
            VT best = (VT){0} + (k > h ? -NEG_INF : NEG_INF);                                 \
            for (int i = 0; i < h; i++) {                                                     \
                const VT x = a[i], y = a[i + h];                                              \
                if (k > h) { /* the largest of the lower half */                              \
                    const VT lo_ = blend_##SFX(x < y, x, y);                                  \
                    best = blend_##SFX(lo_ > best, lo_, best);                                \
                } else { /* the smallest of the upper half */                                 \
                    const VT hi_ = blend_##SFX(x < y, y, x);                                  \
                    best = blend_##SFX(hi_ < best, hi_, best);                                \
                }                                                                             \
            }                                                                                 \
            return best;                                                                      \
        }                                                                                     \
        for (int half = p / 2; half > 0; half >>= 1) {                                        \
            for (int i = lo; i < lo + half; i++)                                              \
                cmpx_##SFX(a + i, a + i + half, 1);                                           \
            if (k <= half)                                                                    \
                lo += half; /* the k-th largest is in the upper half */                       \
            else                                                                              \
                k -= half;                                                                    \
        }                                                                                     \
        return a[lo];                                                                         \
    }

NM_NETWORK(f, nm_vf, nm_vm, HUGE_VALF)
NM_NETWORK(d, nm_vd, nm_vi, HUGE_VAL)

/* Which of r[0..m) (NM_W rows in lanes) are among the n largest, ties to the lower index
 * (numpy's stable argsort of -r), by counting ranks; and the (n+1)-th largest in *next. */
static inline __attribute__((always_inline)) void top_by_rank(const nm_vd *r, int m, int n,
                                                              nm_vi *top, nm_vd *next)
{
    *next = (nm_vd){0} - HUGE_VAL;
    for (int j = 0; j < m; j++) {
        const nm_vd rj = r[j];
        nm_vi rank = {0};
        for (int k = 0; k < j; k++)
            rank -= r[k] >= rj;
        for (int k = j + 1; k < m; k++)
            rank -= r[k] > rj;
        top[j] = rank < n;
        *next = nm_vblend_d(rank == n, rj, *next);
    }
}

#endif
