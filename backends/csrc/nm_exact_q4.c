/* Exact solver, M = 4 path (1:4, 2:4, 3:4, 4:4): the algorithm of nm_exact.c with the tile in
 * registers.
 *
 * A 4 x 4 tile is four NM_W-lane vectors, so the scores, the mask, and the potentials and
 * Dijkstra distances of the rows and of the columns are a vector each, with S and T as
 * scalars: a Dijkstra step is a handful of vector operations instead of passes over the
 * padded node arrays of the general path. Same start (with v = 0), potentials and self-check,
 * and the warm start's fit (step 0) in registers too. A tile this path does not certify, an
 * all-zero tile and a tile whose scale is not a normal power of two go through the general
 * path (and its fallback) instead. */
#include <math.h>
#include <string.h>

#include "nm_internal.h"

#define LANE NM_LANE
#define Q4_S 4 /* predecessor codes of S and T (rows and columns: 0..3, the source: -1) */
#define Q4_T 5
_Static_assert(NM_W == 4, "the M = 4 path holds one tile row per vector");

typedef struct {
    nm_vd s[4], sT[4];       /* scaled scores by row, and by column (sT[j][i] = s[i][j]) */
    nm_vi x[4], xT[4];       /* kept flags (0 / -1) by row, and by column */
    nm_vi rdeg, cdeg, cflow; /* lanes: rows; columns; columns (flow on column -> T) */
    nm_vd pr, pc;            /* potentials of the rows and of the columns */
    double pS, pT;
    int n, sat, nkept; /* nkept: kept entries (the bypass S -> T carries 4n - nkept) */
} q4_t;

static inline __attribute__((always_inline)) void q4_transpose(const nm_vi *r, nm_vi *c)
{
    const nm_vi t0 = __builtin_shuffle(r[0], r[1], (nm_vi){0, 4, 2, 6});
    const nm_vi t1 = __builtin_shuffle(r[0], r[1], (nm_vi){1, 5, 3, 7});
    const nm_vi t2 = __builtin_shuffle(r[2], r[3], (nm_vi){0, 4, 2, 6});
    const nm_vi t3 = __builtin_shuffle(r[2], r[3], (nm_vi){1, 5, 3, 7});
    c[0] = __builtin_shuffle(t0, t2, (nm_vi){0, 1, 4, 5});
    c[1] = __builtin_shuffle(t1, t3, (nm_vi){0, 1, 4, 5});
    c[2] = __builtin_shuffle(t0, t2, (nm_vi){2, 3, 6, 7});
    c[3] = __builtin_shuffle(t1, t3, (nm_vi){2, 3, 6, 7});
}

static inline __attribute__((always_inline)) nm_vd vmax0(nm_vd r)
{
    return nm_vblend_d(r > (nm_vd){0}, r, (nm_vd){0}); /* max(r, 0), as +0.0 */
}

static inline __attribute__((always_inline)) double max0(double r) { return r > 0.0 ? r : 0.0; }

/* Lane-wise k-th largest (1 <= k <= 4) of four vectors: the 5-comparator sorting network. */
static inline __attribute__((always_inline)) nm_vd q4_kth(nm_vd a0, nm_vd a1, nm_vd a2,
                                                          nm_vd a3, int k)
{
#define Q4_CX(x, y)                                                                           \
    do {                                                                                      \
        const nm_vi lt_ = (x) < (y);                                                          \
        const nm_vd lo_ = nm_vblend_d(lt_, x, y);                                             \
        y = nm_vblend_d(lt_, y, x);                                                           \
        x = lo_;                                                                              \
    } while (0)
    Q4_CX(a0, a1);
    Q4_CX(a2, a3);
    Q4_CX(a0, a2);
    Q4_CX(a1, a3);
    Q4_CX(a1, a2);
#undef Q4_CX
    return k == 1 ? a3 : k == 2 ? a2 : k == 3 ? a1 : a0; /* ascending */
}

/* The column prices of one round of the dual start's coordinate descent (nm_exact_start.c):
 * u_i = max(0, (n+1)-th largest of row i), v_j = max(0, n-th largest of s_ij - u_i). */
static inline __attribute__((always_inline)) nm_vd q4_round(const q4_t *q)
{
    const nm_vd u = vmax0(q4_kth(q->sT[0], q->sT[1], q->sT[2], q->sT[3], q->n + 1));
    return vmax0(q4_kth(q->s[0] - u[0], q->s[1] - u[1], q->s[2] - u[2], q->s[3] - u[3], q->n));
}

/* The dual start from column prices v (as nm_dual_start): every row keeps its top n of s - v
 * (ties to the lower index; at most n: values >= 0 only), priced at its (n+1)-th largest;
 * the ranks of the four rows are counted at once. A priced column keeps its full flow n. */
static inline __attribute__((always_inline)) void q4_start(q4_t *q, nm_vd v)
{
    const nm_vi n = (nm_vi){0} + q->n, all = (nm_vi){0} - 1;
    nm_vd r[4], next = (nm_vd){0} - HUGE_VAL;
    for (int j = 0; j < 4; j++)
        r[j] = q->sT[j] - v[j];
    for (int j = 0; j < 4; j++) {
        nm_vi rank = {0};
        for (int k = 0; k < 4; k++) {
            if (k < j)
                rank -= r[k] >= r[j];
            else if (k > j)
                rank -= r[k] > r[j];
        }
        q->xT[j] = (rank < n) & (q->sat ? all : r[j] >= (nm_vd){0});
        next = nm_vblend_d(rank == n, r[j], next);
    }
    q4_transpose(q->xT, q->x);
    q->pr = vmax0(next);
    q->pc = -v;
    q->pS = q->pT = 0.0;
    q->rdeg = -(q->xT[0] + q->xT[1] + q->xT[2] + q->xT[3]);
    q->cdeg = -(q->x[0] + q->x[1] + q->x[2] + q->x[3]);
    q->nkept = (int)nm_hsum_i(q->rdeg);
    q->cflow = nm_vblend_i(v > (nm_vd){0}, n, nm_vblend_i(q->cdeg < n, q->cdeg, n));
}

/* Keep (i, j) (keep = -1) or drop it (keep = 0). */
static inline __attribute__((always_inline)) void q4_set(q4_t *q, int i, int j, int64_t keep)
{
    q->x[i][j] = keep;
    q->xT[j][i] = keep;
    const int64_t d = keep ? 1 : -1;
    q->rdeg[i] += d;
    q->cdeg[j] += d;
    q->nkept += (int)d;
}

/* One shortest path (Dijkstra on reduced costs) from the source (column src with excess, or
 * T when src < 0) to the first sink it settles: a priced column short of its flow, or T
 * itself (tsink); then the potentials move by the distances and one unit goes along the
 * path. 0 when no sink can be reached or the path is malformed. */
static inline __attribute__((always_inline)) int q4_path(q4_t *q, int src, int tsink)
{
    enum { ROW, COL, NODE_S4, NODE_T4 };
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    const nm_vi n = (nm_vi){0} + q->n;
    const nm_vi deficit = q->cdeg < q->cflow;
    nm_vd dr = inf, dc = inf;
    nm_vi doner = {0}, donec = {0}, prevr = {0}, prevc = {0};
    double dS = HUGE_VAL, dT = HUGE_VAL;
    int doneS = 0, doneT = 0, prevS = 0, prevT = -1;
    int kind = src < 0 ? NODE_T4 : COL, a = src, sink_kind = -1;
    if (src < 0) {
        dT = 0.0;
    } else {
        dc[src] = 0.0;
        prevc[src] = -1;
    }
    for (int step = 0; step < 10; step++) { /* at most the 10 nodes */
        double da;
        if (kind == COL) { /* column a -> rows along kept arcs (cost s_ia); -> T if it has room */
            donec |= LANE == a;
            da = dc[a];
            const nm_vd cand = da + vmax0(q->sT[a] + q->pc[a] - q->pr);
            const nm_vi upd = q->xT[a] & ~doner & (cand < dr);
            dr = nm_vblend_d(upd, cand, dr);
            prevr = nm_vblend_i(upd, (nm_vi){0} + a, prevr);
            if (!doneT && q->cflow[a] < q->n) {
                const double ct = da + max0(q->pc[a] - q->pT);
                if (ct < dT) {
                    dT = ct;
                    prevT = a;
                }
            }
        } else if (kind == ROW) { /* row a -> columns along unkept arcs; -> S if not empty */
            doner |= LANE == a;
            da = dr[a];
            const nm_vd cand = da + vmax0(q->pr[a] - q->s[a] - q->pc);
            const nm_vi upd = ~q->x[a] & ~donec & (cand < dc);
            dc = nm_vblend_d(upd, cand, dc);
            prevc = nm_vblend_i(upd, (nm_vi){0} + a, prevc);
            if (!doneS && q->rdeg[a] > 0) {
                const double cs = da + max0(q->pr[a] - q->pS);
                if (cs < dS) {
                    dS = cs;
                    prevS = a;
                }
            }
        } else if (kind == NODE_S4) { /* S -> rows with room; -> T (at most n) */
            doneS = 1;
            da = dS;
            const nm_vd cand = da + vmax0(q->pS - q->pr);
            const nm_vi upd = (q->rdeg < n) & ~doner & (cand < dr);
            dr = nm_vblend_d(upd, cand, dr);
            prevr = nm_vblend_i(upd, (nm_vi){0} + Q4_S, prevr);
            if (!q->sat && !doneT) {
                const double ct = da + max0(q->pS - q->pT);
                if (ct < dT) {
                    dT = ct;
                    prevT = Q4_S;
                }
            }
        } else { /* T -> columns with flow; -> S while the bypass carries flow */
            doneT = 1;
            da = dT;
            const nm_vd cand = da + vmax0(q->pT - q->pc);
            const nm_vi upd = (q->cflow > (nm_vi){0}) & ~donec & (cand < dc);
            dc = nm_vblend_d(upd, cand, dc);
            prevc = nm_vblend_i(upd, (nm_vi){0} + Q4_T, prevc);
            if (!q->sat && !doneS && q->nkept < 4 * q->n) {
                const double cs = da + max0(q->pT - q->pS);
                if (cs < dS) {
                    dS = cs;
                    prevS = Q4_T;
                }
            }
        }
        if (tsink && dT <= da) { /* T is the least unsettled node: the path is found */
            sink_kind = NODE_T4;
            break;
        }
        /* the least unsettled row or column: keys are distances (>= 0, as bits) with the
         * node in the low 3 bits, so near-ties (8 ulps) break arbitrarily, as in lanes_min */
        const nm_vi low = (nm_vi){0} + 7;
        const nm_vi kr = ((nm_vi)nm_vblend_d(doner, inf, dr) & ~low) | LANE;
        const nm_vi kc = ((nm_vi)nm_vblend_d(donec, inf, dc) & ~low) | (LANE + 4);
        nm_vi k = nm_vblend_i(kr < kc, kr, kc);
        nm_vi o = __builtin_shuffle(k, (nm_vi){2, 3, 0, 1});
        k = nm_vblend_i(k < o, k, o);
        o = __builtin_shuffle(k, (nm_vi){1, 0, 3, 2});
        k = nm_vblend_i(k < o, k, o);
        const int node = (int)(k[0] & 7);
        const double best = node < 4 ? dr[node] : dc[node - 4];
        const double bs = doneS ? HUGE_VAL : dS, bt = doneT ? HUGE_VAL : dT;
        if (bt <= best && bt <= bs) {
            if (bt == HUGE_VAL)
                return 0; /* nothing is left to reach: impossible, the general path decides */
            if (tsink) {
                sink_kind = NODE_T4;
                break;
            }
            kind = NODE_T4;
        } else if (bs < best) {
            kind = NODE_S4;
        } else {
            kind = node < 4 ? ROW : COL;
            a = node & 3;
            if (kind == COL && deficit[a]) {
                sink_kind = COL;
                break;
            }
        }
    }
    if (sink_kind < 0)
        return 0;
    /* potentials += min(dist, dist(sink)) */
    const double dk = sink_kind == COL ? dc[a] : dT;
    const nm_vd dkv = (nm_vd){0} + dk;
    q->pr += nm_vblend_d(dr < dkv, dr, dkv);
    q->pc += nm_vblend_d(dc < dkv, dc, dkv);
    q->pS += dS < dk ? dS : dk;
    q->pT += dT < dk ? dT : dk;
    /* walk back from the sink */
    kind = sink_kind;
    for (int step = 0; step < 12; step++) {
        if (kind == COL) {
            const int i = (int)prevc[a];
            if (i < 0)
                return a == src;
            if (i == Q4_T) { /* T -> column a: less flow to T */
                q->cflow[a]--;
                kind = NODE_T4;
            } else {
                q4_set(q, i, a, -1); /* row i -> column a: keep */
                kind = ROW;
                a = i;
            }
        } else if (kind == ROW) {
            const int j = (int)prevr[a];
            if (j == Q4_S) {
                kind = NODE_S4; /* S -> row a: the row's degree follows its arcs */
            } else {
                q4_set(q, a, j, 0); /* column j -> row a: drop */
                kind = COL;
                a = j;
            }
        } else if (kind == NODE_S4) {
            if (prevS == Q4_T) {
                kind = NODE_T4; /* T -> S: the bypass follows the kept count */
            } else {
                kind = ROW;
                a = prevS; /* row -> S */
            }
        } else {
            if (prevT < 0)
                return src < 0;
            if (prevT == Q4_S) {
                kind = NODE_S4;
            } else {
                kind = COL;
                a = prevT;
                q->cflow[a]++;
            }
        }
    }
    return 0;
}

/* Results of the M = 4 path on a tile. Q4_SOLVED: mask, prices and status written (q4_load:
 * loaded); Q4_SKIPPED: an all-zero or extreme-scale tile, for the general path;
 * Q4_UNCERTIFIED: this path could not certify it (the general path takes over, status 1); or
 * NM_ERR_VALUE: a score is NaN, infinite or negative. */
enum { Q4_SKIPPED, Q4_SOLVED, Q4_UNCERTIFIED };

/* Tile k's scores into s (by row), scaled by 2^-e so that the largest is in [0.5, 1):
 * Q4_SOLVED (loaded), Q4_SKIPPED (all zero or an extreme scale) or NM_ERR_VALUE. */
static inline __attribute__((always_inline)) int q4_load(const nm_exact_ctx *c, int64_t k,
                                                         nm_vd *s, int *e)
{
    double buf[16] NM_A64;
    const double *src = nm_tile_scores_m(c, k, buf, 4);
    double mx;
    if (nm_scan_scores(src, 16, &mx))
        return NM_ERR_VALUE;
    if (mx == 0.0)
        return Q4_SKIPPED;
    *e = nm_exponent_of(mx);
    if (!NM_NORMAL_SCALE(*e))
        return Q4_SKIPPED;
    const double f = nm_pow2(-*e);
    for (int i = 0; i < 4; i++)
        s[i] = nm_vload_d(src + 4 * i) * f;
    return Q4_SOLVED;
}

/* q4_transpose in place, on doubles. */
static inline __attribute__((always_inline)) void q4_transpose_d(nm_vd *a)
{
    nm_vi r[4] = {(nm_vi)a[0], (nm_vi)a[1], (nm_vi)a[2], (nm_vi)a[3]}, t[4];
    q4_transpose(r, t);
    for (int q = 0; q < 4; q++)
        a[q] = (nm_vd)t[q];
}

/* Passes of the warm start's fit at most (a Bellman-Ford over 4 columns and a zero level). */
#define Q4_FIT_PASSES 8

/* The warm start (step 0 of nm_exact.c, as nm_exact_warm.c) on tiles k0 .. k0 + cnt - 1
 * (cnt <= 4) at once, one tile per lane: entry (i, j) of the four tiles is one vector. Each
 * tile's previous column prices (scaled like its scores, clipped to [0, 1], NaN as 0) and a
 * zero level z are lowered until every row's choice in the previous mask is its top n of
 * s - v. A tile where that succeeds keeps its previous mask, proven optimal, and it is
 * written out with its prices (the certificate checks them, as after the general path's
 * fit). Returns the bit set of those tiles (bit l: tile k0 + l); the others are left. */
static inline __attribute__((always_inline)) int q4_fit4(const nm_exact_ctx *c, int64_t k0,
                                                         int cnt)
{
    const nm_vd zero = {0}, one = zero + 1.0, inf = zero + HUGE_VAL;
    const nm_vi n = (nm_vi){0} + c->n;
    nm_vd s[4][4], vv[4], f = zero, g = zero; /* s[l][i]: tile l's row i, then [i][j] */
    uint32_t words[4][4];                     /* the previous mask's rows, bytes 0 / 1 */
    nm_vi idle = {0};                         /* lanes not tried: skipped, or no tile */
    for (int l = 0; l < 4; l++) {
        int e = 0;
        if (l >= cnt || q4_load(c, k0 + l, s[l], &e) != Q4_SOLVED) {
            idle[l] = -1;
            for (int i = 0; i < 4; i++)
                s[l][i] = zero;
            memset(words[l], 0, sizeof words[l]);
            vv[l] = zero;
            continue;
        }
        f[l] = nm_pow2(-e);
        g[l] = nm_pow2(e);
        const int64_t k = k0 + l, rs = c->warm_x_rs;
        int64_t tr, tq;
        nm_tile_place(&c->src, k, &tr, &tq);
        const uint8_t *p = c->warm_x + tr * 4 * rs + tq * 4;
        for (int i = 0; i < 4; i++) {
            memcpy(words[l] + i, p + i * rs, sizeof(uint32_t));
            words[l][i] &= 0x01010101u; /* each byte as its lowest bit */
        }
        vv[l] = nm_vload_d(c->warm_v + k * 4);
    }
    nm_vd sij[4][4];
    for (int i = 0; i < 4; i++) { /* [l][i] -> [i][j], lanes l */
        nm_vd a[4] = {s[0][i], s[1][i], s[2][i], s[3][i]};
        q4_transpose_d(a);
        for (int j = 0; j < 4; j++)
            sij[i][j] = a[j];
    }
    q4_transpose_d(vv); /* vv[j], lanes l */
    /* fr: unkept scores (-inf on a row keeping fewer than n: unpriced, u_i = 0, its unkept
     * scores bound v - z from below in low instead); kk: kept scores, +inf elsewhere */
    nm_vd fr[4][4], kk[4][4], low[4];
    nm_vi kc[4] = {{0}}, bad = idle;
    for (int j = 0; j < 4; j++)
        low[j] = zero;
    for (int i = 0; i < 4; i++) {
        const nm_vi w = {words[0][i], words[1][i], words[2][i], words[3][i]};
        nm_vi kr = {0};
        for (int j = 0; j < 4; j++) {
            const nm_vi x = -((w >> (8 * j)) & 1); /* kept: -1 */
            kr -= x;
            kc[j] -= x;
            fr[i][j] = nm_vblend_d(x, -inf, sij[i][j]);
            kk[i][j] = nm_vblend_d(x, sij[i][j], inf);
        }
        const nm_vi short_row = kr < n;
        bad |= kr > n;
        for (int j = 0; j < 4; j++) {
            low[j] = nm_vblend_d(short_row & (fr[i][j] > low[j]), fr[i][j], low[j]);
            fr[i][j] = nm_vblend_d(short_row, -inf, fr[i][j]);
        }
    }
    nm_vi short_col[4];
    for (int j = 0; j < 4; j++) {
        bad |= kc[j] > n;
        short_col[j] = kc[j] < n; /* unpriced: held at z */
        const nm_vd w = vv[j] * f;
        vv[j] = nm_vblend_d(w > zero, nm_vblend_d(w < one, w, one), zero);
        vv[j] = nm_vblend_d(short_col[j], zero, vv[j]);
    }
    nm_vd A[4] = {zero, zero, zero, zero}, z = zero;
    nm_vi done = bad; /* lanes at a fixed point (or not fitted at all) */
    for (int pass = 0; pass < Q4_FIT_PASSES && nm_any(~done); pass++) {
        nm_vi lowered = {0};
        for (int i = 0; i < 4; i++) { /* A_i = max(-z, largest unkept s_ij - v_j) */
            nm_vd a = -z;
            for (int j = 0; j < 4; j++) {
                const nm_vd d = fr[i][j] - vv[j];
                a = nm_vblend_d(d > a, d, a);
            }
            A[i] = a;
        }
        nm_vd zm = inf;
        for (int j = 0; j < 4; j++) { /* v_j <= least kept s_ij - A_i */
            nm_vd hi = inf;
            for (int i = 0; i < 4; i++) {
                const nm_vd h = kk[i][j] - A[i];
                hi = nm_vblend_d(h < hi, h, hi);
            }
            const nm_vi gt = vv[j] > hi;
            lowered |= gt;
            vv[j] = nm_vblend_d(gt, hi, vv[j]);
            const nm_vd d = vv[j] - low[j];
            zm = nm_vblend_d(d < zm, d, zm);
        }
        const nm_vi zdown = zm < z; /* z <= v_j - low_j */
        lowered |= zdown;
        z = nm_vblend_d(zdown, zm, z);
        for (int j = 0; j < 4; j++) {
            const nm_vi gt = short_col[j] & (vv[j] > z);
            lowered |= gt;
            vv[j] = nm_vblend_d(gt, z, vv[j]);
        }
        done |= ~lowered;
    }
    const nm_vi fits = done & ~bad;
    if (!nm_any(fits))
        return 0;
    nm_vd u[4], v[4];
    for (int q = 0; q < 4; q++) {
        u[q] = vmax0(A[q] + z) * g;
        v[q] = vmax0(vv[q] - z) * g;
    }
    q4_transpose_d(u); /* by lane */
    q4_transpose_d(v);
    int out = 0;
    for (int l = 0; l < cnt; l++) {
        if (!fits[l])
            continue;
        const int64_t k = k0 + l;
        memcpy(nm_tile_u(c, k), u + l, sizeof(nm_vd));
        memcpy(c->v + k * 4, v + l, sizeof(nm_vd));
        int64_t ors;
        uint8_t *dst = nm_tile_mask_out(c, k, &ors);
        for (int i = 0; i < 4; i++)
            memcpy(dst + ors * i, words[l] + i, sizeof(uint32_t));
        c->status[k] = NM_TILE_OK;
        out |= 1 << l;
    }
    return out;
}

/* Solve tile k cold on the M = 4 path: a Q4_* result or NM_ERR_VALUE. */
static inline __attribute__((always_inline)) int q4_tile(const nm_exact_ctx *c, int64_t k)
{
    const nm_vd zero = {0};
    q4_t q;
    int e;
    const int rc = q4_load(c, k, q.s, &e);
    if (rc != Q4_SOLVED)
        return rc;
    memcpy(q.sT, q.s, sizeof q.s);
    q4_transpose_d(q.sT);
    q.n = c->n;
    q.sat = c->sat;
    q4_start(&q, q.sat || q.n == 4 ? zero : q4_round(&q));
    const nm_vi n = (nm_vi){0} + q.n;
    for (int paths = 0;; paths++) {
        const nm_vi excess = q.cdeg > q.cflow;
        const int te = (int)nm_hsum_i(q.cflow) - q.nkept; /* T's excess */
        if (nm_hsum_i(excess) == 0 && te <= 0) {
            if (te < 0)
                return Q4_UNCERTIFIED; /* impossible: the balances sum to 0 */
            break;
        }
        if (paths >= 4 * q.n + 4)
            return Q4_UNCERTIFIED;
        int j = -1; /* the source: the first column with excess, else T */
        for (int jj = 3; jj >= 0; jj--)
            j = excess[jj] ? jj : j;
        if (!q4_path(&q, j, te < 0))
            return Q4_UNCERTIFIED;
    }
    if (!q.sat && nm_hsum_i((q.rdeg < n) | (q.cdeg < n)) != 0) /* fill_short: prices are 0 */
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4 && q.rdeg[i] < q.n; j++)
                if (!q.x[i][j] && q.cdeg[j] < q.n)
                    q4_set(&q, i, j, -1);
    /* prices and the self-check, counting the mask afresh */
    nm_vd u = q.pr - q.pT, v = q.pT - q.pc;
    if (!q.sat) {
        u = vmax0(u);
        v = vmax0(v);
    }
    if (nm_hsum((u - u) + (v - v)) != 0.0) /* an infinite or NaN price */
        return Q4_UNCERTIFIED;
    nm_vd slack = zero, kept = zero;
    nm_vi cols = {0};
    for (int i = 0; i < 4; i++) {
        const nm_vd r = q.s[i] - u[i] - v;
        slack += (nm_vd)((nm_vi)r & (r > zero));
        kept += (nm_vd)((nm_vi)q.s[i] & q.x[i]);
        cols -= q.x[i];
        const int64_t ri = -nm_hsum_i(q.x[i]);
        if (ri > q.n || (q.sat && ri != q.n))
            return Q4_UNCERTIFIED;
    }
    if (nm_hsum_i((cols > n) | (q.sat ? cols != n : (nm_vi){0})) != 0)
        return Q4_UNCERTIFIED;
    const double kp = nm_hsum(kept), bound = q.n * nm_hsum(u) + q.n * nm_hsum(v) + nm_hsum(slack);
    double scale = kp > bound ? kp : bound;
    if (scale < 0.5) /* the optimum is >= the largest score, which is >= 0.5 */
        scale = 0.5;
    if (!(fabs(bound - kp) <= NM_GAP_TOL * scale))
        return Q4_UNCERTIFIED;
    const double g = nm_pow2(e);
    u *= g;
    v *= g;
    memcpy(nm_tile_u(c, k), &u, sizeof u);
    memcpy(c->v + k * 4, &v, sizeof v);
    int64_t ors;
    uint8_t *out = nm_tile_mask_out(c, k, &ors);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            out[ors * i + j] = (uint8_t)(q.x[i][j] & 1);
    c->status[k] = NM_TILE_OK;
    return Q4_SOLVED;
}

/* Tiles [lo, hi), with a warm start four at a time; the ones this path leaves go through the
 * general path. */
NM_SIMD_CLONES void nm_q4_run(nm_exact_ctx *c, nm_slot *slots, int64_t lo, int64_t hi)
{
    const int warm = c->warm_x && !c->sat && c->n < 4;
    for (int64_t k0 = lo; k0 < hi; k0 += 4) {
        const int cnt = hi - k0 < 4 ? (int)(hi - k0) : 4;
        const int fitted = warm ? q4_fit4(c, k0, cnt) : 0;
        for (int l = 0; l < cnt; l++) {
            if (fitted >> l & 1)
                continue;
            const int64_t next = k0 + l;
            const int rc = q4_tile(c, next);
            if (rc < 0) {
                nm_set_error(&c->err, rc);
                return;
            }
            if (rc != Q4_SOLVED) { /* the general path, one tile at a time */
                const int rc2 = nm_general_tile(slots, c, next);
                if (rc2 != NM_OK) {
                    nm_set_error(&c->err, rc2);
                    return;
                }
                if (rc == Q4_UNCERTIFIED && c->status[next] == NM_TILE_OK)
                    c->status[next] = NM_TILE_FALLBACK;
            }
        }
    }
}
