/* Selection kernels: the transposable greedy and row-wise top-N, bit for bit as the numpy
 * reference (descending score, ties to the lower row-major index). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_internal.h"

/* Sort key: ascending key == descending score. -0.0 and +0.0 share a key, as they compare
 * equal in numpy's argsort. */
static inline uint64_t desc_key(double s)
{
    uint64_t b;
    if (s == 0.0)
        s = 0.0;
    memcpy(&b, &s, sizeof b);
    b = (b >> 63) ? ~b : (b | 0x8000000000000000ULL); /* ascending in s */
    return ~b;
}

/* Stable ascending sort of (key, idx) pairs; returns 1 if the result sits in the second
 * buffers (k2, i2), 0 if in the first. */
static int sort_pairs(uint64_t *k1, uint16_t *i1, uint64_t *k2, uint16_t *i2, int len)
{
    if (len <= 64) { /* insertion sort: stable, cheap for tiny tiles */
        for (int a = 1; a < len; a++) {
            uint64_t k = k1[a];
            uint16_t x = i1[a];
            int b = a;
            while (b > 0 && k1[b - 1] > k) {
                k1[b] = k1[b - 1];
                i1[b] = i1[b - 1];
                b--;
            }
            k1[b] = k;
            i1[b] = x;
        }
        return 0;
    }
    /* LSD radix sort, 8 bits per pass, skipping digits that are the same for every key. */
    uint32_t hist[8][256];
    memset(hist, 0, sizeof hist);
    for (int a = 0; a < len; a++) {
        uint64_t k = k1[a];
        for (int d = 0; d < 8; d++)
            hist[d][(k >> (8 * d)) & 255]++;
    }
    int flipped = 0;
    uint64_t *ks = k1, *kd = k2;
    uint16_t *is = i1, *id = i2;
    for (int d = 0; d < 8; d++) {
        uint32_t *h = hist[d];
        if (h[(ks[0] >> (8 * d)) & 255] == (uint32_t)len)
            continue;
        uint32_t sum = 0;
        for (int b = 0; b < 256; b++) {
            uint32_t c = h[b];
            h[b] = sum;
            sum += c;
        }
        for (int a = 0; a < len; a++) {
            uint32_t pos = h[(ks[a] >> (8 * d)) & 255]++;
            kd[pos] = ks[a];
            id[pos] = is[a];
        }
        uint64_t *kt = ks; ks = kd; kd = kt;
        uint16_t *it = is; is = id; id = it;
        flipped ^= 1;
    }
    return flipped;
}

typedef struct {
    const double *tiles;
    int m, n;
    uint8_t *mask;
    int err;
} sel_ctx;

/* Visit entries in `order`, keeping one while its row and column hold fewer than n. */
static inline __attribute__((always_inline)) void greedy_scan(const uint16_t *order, int m, int n,
                                                              const uint8_t *rowof,
                                                              const uint8_t *colof,
                                                              uint8_t *keep)
{
    const int mm = m * m;
    uint8_t rows[NM_MAX_M] = {0}, cols[NM_MAX_M] = {0};
    memset(keep, 0, (size_t)mm);
    if (mm <= 64) { /* branch-free: the decisions are unpredictable */
        for (int a = 0; a < mm; a++) {
            const int e = order[a], r = rowof[e], c = colof[e];
            const uint8_t ok = (rows[r] < n) & (cols[c] < n);
            keep[e] = ok;
            rows[r] += ok;
            cols[c] += ok;
        }
        return;
    }
    int kept = 0;
    const int full = n * m;
    for (int a = 0; a < mm && kept < full; a++) {
        const int e = order[a], r = rowof[e], c = colof[e];
        if (rows[r] < n && cols[c] < n) {
            keep[e] = 1;
            rows[r]++;
            cols[c]++;
            kept++;
        }
    }
}

NM_SIMD_CLONES static void greedy_task(void *vctx, int64_t lo, int64_t hi)
{
    sel_ctx *c = (sel_ctx *)vctx;
    const int m = c->m, n = c->n, mm = m * m;
    if (m < 1 || m > NM_MAX_M)
        return;
    uint64_t *keys = (uint64_t *)malloc(2 * (size_t)mm * sizeof(uint64_t));
    uint16_t *idx = (uint16_t *)malloc(2 * (size_t)mm * sizeof(uint16_t));
    uint8_t *rowof = (uint8_t *)malloc((size_t)mm), *colof = (uint8_t *)malloc((size_t)mm);
    if (!keys || !idx || !rowof || !colof) {
        nm_set_error(&c->err, NM_ERR_NOMEM);
        goto done;
    }
    for (int e = 0; e < mm; e++) {
        rowof[e] = (uint8_t)(e / m);
        colof[e] = (uint8_t)(e % m);
    }
    for (int64_t t = lo; t < hi; t++) {
        const double *s = c->tiles + t * mm;
        uint8_t *keep = c->mask + t * mm;
        int bad = 0;
        for (int a = 0; a < mm; a++)
            bad |= !(s[a] - s[a] == 0.0); /* NaN or infinite */
        if (bad) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            goto done;
        }
        const uint16_t *order;
        if (mm <= 64) {
            /* rank_e = #{f : s_f > s_e} + #{f < e : s_f == s_e}, a permutation, counted for NM_W
             * entries e at a time (vector lanes); one comparison kind per loop keeps the
             * vector code clean, the few in-block ties are counted in scalar code */
            double pad[64] __attribute__((aligned(64)));
            memset(pad, 0, sizeof pad);
            memcpy(pad, s, (size_t)mm * sizeof(double));
            for (int e0 = 0; e0 < mm; e0 += NM_W) {
                nm_vd se;
                memcpy(&se, pad + e0, sizeof se); /* lanes past mm: ignored below */
                nm_vi rank = {0};
                for (int f = 0; f < mm; f++)
                    rank -= ((nm_vd){0} + s[f]) > se;
                for (int f = 0; f < e0; f++)
                    rank -= ((nm_vd){0} + s[f]) == se;
                for (int q = 0; q < NM_W && e0 + q < mm; q++) {
                    int64_t r = rank[q];
                    for (int f = e0; f < e0 + q; f++)
                        r += s[f] == s[e0 + q];
                    idx[r] = (uint16_t)(e0 + q);
                }
            }
            order = idx;
        } else {
            for (int a = 0; a < mm; a++) {
                keys[a] = desc_key(s[a]);
                idx[a] = (uint16_t)a;
            }
            order = sort_pairs(keys, idx, keys + mm, idx + mm, mm) ? idx + mm : idx;
        }
        greedy_scan(order, m, n, rowof, colof, keep);
    }
done:
    free(keys);
    free(idx);
    free(rowof);
    free(colof);
}

static int check_tile_args(const double *tiles, int64_t t, int m, int n, const void *out,
                           int nthreads)
{
    if (t < 0 || m < 1 || m > NM_MAX_M || n < 1 || n > m || nthreads < 1)
        return NM_ERR_ARG;
    if (t > 0 && (!tiles || !out))
        return NM_ERR_ARG;
    return NM_OK;
}

/* Check the arguments, then run a selection task over the tiles on nthreads threads. */
static int run_select(nm_task_fn task, const double *tiles, int64_t t, int m, int n,
                      uint8_t *mask, int nthreads)
{
    int rc = check_tile_args(tiles, t, m, n, mask, nthreads);
    if (rc != NM_OK || t == 0)
        return rc;
    sel_ctx c = {tiles, m, n, mask, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 8, 1), task, &c);
    return c.err;
}

int nm_greedy(const double *tiles, int64_t t, int m, int n, uint8_t *mask, int nthreads)
{
    return run_select(greedy_task, tiles, t, m, n, mask, nthreads);
}

NM_SIMD_CLONES static void rowwise_task(void *vctx, int64_t lo, int64_t hi)
{
    sel_ctx *c = (sel_ctx *)vctx;
    const int m = c->m, n = c->n, mm = m * m;
    for (int64_t t = lo; t < hi; t++) {
        const double *s = c->tiles + t * mm;
        uint8_t *keep = c->mask + t * mm;
        for (int a = 0; a < mm; a++) {
            if (!isfinite(s[a])) {
                nm_set_error(&c->err, NM_ERR_VALUE);
                return;
            }
        }
        for (int r = 0; r < m; r++)
            nm_row_topn(s + r * m, m, n, keep + r * m);
    }
}

int nm_rowwise(const double *tiles, int64_t t, int m, int n, uint8_t *mask, int nthreads)
{
    return run_select(rowwise_task, tiles, t, m, n, mask, nthreads);
}
