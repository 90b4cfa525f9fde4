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

struct nm_greedy_ws {
    int m;
    uint64_t *keys;
    uint16_t *idx;
    uint8_t *rowof, *colof;
};

nm_greedy_ws *nm_greedy_ws_alloc(int m)
{
    const int mm = m * m;
    if (m < 1 || m > NM_MAX_M)
        return NULL;
    nm_greedy_ws *ws = (nm_greedy_ws *)calloc(1, sizeof *ws);
    if (!ws)
        return NULL;
    ws->m = m;
    ws->keys = (uint64_t *)malloc(2 * (size_t)mm * sizeof(uint64_t));
    ws->idx = (uint16_t *)malloc(2 * (size_t)mm * sizeof(uint16_t));
    ws->rowof = (uint8_t *)malloc((size_t)mm);
    ws->colof = (uint8_t *)malloc((size_t)mm);
    if (!ws->keys || !ws->idx || !ws->rowof || !ws->colof) {
        nm_greedy_ws_free(ws);
        return NULL;
    }
    for (int e = 0; e < mm; e++) {
        ws->rowof[e] = (uint8_t)(e / m);
        ws->colof[e] = (uint8_t)(e % m);
    }
    return ws;
}

void nm_greedy_ws_free(nm_greedy_ws *ws)
{
    if (!ws)
        return;
    free(ws->keys);
    free(ws->idx);
    free(ws->rowof);
    free(ws->colof);
    free(ws);
}

NM_SIMD_CLONES void nm_greedy_tile(nm_greedy_ws *ws, const double *s, int n, uint8_t *keep)
{
    const int m = ws->m, mm = m * m;
    if (m < 1 || m > NM_MAX_M) /* never (nm_greedy_ws_alloc checks it): for the compiler */
        return;
    uint16_t *idx = ws->idx;
    const uint16_t *order;
    if (mm <= 64) {
        /* rank_e = #{f : s_f > s_e} + #{f < e : s_f == s_e}, a permutation, counted for NM_W
         * entries e at a time (vector lanes); one comparison kind per loop keeps the vector
         * code clean, the few in-block ties are counted in scalar code */
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
        uint64_t *keys = ws->keys;
        for (int a = 0; a < mm; a++) {
            keys[a] = desc_key(s[a]);
            idx[a] = (uint16_t)a;
        }
        order = sort_pairs(keys, idx, keys + mm, idx + mm, mm) ? idx + mm : idx;
    }
    greedy_scan(order, m, n, ws->rowof, ws->colof, keep);
}

NM_SIMD_CLONES static void greedy_task(void *vctx, int64_t lo, int64_t hi)
{
    sel_ctx *c = (sel_ctx *)vctx;
    const int m = c->m, mm = m * m;
    nm_greedy_ws *ws = nm_greedy_ws_alloc(m);
    if (!ws) {
        nm_set_error(&c->err, NM_ERR_NOMEM);
        return;
    }
    for (int64_t t = lo; t < hi; t++) {
        const double *s = c->tiles + t * mm;
        int bad = 0;
        for (int a = 0; a < mm; a++)
            bad |= !(s[a] - s[a] == 0.0); /* NaN or infinite */
        if (bad) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            break;
        }
        nm_greedy_tile(ws, s, c->n, c->mask + t * mm);
    }
    nm_greedy_ws_free(ws);
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

typedef struct {
    nm_src src;
    int m, n, sweeps, nstarts;
    const double *starts;
    uint8_t *mask;
    int64_t mask_rs;
    double *u, *v;
    int err;
} greedy_matrix_ctx;

NM_SIMD_CLONES static void greedy_matrix_task(void *vctx, int64_t lo, int64_t hi)
{
    greedy_matrix_ctx *c = (greedy_matrix_ctx *)vctx;
    const int m = c->m;
    double s[NM_MAX_M * NM_MAX_M] NM_A64;
    uint8_t keep[NM_MAX_M * NM_MAX_M];
    nm_greedy_ws *ws = nm_greedy_ws_alloc(m);
    if (!ws) {
        nm_set_error(&c->err, NM_ERR_NOMEM);
        return;
    }
    for (int64_t k = lo; k < hi; k++) {
        nm_read_tile(&c->src, m, k, s);
        double mx;
        if (nm_scan_scores(s, m * m, &mx)) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            break;
        }
        nm_greedy_tile(ws, s, c->n, keep);
        int64_t tr, tq;
        nm_tile_place(&c->src, k, &tr, &tq);
        uint8_t *out = c->mask + tr * m * c->mask_rs + tq * m;
        for (int i = 0; i < m; i++)
            memcpy(out + i * c->mask_rs, keep + i * m, (size_t)m);
        nm_descent_tile(s, m, c->n, c->sweeps, c->starts, c->nstarts, c->u + k * m, c->v + k * m);
    }
    nm_greedy_ws_free(ws);
}

int nm_greedy_matrix(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
                     int64_t rs, int64_t cs, int m, int n, int sweeps, const double *starts,
                     int nstarts, uint8_t *mask, int64_t mask_rs, double *u, double *v,
                     int nthreads)
{
    if (!nm_matrix_args_ok(dtype, rows, cols, m, n, mask_rs, nthreads) ||
        !nm_descent_args_ok(sweeps, starts, nstarts))
        return NM_ERR_ARG;
    const int64_t t = (rows / m) * (cols / m);
    if (t == 0)
        return NM_OK;
    if (!data || !mask || !u || !v)
        return NM_ERR_ARG;
    greedy_matrix_ctx c = {{data, dtype, absolute != 0, rs, cs, cols / m, nm_src_tdiv(cols / m, t)},
                           m, n, sweeps, nstarts, starts, mask, mask_rs, u, v, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 16, 64), greedy_matrix_task, &c);
    return c.err;
}
