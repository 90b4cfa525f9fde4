/* Exact solver, general path (any M <= NM_MAX_M; see nm_exact.c for the algorithm): the tile's
 * network in node arrays, the shortest paths (dense Dijkstra), the prices and
 * the self-check, and the slots that interleave a thread's tiles. The cycle-cancelling
 * fallback is in nm_exact_fallback.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_internal.h"

#define INF_BITS ((int64_t)0x7ff0000000000000LL)

#define LANE NM_LANE

/* The fallback (nm_exact_fallback.c) is off the hot path. Declared cold here, so that GCC lays
 * out the hot path and its registers as when the fallback shared this file (without it the
 * general path runs 3-5% slower); cold only here, so the definitions stay optimised for speed. */
__attribute__((cold)) void nm_recount(nm_tile *t);
__attribute__((cold)) int nm_feasible(const nm_tile *t);
__attribute__((cold)) int nm_cycle_cancel(nm_tile *t, double eps);
__attribute__((cold)) void nm_trivial_mask(nm_tile *t, int full);

static nm_tile *tile_alloc(int m)
{
    const int st = 2 * NM_SEG(m);
    const size_t bytes = sizeof(nm_tile) + (size_t)st * st * sizeof(double);
    nm_tile *t = (nm_tile *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!t)
        return NULL;
    for (int a = 0; a < st * st; a++)
        t->cost[a] = HUGE_VAL;
    memset(t->s, 0, sizeof t->s);
    memset(t->sT, 0, sizeof t->sT);
    memset(t->x, 0, sizeof t->x);
    memset(t->xT, 0, sizeof t->xT);
    t->m = m;
    t->mp = NM_ROUNDW(m);
    t->seg = NM_SEG(m);
    t->stride = st;
    return t;
}

static inline void set_arc(nm_tile *t, int i, int j, int keep)
{
    const int m = t->m, st = t->stride;
    const double sij = t->s[i * t->mp + j];
    t->x[i * t->mp + j] = (uint8_t)keep;
    t->cost[NM_NODE_ROW(i) * st + NM_NODE_COL(m, j)] = keep ? HUGE_VAL : -sij;
    t->cost[NM_NODE_COL(m, j) * st + NM_NODE_ROW(i)] = keep ? sij : HUGE_VAL;
}

static inline void set_row_arcs(nm_tile *t, int i)
{
    const int S = NM_NODE_S(t->m), st = t->stride;
    t->cost[S * st + NM_NODE_ROW(i)] = t->rdeg[i] < t->n ? 0.0 : HUGE_VAL;
    t->cost[NM_NODE_ROW(i) * st + S] = t->rdeg[i] > 0 ? 0.0 : HUGE_VAL;
}

/* Least key over the lanes and the node it belongs to. The lane number replaces the key's
 * low bits for this last step, so between lanes within NM_W ulps of each other the choice is
 * arbitrary: a node that is the nearest to within rounding, which Dijkstra tolerates. */
static inline __attribute__((always_inline)) int64_t lanes_min(nm_vi key, nm_vi where,
                                                               int64_t *at)
{
    nm_vi k = (key & ~((nm_vi){0} + (NM_W - 1))) | LANE;
    nm_vi o = __builtin_shuffle(k, (nm_vi){2, 3, 0, 1});
    nm_vi lt = k < o;
    k = nm_vblend_i(lt, k, o);
    o = __builtin_shuffle(k, (nm_vi){1, 0, 3, 2});
    lt = k < o;
    k = nm_vblend_i(lt, k, o);
    const int64_t lane = k[0] & (NM_W - 1);
    *at = where[lane];
    return key[lane];
}

/* Fold one block of keys into a running lane-wise minimum (value and node). */
#define NM_TRACK(B, W, KEY, IDX)                                                              \
    do {                                                                                      \
        const nm_vi lt_ = (KEY) < (B);                                                        \
        B = nm_vblend_d(lt_, KEY, B);                                                         \
        W = nm_vblend_i(lt_, IDX, W);                                                         \
    } while (0)

/* Relax the block of nodes [q, q + NM_W) from node a (distance da, potential pa) through the
 * cost row; return the block's keys. */
static inline __attribute__((always_inline)) nm_vd relax_block(nm_tile *t, const double *row,
                                                               int q, nm_vd da, nm_vd pa,
                                                               nm_vi av)
{
    const nm_vd zero = {0}, inf = zero + HUGE_VAL;
    nm_vd r = pa + nm_vload_d(row + q) - nm_vload_d(t->pot + q);
    r = nm_vblend_d(r > zero, r, zero); /* max(r, 0), as +0.0 */
    const nm_vd c = da + r;
    const nm_vd old = nm_vload_d(t->dist + q);
    const nm_vi lt = c < old;
    const nm_vd nd = nm_vblend_d(lt, c, old);
    const nm_vi np = nm_vblend_i(lt, av, nm_vload_i(t->prev + q));
    memcpy(t->dist + q, &nd, sizeof nd);
    memcpy(t->prev + q, &np, sizeof np);
    return nm_vblend_d(nm_vload_i(t->done + q), inf, nd);
}

/* Relax the segment [off, off + seg) from settled node a and return its lane-wise least key.
 * Reduced costs are clamped at 0, so candidates are >= dist(a): settled nodes never improve.
 * All comparisons are between doubles >= 0 or +inf (no NaN). */
static inline __attribute__((always_inline)) void relax_min(nm_tile *t, int64_t a, int off,
                                                            nm_vd *best, nm_vi *where)
{
    const double *row = t->cost + a * t->stride;
    const nm_vd zero = {0}, inf = zero + HUGE_VAL;
    const nm_vd da = zero + t->dist[a], pa = zero + t->pot[a];
    const nm_vi av = (nm_vi){0} + a;
    nm_vd b0 = inf, b1 = inf;
    nm_vi w0 = {0}, w1 = {0};
    int q = off;
    for (; q + 2 * NM_W <= off + t->seg; q += 2 * NM_W) {
        const nm_vd k0 = relax_block(t, row, q, da, pa, av);
        const nm_vd k1 = relax_block(t, row, q + NM_W, da, pa, av);
        NM_TRACK(b0, w0, k0, LANE + q);
        NM_TRACK(b1, w1, k1, LANE + (q + NM_W));
    }
    if (q < off + t->seg) {
        const nm_vd k0 = relax_block(t, row, q, da, pa, av);
        NM_TRACK(b0, w0, k0, LANE + q);
    }
    NM_TRACK(b0, w0, b1, w1);
    *best = b0;
    *where = w0;
}

/* Lane-wise least key of the segment [off, off + seg), with its node: the key is the
 * distance, +inf once settled (`done` holds all-ones lanes for settled nodes). Two running
 * minima (even and odd blocks) halve the dependency chain. */
static inline __attribute__((always_inline)) void seg_min(const nm_tile *t, int off,
                                                          nm_vd *best, nm_vi *where)
{
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    nm_vd b0 = inf, b1 = inf;
    nm_vi w0 = {0}, w1 = {0};
    int q = off;
    for (; q + 2 * NM_W <= off + t->seg; q += 2 * NM_W) {
        const nm_vd k0 = nm_vblend_d(nm_vload_i(t->done + q), inf, nm_vload_d(t->dist + q));
        const nm_vd k1 = nm_vblend_d(nm_vload_i(t->done + q + NM_W), inf,
                                     nm_vload_d(t->dist + q + NM_W));
        NM_TRACK(b0, w0, k0, LANE + q);
        NM_TRACK(b1, w1, k1, LANE + (q + NM_W));
    }
    if (q < off + t->seg) {
        const nm_vd k0 = nm_vblend_d(nm_vload_i(t->done + q), inf, nm_vload_d(t->dist + q));
        NM_TRACK(b0, w0, k0, LANE + q);
    }
    NM_TRACK(b0, w0, b1, w1);
    *best = b0;
    *where = w0;
}

/* Dijkstra state between steps: the lane minima (key, node) of the unsettled nodes. */
typedef struct {
    nm_vd best;
    nm_vi where;
} frontier_t;

/* Settle node a: mark it done (a vector read-modify-write, so the next vector load of the
 * block is store-forwarded), relax its out-arcs (the other segment) and re-scan its own
 * segment; keep the lane minima of both. */
static inline __attribute__((always_inline)) void settle(nm_tile *t, int64_t a, frontier_t *f)
{
    const int blk = (int)a & ~(NM_W - 1);
    nm_vi d = nm_vload_i(t->done + blk);
    d |= LANE == (a & (NM_W - 1));
    memcpy(t->done + blk, &d, sizeof d);
    nm_vd ba, bb;
    nm_vi wa, wb;
    if (NM_IS_ROW(t->m, a) || a == NM_NODE_T) { /* rows and T reach columns and S */
        relax_min(t, a, t->seg, &bb, &wb);
        seg_min(t, 0, &ba, &wa);
    } else { /* columns and S reach T and rows */
        relax_min(t, a, 0, &ba, &wa);
        seg_min(t, t->seg, &bb, &wb);
    }
    const nm_vi lt = bb < ba;
    f->best = nm_vblend_d(lt, bb, ba);
    f->where = nm_vblend_i(lt, wb, wa);
}

/* The least unsettled node (its key as bits; >= INF_BITS: none is left). */
static inline __attribute__((always_inline)) int64_t frontier_min(const frontier_t *f,
                                                                  int64_t *at)
{
    return lanes_min((nm_vi)f->best, f->where, at);
}

/* Potentials += min(dist, dist(sink)); push one unit along the path from src to sink.
 * 1 on success. */
static inline __attribute__((always_inline)) int augment(nm_tile *t, int src, int sink)
{
    const int m = t->m, st = t->stride;
    const nm_vd dT = (nm_vd){0} + t->dist[sink];
    for (int a = 0; a < st; a += NM_W) {
        const nm_vd d = nm_vload_d(t->dist + a);
        const nm_vd p = nm_vload_d(t->pot + a) + nm_vblend_d(d < dT, d, dT);
        memcpy(t->pot + a, &p, sizeof p);
    }
    int b = sink, steps = 0;
    while (b != src) {
        const int a = (int)t->prev[b];
        if (a < 0 || a >= st || ++steps > st)
            return 0;
        if (NM_IS_ROW(m, a) && NM_IS_COL(m, b)) { /* keep (a, b) */
            set_arc(t, a - 1, NM_COL_OF(m, b), 1);
            t->rdeg[a - 1]++;
            t->cdeg[NM_COL_OF(m, b)]++;
            t->nkept++;
            set_row_arcs(t, a - 1);
        } else if (NM_IS_COL(m, a) && NM_IS_ROW(m, b)) { /* drop (b, a) */
            set_arc(t, b - 1, NM_COL_OF(m, a), 0);
            t->rdeg[b - 1]--;
            t->cdeg[NM_COL_OF(m, a)]--;
            t->nkept--;
            set_row_arcs(t, b - 1);
        } else if (NM_IS_COL(m, a) && b == NM_NODE_T) {
            t->cflow[NM_COL_OF(m, a)]++;
            nm_set_col_arcs(t, NM_COL_OF(m, a));
        } else if (a == NM_NODE_T && NM_IS_COL(m, b)) {
            t->cflow[NM_COL_OF(m, b)]--;
            nm_set_col_arcs(t, NM_COL_OF(m, b));
        } /* row -> S, S -> row, S -> T, T -> S: the degrees already follow the mask */
        b = a;
    }
    nm_set_bypass(t);
    return 1;
}

/* At most n: keep every unkept entry between a short row and a short column. Their prices
 * are 0, so complementary slackness forces these scores to 0: the objective and the
 * certificate are unchanged and the mask becomes maximal (fewer empty slots). */
static void fill_short(nm_tile *t)
{
    const int m = t->m, n = t->n, mp = t->mp;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m && t->rdeg[i] < n; j++)
            if (!t->x[i * mp + j] && t->cdeg[j] < n) {
                t->x[i * mp + j] = 1;
                t->rdeg[i]++;
                t->cdeg[j]++;
            }
}

static void prices(const nm_tile *t, double *u, double *v)
{
    const int m = t->m;
    const double pT = t->pot[NM_NODE_T];
    for (int i = 0; i < m; i++) {
        u[i] = t->pot[NM_NODE_ROW(i)] - pT;
        v[i] = pT - t->pot[NM_NODE_COL(m, i)];
        if (!t->sat) {
            u[i] = u[i] > 0.0 ? u[i] : 0.0;
            v[i] = v[i] > 0.0 ? v[i] : 0.0;
        }
    }
}

/* Mask valid and the dual bound within tol (relative) of the kept score. */
static inline __attribute__((always_inline)) int verified(const nm_tile *t, const double *u,
                                                          const double *v, double tol)
{
    const int m = t->m, n = t->n, mp = t->mp;
    double vpad[NM_MAX_M] NM_A64;
    double bound = 0.0, fin = 0.0;
    for (int j = 0; j < m; j++) {
        fin += (u[j] - u[j]) + (v[j] - v[j]); /* 0, or NaN if any price is inf or NaN */
        vpad[j] = v[j];
    }
    if (fin != 0.0)
        return 0;
    for (int j = m; j < mp; j++)
        vpad[j] = HUGE_VAL; /* padding lanes: no slack */
    for (int i = 0; i < m; i++)
        bound += n * u[i] + n * v[i];
    const nm_vd zero = {0};
    nm_vd slack = zero, kept = zero;
    nm_vi cols[NM_MAX_M / NM_W];
    for (int q = 0; q < mp / NM_W; q++)
        cols[q] = (nm_vi){0};
    for (int i = 0; i < m; i++) {
        const nm_vd ui = zero + u[i];
        nm_vi rows = {0};
        for (int j0 = 0; j0 < mp; j0 += NM_W) {
            const nm_vd s8 = nm_vload_d(t->s + i * mp + j0);
            const nm_vi x8 = nm_vload_mask(t->x + i * mp + j0);
            nm_vd r = s8 - ui - nm_vload_d(vpad + j0);
            slack += (nm_vd)((nm_vi)r & (r > zero));
            kept += (nm_vd)((nm_vi)s8 & x8);
            rows -= x8;
            cols[j0 / NM_W] -= x8;
        }
        const int64_t ri = nm_hsum_i(rows);
        if (ri > n || (t->sat && ri != n))
            return 0;
    }
    for (int j = 0; j < m; j++) {
        const int64_t cj = cols[j / NM_W][j % NM_W];
        if (cj > n || (t->sat && cj != n))
            return 0;
    }
    const double k = nm_hsum(kept);
    bound += nm_hsum(slack);
    double scale = k > bound ? k : bound;
    if (scale < 0.5) /* the optimum is >= the largest score, which is >= 0.5 */
        scale = 0.5;
    return fabs(bound - k) <= tol * scale;
}

/* t->sT from t->s (the transposed copy that the dual start and the network read), its
 * padding 0 again after the warm start's fit (which shares its memory). */
static inline __attribute__((always_inline)) void transpose_tile(nm_tile *t)
{
    const int m = t->m, mp = t->mp;
    for (int j = 0; j < m; j++) {
        for (int i = 0; i < m; i++)
            t->sT[j * mp + i] = t->s[i * mp + j];
        for (int i = m; i < mp; i++)
            t->sT[j * mp + i] = 0.0;
    }
}

/* Read, check and scale one tile into t->s, and t->sT unless `row_major_only`. Returns the
 * binary exponent e of the scale (scores were multiplied by 2^-e), or INT32_MIN for an
 * all-zero tile. */
static inline __attribute__((always_inline)) int load_tile(nm_tile *t, const double *s, int *err,
                                                           int row_major_only, const int m)
{
    const int mp = NM_ROUNDW(m);
    double mx;
    if (nm_scan_scores(s, m * m, &mx)) {
        *err = NM_ERR_VALUE;
        return 0;
    }
    if (mx == 0.0)
        return INT32_MIN;
    const int e = nm_exponent_of(mx);
    const int fast = NM_NORMAL_SCALE(e);
    const double f = fast ? nm_pow2(-e) : 0.0;
    if (fast && m % NM_W == 0) { /* whole vectors, each also scattered into the transpose */
        for (int i = 0; i < m; i++)
            for (int j0 = 0; j0 < m; j0 += NM_W) {
                const nm_vd x = nm_vload_d(s + i * m + j0) * f;
                memcpy(t->s + i * mp + j0, &x, sizeof x);
                for (int q = 0; q < NM_W && !row_major_only; q++)
                    t->sT[(j0 + q) * mp + i] = x[q];
            }
        return e;
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            const double v = fast ? s[i * m + j] * f : ldexp(s[i * m + j], -e);
            t->s[i * mp + j] = v;
            t->sT[j * mp + i] = v;
        }
    return e;
}

/* Scale tile k's prices back (unless the tile is all zero) and write its mask and status. */
static inline __attribute__((always_inline)) void write_tile(const nm_tile *t,
                                                             const nm_exact_ctx *c, int64_t k,
                                                             int e, int8_t status, const int m)
{
    const int mp = NM_ROUNDW(m);
    if (e != INT32_MIN) {
        double *u = nm_tile_u(c, k), *v = c->v + k * m;
        const int fast = NM_NORMAL_SCALE(e);
        const double f = fast ? nm_pow2(e) : 0.0;
        for (int i = 0; i < m; i++) {
            u[i] = fast ? u[i] * f : ldexp(u[i], e);
            v[i] = fast ? v[i] * f : ldexp(v[i], e);
        }
    }
    int64_t ors;
    uint8_t *out = nm_tile_mask_out(c, k, &ors);
    for (int i = 0; i < m; i++)
        memcpy(out + i * ors, t->x + i * mp, (size_t)m);
    c->status[k] = status;
}

/* Everything after the shortest paths: fill, prices, self-check (and the fallback), scale
 * the prices back, write the mask out. */
static inline __attribute__((always_inline)) void finish_tile(nm_tile *t, const nm_exact_ctx *c,
                                                              int64_t k, int e, int ok)
{
    const int m = c->m;
    double *u = nm_tile_u(c, k), *v = c->v + k * m;
    int8_t status = NM_TILE_OK;
    if (e == INT32_MIN) { /* all zero: any full mask is optimal, prices 0 */
        nm_trivial_mask(t, 1);
        for (int i = 0; i < m; i++)
            u[i] = v[i] = 0.0;
    } else {
        if (ok && !t->sat)
            fill_short(t);
        if (ok)
            prices(t, u, v);
        if (!ok || (c->flags & (NM_FLAG_FORCE_FALLBACK | NM_FLAG_COLD_FALLBACK)) ||
            !verified(t, u, v, NM_GAP_TOL)) {
            status = NM_TILE_FALLBACK;
            nm_recount(t);
            if (!ok || !nm_feasible(t) || (c->flags & NM_FLAG_COLD_FALLBACK))
                nm_trivial_mask(t, t->sat);
            if (nm_cycle_cancel(t, NM_BF_EPS)) {
                nm_recount(t);
                if (!t->sat)
                    fill_short(t);
                prices(t, u, v);
                if (!verified(t, u, v, NM_FALLBACK_TOL))
                    status = NM_TILE_UNVERIFIED;
            } else {
                status = NM_TILE_UNVERIFIED;
                nm_recount(t);
                if (!nm_feasible(t)) /* never hand back an invalid mask */
                    nm_trivial_mask(t, t->sat);
                for (int i = 0; i < m; i++) /* proves nothing tight, but a valid bound */
                    u[i] = v[i] = t->sat ? 0.0 : 1.0;
            }
        }
    }
    write_tile(t, c, k, e, status, m);
}

/* Rounds of the dual start's coordinate descent for an m x m tile: each costs two sorting
 * passes and saves shortest paths, more of them the larger m. Tuned at M = 8, 16, 32 with the
 * odd-even merge networks (2048² N(0,1), one thread): one round more was the same within the
 * noise, fewer 4-19% slower. They leave 1.3, 2.7 and 6.3 units per tile to the paths at
 * 4:8, 8:16 and 16:32 (16:32: 9.9 after three rounds, 36 from v = 0). */
static inline int start_rounds(int m)
{
    return m <= 4 ? 0 : m <= 8 ? 3 : m <= 16 ? 5 : m <= 32 ? 6 : 4;
}

/* The column prices to start tile k from, scaled like its scores (2^-e): the previous solve's
 * for a warm start (at most n only; clipped to [0, 1], NaN as 0), else from
 * rounds of coordinate descent, or 0 with sat (whose prices are not sign-constrained). */
static inline __attribute__((always_inline)) void start_prices(const nm_tile *t,
                                                               const nm_exact_ctx *c,
                                                               int64_t k, int e, double *v)
{
    const int m = t->m;
    if (t->sat || t->n == m) {
        for (int j = 0; j < m; j++)
            v[j] = 0.0;
    } else if (c->warm_v) {
        const double *wv = c->warm_v + k * m;
        for (int j = 0; j < m; j++) {
            const double p = NM_NORMAL_SCALE(e) ? wv[j] * nm_pow2(-e) : ldexp(wv[j], -e);
            v[j] = p > 0.0 ? (p < 1.0 ? p : 1.0) : 0.0; /* an optimal v_j <= max s < 1 */
        }
    } else {
        nm_price_rounds(t, start_rounds(m), v);
    }
}

/* One tile in flight. The Dijkstra of a single tile is a chain of dependent steps (argmin,
 * relax, argmin, ...); SLOTS tiles advance in turn, one step each, so that the processor
 * overlaps their chains. The results are the same as solving the tiles one by one. */
#define SLOTS 2
/* Tiles ahead whose rows are prefetched (nm_prefetch_tile). Measured (2048², one thread):
 * 2 took 7-11% off warm starts at 8:16 and 16:32 and a little off cold calls; 4 and 8 less. */
#define PREFETCH_AHEAD 2
enum { SLOT_IDLE, SLOT_NEED_PATH, SLOT_SEARCH };

typedef struct nm_slot {
    frontier_t front; /* Dijkstra: lane minima of the unsettled nodes */
    nm_tile *t;
    int64_t k;
    int e, state, col, src, tsink, paths, built;
} slot_t;

/* Load tile k into the slot and start it from its prices (m = t->m, a constant where
 * slot_begin specialises); returns an error code. */
static inline __attribute__((always_inline)) int slot_load(slot_t *sl, const nm_exact_ctx *c,
                                                           int64_t k, int warm, const int m)
{
    nm_tile *t = sl->t;
    int err = NM_OK;
    sl->k = k;
    sl->e = load_tile(t, nm_tile_scores_m(c, k, t->in, m), &err, warm, m);
    if (err != NM_OK)
        return err;
    if (sl->e == INT32_MIN) {
        finish_tile(t, c, k, sl->e, 1);
        sl->state = SLOT_IDLE;
        return NM_OK;
    }
    double v[NM_MAX_M] NM_A64;
    start_prices(t, c, k, sl->e, v);
    if (warm) {
        double fit[NM_MAX_M] NM_A64;
        memcpy(fit, v, sizeof(double) * (size_t)m);
        if (nm_warm_tile(t, c, k, fit, nm_tile_u(c, k))) { /* the previous mask, optimal */
            memcpy(c->v + k * m, fit, sizeof(double) * (size_t)m);
            write_tile(t, c, k, sl->e, NM_TILE_OK, m);
            sl->state = SLOT_IDLE;
            return NM_OK;
        }
        transpose_tile(t); /* the paths start from the previous prices */
    }
    nm_dual_start(t, v);
    sl->col = 0;
    sl->paths = 0;
    sl->built = 0;
    sl->state = SLOT_NEED_PATH;
    return NM_OK;
}

/* slot_load, with m a constant for warm starts at the common sizes (where most tiles end
 * with the fit, the reads and writes around it are most of the time). */
static inline __attribute__((always_inline)) int slot_begin(slot_t *sl, const nm_exact_ctx *c,
                                                            int64_t k)
{
    nm_tile *t = sl->t;
    t->n = c->n;
    t->sat = c->sat;
    const int warm = c->warm_x && !t->sat && t->n < t->m &&
                     !(c->flags & (NM_FLAG_FORCE_FALLBACK | NM_FLAG_COLD_FALLBACK));
    switch (warm ? t->m : 0) {
    case 8: return slot_load(sl, c, k, 1, 8);
    case 16: return slot_load(sl, c, k, 1, 16);
    case 32: return slot_load(sl, c, k, 1, 32);
    default: return slot_load(sl, c, k, warm, t->m);
    }
}

/* A node where the current search ends: a column short of its flow to T, or T itself when
 * it takes more than it has (tsink). */
static inline int is_sink(const nm_tile *t, int64_t a, int tsink)
{
    if (a == NM_NODE_T)
        return tsink;
    return NM_IS_COL(t->m, a) && t->cdeg[NM_COL_OF(t->m, a)] < t->cflow[NM_COL_OF(t->m, a)];
}

/* Advance a slot by one step: start a path search, settle one node, or finish the tile.
 * Sources: columns with excess (kept beyond their flow to T), then T if it has excess;
 * sinks: columns short of their flow (priced columns that lost rows), and T. */
static inline __attribute__((always_inline)) void slot_step(slot_t *sl, const nm_exact_ctx *c)
{
    nm_tile *t = sl->t;
    const int m = t->m;
    if (sl->state == SLOT_NEED_PATH) {
        while (sl->col < m && t->cdeg[sl->col] <= t->cflow[sl->col])
            sl->col++;
        const int te = nm_t_excess(t);
        if (sl->col == m && te <= 0) {
            finish_tile(t, c, sl->k, sl->e, te == 0);
            sl->state = SLOT_IDLE;
            return;
        }
        if (++sl->paths > t->n * m) {
            finish_tile(t, c, sl->k, sl->e, 0);
            sl->state = SLOT_IDLE;
            return;
        }
        if (!sl->built) {
            nm_build_network(t);
            sl->built = 1;
        }
        sl->src = sl->col < m ? NM_NODE_COL(m, sl->col) : NM_NODE_T;
        sl->tsink = te < 0;
        const nm_vd inf = (nm_vd){0} + HUGE_VAL;
        const nm_vi none = {0};
        for (int b = 0; b < t->stride; b += NM_W) {
            memcpy(t->dist + b, &inf, sizeof inf);
            memcpy(t->done + b, &none, sizeof none);
        }
        t->dist[sl->src] = 0.0;
        t->prev[sl->src] = -1;
        settle(t, sl->src, &sl->front);
        sl->state = SLOT_SEARCH;
        return;
    }
    int64_t a;
    int sink = -1;
    if (frontier_min(&sl->front, &a) >= INF_BITS) {
        finish_tile(t, c, sl->k, sl->e, 0); /* no path: impossible, the fallback decides */
        sl->state = SLOT_IDLE;
        return;
    }
    if (is_sink(t, a, sl->tsink)) {
        sink = (int)a;
    } else {
        settle(t, a, &sl->front);
        /* a column with room reaches T at no extra reduced cost: T would be settled next
         * and change nothing */
        if (sl->tsink && t->dist[NM_NODE_T] <= t->dist[a])
            sink = NM_NODE_T;
    }
    if (sink >= 0) {
        if (!augment(t, sl->src, sink)) {
            finish_tile(t, c, sl->k, sl->e, 0);
            sl->state = SLOT_IDLE;
            return;
        }
        sl->state = SLOT_NEED_PATH;
    }
}

nm_slot *nm_slots_alloc(int m)
{
    slot_t *slots = (slot_t *)aligned_alloc(64, sizeof(slot_t) * SLOTS);
    if (!slots)
        return NULL;
    for (int q = 0; q < SLOTS; q++) {
        slots[q].t = tile_alloc(m);
        if (!slots[q].t) {
            while (q-- > 0)
                free(slots[q].t);
            free(slots);
            return NULL;
        }
        slots[q].state = SLOT_IDLE;
    }
    return slots;
}

void nm_slots_free(nm_slot *slots)
{
    for (int q = 0; q < SLOTS; q++)
        free(slots[q].t);
    free(slots);
}

/* SLOTS tiles in flight, one step each in turn; stops at the first error of any thread. */
NM_SIMD_CLONES void nm_general_run(nm_exact_ctx *c, nm_slot *slots, int64_t lo, int64_t hi)
{
    int64_t next = lo;
    for (;;) {
        int busy = 0;
        for (int q = 0; q < SLOTS; q++) {
            slot_t *sl = &slots[q];
            while (sl->state == SLOT_IDLE && next < hi) {
                if (next + PREFETCH_AHEAD < hi)
                    nm_prefetch_tile(c, next + PREFETCH_AHEAD);
                const int rc = slot_begin(sl, c, next++);
                if (rc != NM_OK) {
                    nm_set_error(&c->err, rc);
                    return;
                }
            }
            if (sl->state != SLOT_IDLE) {
                slot_step(sl, c);
                busy = 1;
            }
        }
        if (!busy || nm_get_error(&c->err) != NM_OK)
            break;
    }
}

/* For the warm start's probe (nm_warm_probe): tile k loaded into the first slot with the
 * previous prices in v and, unless own is NULL, the transpose and the tile's own start in
 * own; NULL for a tile that is all zero or has a bad score (the solve reports it). */
NM_SIMD_CLONES nm_tile *nm_probe_tile(nm_slot *slots, const nm_exact_ctx *c, int64_t k,
                                      double *v, double *own)
{
    nm_tile *t = slots[0].t;
    t->n = c->n;
    t->sat = c->sat;
    int err = NM_OK;
    const int e = load_tile(t, nm_tile_scores(c, k, t->in), &err, own == NULL, t->m);
    if (err != NM_OK || e == INT32_MIN)
        return NULL;
    start_prices(t, c, k, e, v);
    if (own)
        nm_price_rounds(t, start_rounds(t->m), own);
    return t;
}

/* Tile k alone, start to finish, in the first slot; returns an error code. */
NM_SIMD_CLONES int nm_general_tile(nm_slot *slots, const nm_exact_ctx *c, int64_t k)
{
    slot_t *sl = &slots[0];
    const int rc = slot_begin(sl, c, k);
    if (rc != NM_OK)
        return rc;
    while (sl->state != SLOT_IDLE)
        slot_step(sl, c);
    return NM_OK;
}
