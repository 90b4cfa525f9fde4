/* Exact transposable N:M masks: max-weight bipartite b-matching per tile as min-cost flow.
 *
 * Network per tile: S -> row i (cap n), row i -> col j (cap 1, cost -s_ij), col j -> T (cap n)
 * and, for "at most n", a zero-cost bypass S -> T. Node potentials p keep the reduced costs
 * c + p(a) - p(b) >= 0 on every residual arc, and give the LP's dual prices
 * u_i = p(row i) - p(T), v_j = p(T) - p(col j) (clipped at 0, which only touches empty rows
 * and columns).
 *
 * 0. Warm start with a previous mask (nm_exact_warm.c, at M = 4 q4_fit4; matrices only): the
 *    previous column prices and a zero level are lowered until every row's previous choice
 *    is its top n of s - v on the new scores (a Bellman-Ford over the columns). If that
 *    succeeds the previous mask is optimal (complementary slackness) and the tile is done;
 *    else it is solved from the previous prices (at M = 4 from its own start). A sample of 64
 *    tiles decides whether the mask pays, and without it whether the prices do (else the
 *    call starts cold).
 * 1. Dual start (nm_exact_start.c): column prices v >= 0, from a previous solve (warm start)
 *    or from a few rounds of dual coordinate descent on the tile (0 with exactly n). Every row
 *    keeps its top n of s - v (values >= 0 only), u_i = its (n+1)-th largest; a column with
 *    a price keeps its full n flow to T. The result is dual feasible whatever v is; a good v
 *    leaves few units to move (16:32: 36 per tile from v = 0, 6.3 after six rounds).
 * 2. Successive shortest paths: each unit of excess (a column keeping more than its flow to
 *    T, or T receiving more than the rows keep) goes to a sink (a priced column keeping fewer,
 *    or T) along a shortest path (dense Dijkstra on reduced costs, stopped at the first
 *    sink), then the potentials move by the distances. The potentials are the prices: the
 *    certificate comes out of the algorithm.
 * 3. Self-check: mask valid and |bound(u, v) - kept| <= NM_GAP_TOL * kept. A tile that fails
 *    is re-solved by cycle cancelling (Bellman-Ford on true costs, negative cycles cheaper than
 *    NM_BF_EPS ignored) and re-checked against NM_FALLBACK_TOL; still failing -> status 2.
 *
 * Tolerance: each tile is scaled by a power of two (exact) so its largest score is in
 * [0.5, 1); no overflow up to DBL_MAX. Reduced costs are float64 sums of a few terms of size
 * <= ~1, clamped at 0, so complementary slackness holds to a few ulps per arc and the gap to
 * (m*m + 2m) ulps at worst; NM_GAP_TOL = 1e-12 relative covers it, the self-check enforces it.
 *
 * M = 4 has its own copy of steps 1-3 (q4_*, nm_exact_q4.c) with the tile in vector registers;
 * its tiles fall back to the general path when it cannot certify them.
 *
 * The hot loops are written with GCC vector extensions (NM_W lanes, nm_internal.h): with the
 * SIMD clones they become SSE4.2 / AVX2 code without data-dependent branches.
 *
 * This file: the entry point and the per-thread driver. The general path (steps 1-3 and the
 * slots that interleave tiles) is in nm_exact_general.c, step 0 in nm_exact_warm.c, the
 * fallback in nm_exact_fallback.c,
 * the M = 4 path in nm_exact_q4.c; their shared declarations in nm_internal.h.
 */
#include <math.h>
#include <stdlib.h>

#include "nm_internal.h"

double nm_gap_tol(void) { return NM_GAP_TOL; }
double nm_fallback_tol(void) { return NM_FALLBACK_TOL; }

/* About 16K scores: a block of tiles still in cache once solved, for its certificate. */
int64_t nm_cert_group(int m)
{
    const int64_t g = 16384 / ((int64_t)m * m);
    return g > 0 ? g : 1;
}

/* The certificates of cnt tiles (t) summed, in tile order, into entry g of out. */
static void cert_sum(const nm_cert *t, int64_t cnt, const nm_cert *out, int64_t g)
{
    double kept = 0.0, bound = 0.0;
    int64_t nshort = 0;
    int bad = 0;
    for (int64_t k = 0; k < cnt; k++) {
        kept += t->kept[k];
        bound += t->bound[k];
        nshort += t->nshort[k];
        bad |= t->bad[k] != 0;
        bad |= (!isfinite(t->bound[k]) && isfinite(t->kept[k])) << 1;
    }
    out->kept[g] = kept;
    out->bound[g] = bound;
    out->nshort[g] = (int32_t)nshort; /* at most 2m per tile */
    out->bad[g] = (int8_t)bad;
}

/* Row-wise N:M on tiles [lo, hi) of a matrix: every tile row keeps its top n (ties: lower
 * index) and is priced by its (n+1)-th largest score (0 when n = m); columns are free (v = 0).
 * Optimal by construction: the certificate checks it. */
static inline __attribute__((always_inline)) void rowwise_run(nm_exact_ctx *c, int64_t lo,
                                                               int64_t hi)
{
    const int m = c->m, n = c->n;
    double buf[NM_MAX_M * NM_MAX_M] NM_A64;
    uint8_t keep[NM_MAX_M];
    for (int64_t k = lo; k < hi; k++) {
        const double *s = nm_tile_scores(c, k, buf);
        double mx;
        if (nm_scan_scores(s, m * m, &mx)) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            return;
        }
        int64_t ors;
        uint8_t *out = nm_tile_mask_out(c, k, &ors);
        for (int i = 0; i < m; i++) {
            const double next = nm_row_topn(s + i * m, m, n, keep);
            memcpy(out + i * ors, keep, (size_t)m);
            nm_tile_u(c, k)[i] = next > 0.0 ? next : 0.0;
            c->v[k * m + i] = 0.0;
        }
        c->status[k] = NM_TILE_OK;
    }
}

/* The row prices of tiles [lo, hi) into u_rows: row r of tile (R, Q) at (R*m + r, Q). m is a
 * constant where the caller specialises; the tile's place is stepped, not divided out. */
static inline __attribute__((always_inline)) void rows_out(const nm_exact_ctx *c, int64_t lo,
                                                            int64_t hi, const int m)
{
    const int64_t tc = c->src.tcols;
    int64_t r, q;
    nm_tile_place(&c->src, lo, &r, &q);
    for (int64_t k = lo; k < hi; k++) {
        double *out = c->u_rows + r * m * tc + q;
        const double *u = nm_tile_u(c, k);
        for (int i = 0; i < m; i++)
            out[i * tc] = u[i];
        if (++q == tc) {
            q = 0;
            r++;
        }
    }
}

/* Tiles [lo, hi) on one thread, with a workspace of its own: the M = 4 path unless a flag
 * asks for the general one, else the general path. Without u (only u_rows), the row prices
 * of each block go to a buffer of the thread's own; with the certificate by groups, the
 * tiles' certificates too. */
NM_SIMD_CLONES static void exact_task(void *vctx, int64_t lo, int64_t hi)
{
    nm_exact_ctx *shared = (nm_exact_ctx *)vctx;
    nm_exact_ctx local = *shared, *c = &local; /* errors go to shared->err after each block */
    const int own_u = !shared->u, groups = c->cert.kept && (c->flags & NM_FLAG_CERT_GROUPS);
    /* with a certificate or a buffer: blocks of one certificate group, still in cache after
     * (nm_exact_matrix then hands out whole groups, so block b / block is group b / block) */
    const int64_t block = c->cert.kept || own_u ? nm_cert_group(c->m) : hi - lo;
    nm_slot *slots = nm_slots_alloc(c->m);
    double *ubuf = own_u ? malloc(sizeof(double) * (size_t)(block * c->m)) : NULL;
    char *cbuf = groups ? malloc((2 * sizeof(double) + sizeof(int32_t) + 1) * (size_t)block)
                        : NULL;
    if (!slots || (own_u && !ubuf) || (groups && !cbuf)) {
        if (slots)
            nm_slots_free(slots);
        free(ubuf);
        free(cbuf);
        nm_set_error(&shared->err, NM_ERR_NOMEM);
        return;
    }
    nm_cert tiles_cert = {0};
    if (cbuf) { /* kept, bound (double), nshort (int32), bad (int8): block of each */
        double *d = (double *)cbuf;
        int32_t *ns = (int32_t *)(d + 2 * block);
        tiles_cert = (nm_cert){d, d + block, ns, (int8_t *)(ns + block)};
    }
    const int q4 = c->m == 4 && !(c->flags & (NM_FLAG_FORCE_FALLBACK | NM_FLAG_COLD_FALLBACK |
                                              NM_FLAG_GENERAL_PATH));
    for (int64_t b = lo; b < hi && nm_get_error(&shared->err) == NM_OK; b += block) {
        const int64_t e = b + block < hi ? b + block : hi;
        if (own_u) {
            c->u = ubuf;
            c->u_first = b;
        }
        if (c->flags & NM_FLAG_ROWWISE)
            rowwise_run(c, b, e);
        else if (q4)
            nm_q4_run(c, slots, b, e);
        else
            nm_general_run(c, slots, b, e);
        if (c->flags & NM_FLAG_BREAK_MASK) {
            int64_t rs;
            memset(nm_tile_mask_out(c, b, &rs), 1, (size_t)c->m);
        }
        if (c->flags & NM_FLAG_INF_PRICES)
            c->v[b * c->m] = HUGE_VAL;
        if (c->flags & NM_FLAG_ZERO_PRICES)
            for (int64_t k = b; k < e; k++)
                for (int i = 0; i < c->m; i++)
                    nm_tile_u(c, k)[i] = c->v[k * c->m + i] = 0.0;
        if (c->cert.kept && c->err == NM_OK) {
            const nm_cert out = groups ? tiles_cert
                                       : (nm_cert){c->cert.kept + b, c->cert.bound + b,
                                                   c->cert.nshort + b, c->cert.bad + b};
            const int rc = nm_certify_range(&c->src, &out, c->m, c->n, c->sat,
                                            (c->flags & NM_FLAG_ROWWISE) != 0, c->mask,
                                            c->mask_rs, nm_tile_u(c, b), c->v + b * c->m, b, e);
            if (rc != NM_OK)
                nm_set_error(&c->err, rc);
            else if (groups)
                cert_sum(&tiles_cert, e - b, &c->cert, b / block);
        }
        if (c->u_rows && c->m == 4)
            rows_out(c, b, e, 4); /* its loops unroll */
        else if (c->u_rows)
            rows_out(c, b, e, c->m);
        if (c->err != NM_OK) {
            nm_set_error(&shared->err, c->err);
            break;
        }
    }
    free(ubuf);
    free(cbuf);
    nm_slots_free(slots);
}

/* An nm_exact_ctx for the scalar parameters (the scores and outputs are the caller's). */
static nm_exact_ctx exact_ctx(int m, int n, int saturate, int flags, uint8_t *mask, double *u,
                              double *v, int8_t *status)
{
    nm_exact_ctx c = {0};
    c.m = m;
    c.n = n;
    c.sat = saturate != 0;
    c.flags = flags;
    c.mask = mask;
    c.u = u;
    c.v = v;
    c.status = status;
    return c;
}

int nm_exact(const double *tiles, int64_t t, int m, int n, int saturate, int flags,
             uint8_t *mask, double *u, double *v, int8_t *status, int nthreads)
{
    if (t < 0 || m < 1 || m > NM_MAX_M || n < 1 || n > m || nthreads < 1)
        return NM_ERR_ARG;
    if (t == 0)
        return NM_OK;
    if (!tiles || !mask || !u || !v || !status)
        return NM_ERR_ARG;
    nm_exact_ctx c = exact_ctx(m, n, saturate, flags, mask, u, v, status);
    c.tiles = tiles;
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 16, 1), exact_task, &c);
    return c.err;
}

/* A warm start keeps the previous mask in view only while the fit proves it optimal on at
 * least half of a sample of tiles: a tile whose fit fails pays for it on top of its paths (at
 * 16:32 about a third of a solve), and the paths alone start as well from the previous
 * prices. Measured on 2048² N(0,1) (warm/cold, with the mask / prices only): 8:16 at 1.2% of
 * the mask changed, share 0.58, 0.51 / 0.52; 16:32 at 1.2%, share 0.17, 0.57 / 0.42.
 * Calls of fewer tiles always keep it (the sample would be most of the work). */
#define NM_WARM_PROBE_MIN 0.5
/* At M = 4 a failing fit costs about a solve of its own (2048², one thread, 1e-1 noise: 27%
 * of the tiles changed, warm 1.05x cold with the mask): the mask pays from 0.85 on. */
#define NM_WARM_PROBE_MIN_Q4 0.85
#define NM_WARM_PROBE_TILES 256
/* Without the mask, the previous prices still pay while they leave at most twice the units
 * to move of the tiles' own start (they save its price rounds). Measured on 2048² (units
 * previous / own, warm / cold time with the prices): 16:32 at noise 1e-1, 1.55, 0.80; at 1,
 * 4.0, 1.7. 8:16: 1.64, 0.86; 3.4, 1.69. 4:8: 2.2, 0.97; 3.0, 1.71. */
#define NM_WARM_PROBE_UNITS 2.0

int nm_exact_matrix(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
                    int64_t rs, int64_t cs, int m, int n, int saturate, int flags,
                    const double *warm_v, const uint8_t *warm_x, int64_t warm_x_rs,
                    uint8_t *mask, int64_t mask_rs, double *u, double *v, double *u_rows,
                    int8_t *status, double *kept, double *bound, int32_t *nshort, int8_t *bad,
                    int nthreads)
{
    if (!nm_matrix_args_ok(dtype, rows, cols, m, n, mask_rs, nthreads) ||
        (warm_x && warm_x_rs < cols))
        return NM_ERR_ARG;
    const int64_t t = (rows / m) * (cols / m);
    if (t == 0)
        return NM_OK;
    if (!data || !mask || (!u && !u_rows) || !v || !status)
        return NM_ERR_ARG;
    nm_exact_ctx c = exact_ctx(m, n, saturate, flags, mask, u, v, status);
    c.src = (nm_src){data, dtype, absolute != 0, rs, cs, cols / m, nm_src_tdiv(cols / m, t)};
    c.mask_rs = mask_rs;
    c.u_rows = u_rows;
    c.warm_v = saturate ? NULL : warm_v;
    c.warm_x = c.warm_v ? warm_x : NULL;
    c.warm_x_rs = warm_x_rs;
    if (c.warm_x && n < m && t >= NM_WARM_PROBE_TILES && !(flags & NM_FLAG_ROWWISE)) {
        nm_slot *slots = nm_slots_alloc(m);
        if (!slots)
            return NM_ERR_NOMEM;
        double units;
        const double least = m == 4 ? NM_WARM_PROBE_MIN_Q4 : NM_WARM_PROBE_MIN;
        if (nm_warm_probe(slots, &c, t, &units) < least) {
            c.warm_x = NULL; /* most masks changed: start from the prices only */
            if (units > NM_WARM_PROBE_UNITS)
                c.warm_v = NULL; /* or cold, when they are far from the new optimum */
        }
        nm_slots_free(slots);
    }
    if (kept && bound && nshort && bad)
        c.cert = (nm_cert){kept, bound, nshort, bad};
    int64_t grain = nm_grain(t, nthreads, 16, 1);
    if (c.cert.kept) { /* whole groups per thread (by tile too: the same blocks either way) */
        const int64_t g = nm_cert_group(m);
        grain = (grain + g - 1) / g * g;
    }
    nm_parallel_for(nthreads, t, grain, exact_task, &c);
    return c.err;
}
