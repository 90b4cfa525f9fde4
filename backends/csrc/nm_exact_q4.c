/* Exact solver, M = 4 path (1:4, 2:4, 3:4, 4:4): the algorithm of nm_exact.c with the tile in
 * registers.
 *
 * A 4 x 4 tile is four NM_W-lane vectors, so the scores, the mask, and the potentials and
 * Dijkstra distances of the rows and of the columns are a vector each, with S and T as
 * scalars: a Dijkstra step is a handful of vector operations instead of passes over the
 * padded node arrays of the general path. Same start (with v = 0), potentials and self-check. A
 * tile this path does not certify, an all-zero tile and a tile whose scale is not a normal
 * power of two go through the general path (and its fallback) instead. */
#include <math.h>
#include <string.h>

#include "nm_internal.h"

#define LANE NM_LANE
#define Q4_S 4 /* predecessor code of S (rows and columns: 0..3, the source column: -1) */
_Static_assert(NM_W == 4, "the M = 4 path holds one tile row per vector");

typedef struct {
    nm_vd s[4], sT[4];       /* scaled scores by row, and by column (sT[j][i] = s[i][j]) */
    nm_vi x[4], xT[4];       /* kept flags (0 / -1) by row, and by column */
    nm_vi rdeg, cdeg, cflow; /* lanes: rows; columns; columns (flow on column -> T) */
    nm_vd pr, pc;            /* potentials of the rows and of the columns */
    double pS, pT;
    int n, sat;
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

/* Every row keeps its top n (ties to the lower index, as in warm_start) and is priced at
 * its (n+1)-th largest score; the ranks of the four rows are counted at once. */
static inline __attribute__((always_inline)) void q4_warm_start(q4_t *q)
{
    const nm_vi n = (nm_vi){0} + q->n;
    nm_vd next = (nm_vd){0} - HUGE_VAL;
    for (int j = 0; j < 4; j++) {
        nm_vi rank = {0};
        for (int k = 0; k < 4; k++) {
            if (k < j)
                rank -= q->sT[k] >= q->sT[j];
            else if (k > j)
                rank -= q->sT[k] > q->sT[j];
        }
        q->xT[j] = rank < n;
        next = nm_vblend_d(rank == n, q->sT[j], next);
    }
    q4_transpose(q->xT, q->x);
    q->pr = vmax0(next);
    q->pc = (nm_vd){0};
    q->pS = q->pT = 0.0;
    q->rdeg = n;
    q->cdeg = -(q->x[0] + q->x[1] + q->x[2] + q->x[3]);
    q->cflow = nm_vblend_i(q->cdeg < n, q->cdeg, n);
}

/* Keep (i, j) (keep = -1) or drop it (keep = 0). */
static inline __attribute__((always_inline)) void q4_set(q4_t *q, int i, int j, int64_t keep)
{
    q->x[i][j] = keep;
    q->xT[j][i] = keep;
    const int64_t d = keep ? 1 : -1;
    q->rdeg[i] += d;
    q->cdeg[j] += d;
}

/* One shortest path (Dijkstra on reduced costs, stopped at T) from column src, which holds
 * more than n; then the potentials move by the distances and one unit goes along the path.
 * 0 when T cannot be reached or the path is malformed. */
static inline __attribute__((always_inline)) int q4_path(q4_t *q, int src)
{
    enum { ROW, COL, NODE_S4, NODE_T4 };
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    const nm_vi n = (nm_vi){0} + q->n;
    nm_vd dr = inf, dc = inf;
    nm_vi doner = {0}, donec = {0}, prevr = {0}, prevc = {0};
    double dS = HUGE_VAL, dT = HUGE_VAL;
    int doneS = 0, prevS = 0, prevT = 0;
    int kind = COL, a = src, found = 0;
    dc[src] = 0.0;
    prevc[src] = -1;
    for (int step = 0; step < 10; step++) { /* at most the 9 nodes other than T */
        double da;
        if (kind == COL) { /* column a -> rows along kept arcs (cost s_ia); -> T if it has room */
            donec |= LANE == a;
            da = dc[a];
            const nm_vd cand = da + vmax0(q->sT[a] + q->pc[a] - q->pr);
            const nm_vi upd = q->xT[a] & (cand < dr);
            dr = nm_vblend_d(upd, cand, dr);
            prevr = nm_vblend_i(upd, (nm_vi){0} + a, prevr);
            if (q->cflow[a] < q->n) {
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
            const nm_vi upd = ~q->x[a] & (cand < dc);
            dc = nm_vblend_d(upd, cand, dc);
            prevc = nm_vblend_i(upd, (nm_vi){0} + a, prevc);
            if (q->rdeg[a] > 0) {
                const double cs = da + max0(q->pr[a] - q->pS);
                if (cs < dS) {
                    dS = cs;
                    prevS = a;
                }
            }
        } else { /* S -> rows with room; -> T (at most n) */
            doneS = 1;
            da = dS;
            const nm_vd cand = da + vmax0(q->pS - q->pr);
            const nm_vi upd = (q->rdeg < n) & (cand < dr);
            dr = nm_vblend_d(upd, cand, dr);
            prevr = nm_vblend_i(upd, (nm_vi){0} + Q4_S, prevr);
            if (!q->sat) {
                const double ct = da + max0(q->pS - q->pT);
                if (ct < dT) {
                    dT = ct;
                    prevT = Q4_S;
                }
            }
        }
        if (dT <= da) { /* T is the least unsettled node: the path is found */
            found = 1;
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
        const double bs = doneS ? HUGE_VAL : dS;
        if (dT <= best && dT <= bs) {
            found = dT < HUGE_VAL; /* else nothing is left to reach: impossible, the general
                                    * path decides */
            break;
        }
        if (bs < best) {
            kind = NODE_S4;
        } else {
            kind = node < 4 ? ROW : COL;
            a = node & 3;
        }
    }
    if (!found)
        return 0;
    /* potentials += min(dist, dist(T)) */
    const nm_vd dTv = (nm_vd){0} + dT;
    q->pr += nm_vblend_d(dr < dTv, dr, dTv);
    q->pc += nm_vblend_d(dc < dTv, dc, dTv);
    q->pS += dS < dT ? dS : dT;
    q->pT += dT;
    /* walk back from T */
    if (prevT == Q4_S) {
        kind = NODE_S4;
    } else {
        kind = COL;
        a = prevT;
        q->cflow[a]++;
    }
    for (int step = 0; step < 10; step++) {
        if (kind == COL) {
            const int i = (int)prevc[a];
            if (i < 0)
                return a == src;
            q4_set(q, i, a, -1); /* row i -> column a: keep */
            kind = ROW;
            a = i;
        } else if (kind == ROW) {
            const int j = (int)prevr[a];
            if (j == Q4_S) {
                kind = NODE_S4; /* S -> row a: the row's degree follows its arcs */
            } else {
                q4_set(q, a, j, 0); /* column j -> row a: drop */
                kind = COL;
                a = j;
            }
        } else {
            kind = ROW;
            a = prevS; /* row -> S */
        }
    }
    return 0;
}

/* Solve tile k on the M = 4 path. Q4_SOLVED: mask, prices and status written; Q4_SKIPPED:
 * an all-zero or extreme-scale tile, for the general path; Q4_UNCERTIFIED: this path could
 * not certify it (the general path takes over, status 1); NM_ERR_VALUE: a score is NaN,
 * infinite or negative. */
enum { Q4_SKIPPED, Q4_SOLVED, Q4_UNCERTIFIED };

static inline __attribute__((always_inline)) int q4_tile(const nm_exact_ctx *c, int64_t k)
{
    double buf[16] NM_A64;
    const double *src = nm_tile_scores(c, k, buf);
    const nm_vd zero = {0};
    double mx;
    if (nm_scan_scores(src, 16, &mx))
        return NM_ERR_VALUE;
    if (mx == 0.0)
        return Q4_SKIPPED;
    const int e = nm_exponent_of(mx);
    if (!NM_NORMAL_SCALE(e))
        return Q4_SKIPPED;
    const double f = nm_pow2(-e);
    q4_t q;
    for (int i = 0; i < 4; i++)
        q.s[i] = nm_vload_d(src + 4 * i) * f;
    const nm_vi rows[4] = {(nm_vi)q.s[0], (nm_vi)q.s[1], (nm_vi)q.s[2], (nm_vi)q.s[3]};
    nm_vi cols_bits[4];
    q4_transpose(rows, cols_bits);
    for (int j = 0; j < 4; j++)
        q.sT[j] = (nm_vd)cols_bits[j];
    q.n = c->n;
    q.sat = c->sat;
    q4_warm_start(&q);
    const nm_vi n = (nm_vi){0} + q.n;
    for (int paths = 0;; paths++) {
        const nm_vi excess = q.cdeg > q.cflow;
        if (nm_hsum_i(excess) == 0)
            break;
        if (paths >= 4 * q.n)
            return Q4_UNCERTIFIED;
        int j = 0;
        while (!excess[j])
            j++;
        if (!q4_path(&q, j))
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
    memcpy(c->u + k * 4, &u, sizeof u);
    memcpy(c->v + k * 4, &v, sizeof v);
    int64_t ors;
    uint8_t *out = nm_tile_mask_out(c, k, &ors);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            out[ors * i + j] = (uint8_t)(q.x[i][j] & 1);
    c->status[k] = NM_TILE_OK;
    return Q4_SOLVED;
}

/* Tiles [lo, hi); the ones this path leaves go through the general path, one at a time. */
NM_SIMD_CLONES void nm_q4_run(nm_exact_ctx *c, nm_slot *slots, int64_t lo, int64_t hi)
{
    for (int64_t next = lo; next < hi; next++) {
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
