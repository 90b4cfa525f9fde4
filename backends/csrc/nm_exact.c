/* Exact transposable N:M masks: max-weight bipartite b-matching per tile as min-cost flow.
 *
 * Network per tile: S -> row i (cap n), row i -> col j (cap 1, cost -s_ij), col j -> T (cap n)
 * and, for "at most n", a zero-cost bypass S -> T. Node potentials p keep the reduced costs
 * c + p(a) - p(b) >= 0 on every residual arc, and give the LP's dual prices
 * u_i = p(row i) - p(T), v_j = p(T) - p(col j) (clipped at 0, which only touches empty rows
 * and columns).
 *
 * 1. Warm start, dual feasible: every row keeps its top n, u_i = its (n+1)-th largest score,
 *    v = 0. Only columns holding more than n violate the primal.
 * 2. Successive shortest paths: each unit of column excess goes to T along a shortest path
 *    (dense Dijkstra on reduced costs, stopped at T), then the potentials move by the
 *    distances. The potentials are the prices: the certificate comes out of the algorithm.
 * 3. Self-check: mask valid and |bound(u, v) - kept| <= NM_GAP_TOL * kept. A tile that fails
 *    is re-solved by cycle cancelling (Bellman-Ford on true costs, negative cycles cheaper than
 *    NM_BF_EPS ignored) and re-checked against NM_FALLBACK_TOL; still failing -> status 2.
 *
 * Tolerance: each tile is scaled by a power of two (exact) so its largest score is in
 * [0.5, 1); no overflow up to DBL_MAX. Reduced costs are float64 sums of a few terms of size
 * <= ~1, clamped at 0, so complementary slackness holds to a few ulps per arc and the gap to
 * (m*m + 2m) ulps at worst; NM_GAP_TOL = 1e-12 relative covers it, the self-check enforces it.
 *
 * M = 4 has its own copy of steps 1-3 (q4_*, below) with the tile in vector registers; its
 * tiles fall back to the general path when it cannot certify them.
 *
 * The hot loops are written with GCC vector extensions (NM_W lanes, nm_internal.h): with the
 * SIMD clones they become SSE4.2 / AVX2 code without data-dependent branches.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nm_internal.h"

#define NM_GAP_TOL 1e-12
#define NM_FALLBACK_TOL 1e-10
#define NM_BF_EPS 1e-14 /* in units of the tile's largest score */

double nm_gap_tol(void) { return NM_GAP_TOL; }
double nm_fallback_tol(void) { return NM_FALLBACK_TOL; }

/* Node layout, in two segments of SEG(m) nodes (a multiple of NM_W):
 *   A = [0, SEG):      T = 0, rows 1..m, inert padding;
 *   B = [SEG, 2 SEG):  columns SEG..SEG+m-1, S = SEG+m, inert padding.
 * Rows only reach columns and S (segment B); columns and S only reach T and rows (segment A).
 * A Dijkstra step relaxes one segment and re-scans the other for its minimum: two
 * fixed-length vector passes. Padding nodes have infinite costs and distances. */
#define ROUNDW(x) (((x) + NM_W - 1) & ~(NM_W - 1))
#define SEG(m) ROUNDW((m) + 1)
#define NODES (2 * SEG(NM_MAX_M))
#define NODE_T 0
#define NODE_ROW(i) (1 + (i))
#define NODE_COL(m, j) (SEG(m) + (j))
#define NODE_S(m) (SEG(m) + (m))
#define IS_ROW(m, a) ((a) >= 1 && (a) <= (m))
#define IS_COL(m, a) ((a) >= SEG(m) && (a) < SEG(m) + (m))
#define COL_OF(m, a) ((a) - SEG(m))
#define INF_BITS ((int64_t)0x7ff0000000000000LL)
#define A64 __attribute__((aligned(64)))

typedef uint8_t nm_vb __attribute__((vector_size(NM_W)));

#define LANE NM_LANE

typedef struct {
    int m, n, sat, mp, seg, stride; /* mp = ROUNDW(m); stride = 2 * seg */
    int rdeg[NM_MAX_M], cdeg[NM_MAX_M];
    int cflow[NM_MAX_M]; /* flow on col -> T; cdeg - cflow is the column's excess */
    /* Scaled scores, row-major and transposed, and the mask; row stride mp, zero padded. */
    double s[NM_MAX_M * NM_MAX_M] A64;
    double sT[NM_MAX_M * NM_MAX_M] A64;
    uint8_t x[NM_MAX_M * NM_MAX_M] A64;
    double pot[NODES] A64;
    double dist[NODES] A64;
    int64_t done[NODES] A64; /* 0, or -1 (all bits) once settled */
    int64_t prev[NODES] A64;
    /* cost[a*stride + b]: cost of the residual arc a -> b, +inf when absent. Only the arcs of
     * the network are ever written; every other entry stays +inf from tile_alloc. */
    double cost[] A64;
} tile_t;

static tile_t *tile_alloc(int m)
{
    const int st = 2 * SEG(m);
    const size_t bytes = sizeof(tile_t) + (size_t)st * st * sizeof(double);
    tile_t *t = (tile_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!t)
        return NULL;
    for (int a = 0; a < st * st; a++)
        t->cost[a] = HUGE_VAL;
    memset(t->s, 0, sizeof t->s);
    memset(t->sT, 0, sizeof t->sT);
    memset(t->x, 0, sizeof t->x);
    t->m = m;
    t->mp = ROUNDW(m);
    t->seg = SEG(m);
    t->stride = st;
    return t;
}

static inline __attribute__((always_inline)) nm_vi vload_i(const int64_t *p)
{
    nm_vi v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) nm_vd vload_d(const double *p)
{
    nm_vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) nm_vi vload_mask(const uint8_t *p)
{
    nm_vb b;
    memcpy(&b, p, sizeof b);
    return -__builtin_convertvector(b, nm_vi); /* bytes 0/1 -> lanes 0/-1 */
}

static inline __attribute__((always_inline)) nm_vd vblend_d(nm_vi mask, nm_vd a, nm_vd b)
{
    return (nm_vd)((mask & (nm_vi)a) | (~mask & (nm_vi)b));
}

static inline __attribute__((always_inline)) nm_vi vblend_i(nm_vi mask, nm_vi a, nm_vi b)
{
    return (mask & a) | (~mask & b);
}

static inline __attribute__((always_inline)) double hsum(nm_vd v)
{
    double s = 0.0;
    for (int q = 0; q < NM_W; q++)
        s += v[q];
    return s;
}

static inline __attribute__((always_inline)) int64_t hsum_i(nm_vi v)
{
    int64_t s = 0;
    for (int q = 0; q < NM_W; q++)
        s += v[q];
    return s;
}

static inline void set_arc(tile_t *t, int i, int j, int keep)
{
    const int m = t->m, st = t->stride;
    const double sij = t->s[i * t->mp + j];
    t->x[i * t->mp + j] = (uint8_t)keep;
    t->cost[NODE_ROW(i) * st + NODE_COL(m, j)] = keep ? HUGE_VAL : -sij;
    t->cost[NODE_COL(m, j) * st + NODE_ROW(i)] = keep ? sij : HUGE_VAL;
}

static inline void set_row_arcs(tile_t *t, int i)
{
    const int S = NODE_S(t->m), st = t->stride;
    t->cost[S * st + NODE_ROW(i)] = t->rdeg[i] < t->n ? 0.0 : HUGE_VAL;
    t->cost[NODE_ROW(i) * st + S] = t->rdeg[i] > 0 ? 0.0 : HUGE_VAL;
}

static inline void set_col_arc(tile_t *t, int j)
{
    t->cost[NODE_COL(t->m, j) * t->stride + NODE_T] = t->cflow[j] < t->n ? 0.0 : HUGE_VAL;
}

/* Every row keeps its top n (ties: lower index, as numpy's stable argsort) and prices its
 * (n+1)-th largest score. Ranks are counted for 8 rows at a time from the transposed tile:
 * rank_ij = #{k : s_ik > s_ij, or s_ik == s_ij and k < j}, branch-free. */
static inline __attribute__((always_inline)) void warm_start(tile_t *t)
{
    const int m = t->m, n = t->n, mp = t->mp, st = t->stride, seg = t->seg;
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    for (int a = 0; a < st; a++)
        t->pot[a] = 0.0;
    for (int j = 0; j < m; j++)
        t->cdeg[j] = 0;
    for (int i0 = 0; i0 < mp; i0 += NM_W) {
        const nm_vi valid = (LANE + i0) < m;
        nm_vd next = -inf;
        for (int j = 0; j < m; j++) {
            const nm_vd sj = vload_d(t->sT + j * mp + i0);
            nm_vi rank = {0};
            for (int k = 0; k < j; k++)
                rank -= vload_d(t->sT + k * mp + i0) >= sj;
            for (int k = j + 1; k < m; k++)
                rank -= vload_d(t->sT + k * mp + i0) > sj;
            const nm_vi keep = (rank < n) & valid;
            next = vblend_d(rank == n, sj, next);
            uint8_t *xj = t->x + i0 * mp + j;
            if (i0 + NM_W <= m) { /* a full block of rows */
                for (int q = 0; q < NM_W; q++)
                    xj[q * mp] = (uint8_t)(keep[q] & 1);
            } else {
                for (int q = 0; q < m - i0; q++)
                    xj[q * mp] = (uint8_t)(keep[q] & 1);
            }
            /* column j -> rows: +s where kept; +inf elsewhere and on padding lanes */
            const nm_vd back = vblend_d(keep, sj, inf);
            memcpy(t->cost + NODE_COL(m, j) * st + NODE_ROW(i0), &back, sizeof back);
            t->cdeg[j] -= (int)hsum_i(keep);
        }
        for (int q = 0; q < NM_W && i0 + q < m; q++)
            t->pot[NODE_ROW(i0 + q)] = next[q] > 0.0 ? next[q] : 0.0;
    }
    for (int i = 0; i < m; i++) {
        /* row i -> columns: -s where not kept; +inf where kept and on padding lanes (the
         * lane of S is rewritten by set_row_arcs) */
        double *fwd = t->cost + NODE_ROW(i) * st + seg;
        for (int j0 = 0; j0 < mp; j0 += NM_W) {
            const nm_vi keep = vload_mask(t->x + i * mp + j0) | ((LANE + j0) >= m);
            const nm_vd f = vblend_d(keep, inf, -vload_d(t->s + i * mp + j0));
            memcpy(fwd + j0, &f, sizeof f);
        }
        t->rdeg[i] = n; /* full: S -> row absent, row -> S open (set_row_arcs, unrolled) */
        t->cost[NODE_S(m) * st + NODE_ROW(i)] = HUGE_VAL;
        t->cost[NODE_ROW(i) * st + NODE_S(m)] = 0.0;
    }
    for (int j = 0; j < m; j++) {
        t->cflow[j] = t->cdeg[j] < n ? t->cdeg[j] : n;
        set_col_arc(t, j);
    }
    t->cost[NODE_S(m) * st + NODE_T] = t->sat ? HUGE_VAL : 0.0;
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
    k = vblend_i(lt, k, o);
    o = __builtin_shuffle(k, (nm_vi){1, 0, 3, 2});
    lt = k < o;
    k = vblend_i(lt, k, o);
    const int64_t lane = k[0] & (NM_W - 1);
    *at = where[lane];
    return key[lane];
}

/* Fold one block of keys into a running lane-wise minimum (value and node). */
#define NM_TRACK(B, W, KEY, IDX)                                                              \
    do {                                                                                      \
        const nm_vi lt_ = (KEY) < (B);                                                        \
        B = vblend_d(lt_, KEY, B);                                                            \
        W = vblend_i(lt_, IDX, W);                                                            \
    } while (0)

/* Relax the block of nodes [q, q + NM_W) from node a (distance da, potential pa) through the
 * cost row; return the block's keys. */
static inline __attribute__((always_inline)) nm_vd relax_block(tile_t *t, const double *row,
                                                               int q, nm_vd da, nm_vd pa,
                                                               nm_vi av)
{
    const nm_vd zero = {0}, inf = zero + HUGE_VAL;
    nm_vd r = pa + vload_d(row + q) - vload_d(t->pot + q);
    r = vblend_d(r > zero, r, zero); /* max(r, 0), as +0.0 */
    const nm_vd c = da + r;
    const nm_vd old = vload_d(t->dist + q);
    const nm_vi lt = c < old;
    const nm_vd nd = vblend_d(lt, c, old);
    const nm_vi np = vblend_i(lt, av, vload_i(t->prev + q));
    memcpy(t->dist + q, &nd, sizeof nd);
    memcpy(t->prev + q, &np, sizeof np);
    return vblend_d(vload_i(t->done + q), inf, nd);
}

/* Relax the segment [off, off + seg) from settled node a and return its lane-wise least key.
 * Reduced costs are clamped at 0, so candidates are >= dist(a): settled nodes never improve.
 * All comparisons are between doubles >= 0 or +inf (no NaN). */
static inline __attribute__((always_inline)) void relax_min(tile_t *t, int64_t a, int off,
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
static inline __attribute__((always_inline)) void seg_min(const tile_t *t, int off,
                                                          nm_vd *best, nm_vi *where)
{
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    nm_vd b0 = inf, b1 = inf;
    nm_vi w0 = {0}, w1 = {0};
    int q = off;
    for (; q + 2 * NM_W <= off + t->seg; q += 2 * NM_W) {
        const nm_vd k0 = vblend_d(vload_i(t->done + q), inf, vload_d(t->dist + q));
        const nm_vd k1 = vblend_d(vload_i(t->done + q + NM_W), inf,
                                  vload_d(t->dist + q + NM_W));
        NM_TRACK(b0, w0, k0, LANE + q);
        NM_TRACK(b1, w1, k1, LANE + (q + NM_W));
    }
    if (q < off + t->seg) {
        const nm_vd k0 = vblend_d(vload_i(t->done + q), inf, vload_d(t->dist + q));
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
static inline __attribute__((always_inline)) void settle(tile_t *t, int64_t a, frontier_t *f)
{
    const int blk = (int)a & ~(NM_W - 1);
    nm_vi d = vload_i(t->done + blk);
    d |= LANE == (a & (NM_W - 1));
    memcpy(t->done + blk, &d, sizeof d);
    nm_vd ba, bb;
    nm_vi wa, wb;
    if (IS_ROW(t->m, a)) { /* rows reach columns and S */
        relax_min(t, a, t->seg, &bb, &wb);
        seg_min(t, 0, &ba, &wa);
    } else { /* columns and S reach T and rows */
        relax_min(t, a, 0, &ba, &wa);
        seg_min(t, t->seg, &bb, &wb);
    }
    const nm_vi lt = bb < ba;
    f->best = vblend_d(lt, bb, ba);
    f->where = vblend_i(lt, wb, wa);
}

/* The least unsettled node (its key as bits; >= INF_BITS: none is left). */
static inline __attribute__((always_inline)) int64_t frontier_min(const frontier_t *f,
                                                                  int64_t *at)
{
    return lanes_min((nm_vi)f->best, f->where, at);
}

/* Potentials += min(dist, dist(T)); push one unit along the path to T. 1 on success. */
static inline __attribute__((always_inline)) int augment(tile_t *t, int src)
{
    const int m = t->m, st = t->stride;
    const nm_vd dT = (nm_vd){0} + t->dist[NODE_T];
    for (int a = 0; a < st; a += NM_W) {
        const nm_vd d = vload_d(t->dist + a);
        const nm_vd p = vload_d(t->pot + a) + vblend_d(d < dT, d, dT);
        memcpy(t->pot + a, &p, sizeof p);
    }
    int b = NODE_T, steps = 0;
    while (b != src) {
        const int a = (int)t->prev[b];
        if (a < 0 || a >= st || ++steps > st)
            return 0;
        if (IS_ROW(m, a) && IS_COL(m, b)) { /* keep (a, b) */
            set_arc(t, a - 1, COL_OF(m, b), 1);
            t->rdeg[a - 1]++;
            t->cdeg[COL_OF(m, b)]++;
            set_row_arcs(t, a - 1);
        } else if (IS_COL(m, a) && IS_ROW(m, b)) { /* drop (b, a) */
            set_arc(t, b - 1, COL_OF(m, a), 0);
            t->rdeg[b - 1]--;
            t->cdeg[COL_OF(m, a)]--;
            set_row_arcs(t, b - 1);
        } else if (IS_COL(m, a) && b == NODE_T) {
            t->cflow[COL_OF(m, a)]++;
            set_col_arc(t, COL_OF(m, a));
        } /* row -> S, S -> row, S -> T: the degrees already follow the mask */
        b = a;
    }
    return 1;
}

static void recount(tile_t *t)
{
    const int m = t->m, mp = t->mp;
    memset(t->rdeg, 0, sizeof t->rdeg);
    memset(t->cdeg, 0, sizeof t->cdeg);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            t->rdeg[i] += t->x[i * mp + j];
            t->cdeg[j] += t->x[i * mp + j];
        }
}

static int feasible(const tile_t *t)
{
    for (int i = 0; i < t->m; i++) {
        if (t->rdeg[i] > t->n || t->cdeg[i] > t->n)
            return 0;
        if (t->sat && (t->rdeg[i] != t->n || t->cdeg[i] != t->n))
            return 0;
    }
    return 1;
}

/* At most n: keep every unkept entry between a short row and a short column. Their prices
 * are 0, so complementary slackness forces these scores to 0: the objective and the
 * certificate are unchanged and the mask becomes maximal (fewer empty slots). */
static void fill_short(tile_t *t)
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

static void prices(const tile_t *t, double *u, double *v)
{
    const int m = t->m;
    const double pT = t->pot[NODE_T];
    for (int i = 0; i < m; i++) {
        u[i] = t->pot[NODE_ROW(i)] - pT;
        v[i] = pT - t->pot[NODE_COL(m, i)];
        if (!t->sat) {
            u[i] = u[i] > 0.0 ? u[i] : 0.0;
            v[i] = v[i] > 0.0 ? v[i] : 0.0;
        }
    }
}

/* Mask valid and the dual bound within tol (relative) of the kept score. */
static inline __attribute__((always_inline)) int verified(const tile_t *t, const double *u,
                                                          const double *v, double tol)
{
    const int m = t->m, n = t->n, mp = t->mp;
    double vpad[NM_MAX_M] A64;
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
            const nm_vd s8 = vload_d(t->s + i * mp + j0);
            const nm_vi x8 = vload_mask(t->x + i * mp + j0);
            nm_vd r = s8 - ui - vload_d(vpad + j0);
            slack += (nm_vd)((nm_vi)r & (r > zero));
            kept += (nm_vd)((nm_vi)s8 & x8);
            rows -= x8;
            cols[j0 / NM_W] -= x8;
        }
        const int64_t ri = hsum_i(rows);
        if (ri > n || (t->sat && ri != n))
            return 0;
    }
    for (int j = 0; j < m; j++) {
        const int64_t cj = cols[j / NM_W][j % NM_W];
        if (cj > n || (t->sat && cj != n))
            return 0;
    }
    const double k = hsum(kept);
    bound += hsum(slack);
    double scale = k > bound ? k : bound;
    if (scale < 0.5) /* the optimum is >= the largest score, which is >= 0.5 */
        scale = 0.5;
    return fabs(bound - k) <= tol * scale;
}

/* Cycle cancelling on the current (feasible) mask: Bellman-Ford from a virtual source on the
 * residual graph with true costs. A relaxation counts only when it gains more than eps, so
 * every cycle found costs less than -eps and the loop ends; on convergence the distances
 * are potentials with reduced costs >= -eps. Independent of the shortest-path code on
 * purpose. 1 on success. */
static int cycle_cancel(tile_t *t, double eps)
{
    const int m = t->m, n = t->n, mp = t->mp, S = NODE_S(m), T = NODE_T, V = t->stride;
    const int max_cancel = 4 * n * m + 64;
    double *d = t->dist;
    int64_t *pred = t->prev;
    for (int iter = 0; iter <= max_cancel; iter++) {
        recount(t);
        int total = 0;
        for (int i = 0; i < m; i++)
            total += t->rdeg[i];
        for (int a = 0; a < V; a++) {
            d[a] = 0.0;
            pred[a] = -1;
        }
        int last = -1;
#define BF_RELAX(A, B, C)                                                                     \
    do {                                                                                      \
        double nd_ = d[A] + (C);                                                              \
        if (nd_ < d[B] - eps) {                                                               \
            d[B] = nd_;                                                                       \
            pred[B] = (A);                                                                    \
            last = (B);                                                                       \
        }                                                                                     \
    } while (0)
        for (int pass = 0; pass < V; pass++) {
            last = -1;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < m; j++) {
                    const double sij = t->s[i * mp + j];
                    if (t->x[i * mp + j])
                        BF_RELAX(NODE_COL(m, j), NODE_ROW(i), sij);
                    else
                        BF_RELAX(NODE_ROW(i), NODE_COL(m, j), -sij);
                }
            for (int i = 0; i < m; i++) {
                if (t->rdeg[i] < n)
                    BF_RELAX(S, NODE_ROW(i), 0.0);
                if (t->rdeg[i] > 0)
                    BF_RELAX(NODE_ROW(i), S, 0.0);
                if (t->cdeg[i] < n)
                    BF_RELAX(NODE_COL(m, i), T, 0.0);
                if (t->cdeg[i] > 0)
                    BF_RELAX(T, NODE_COL(m, i), 0.0);
            }
            if (!t->sat) {
                BF_RELAX(S, T, 0.0);
                if (total < n * m)
                    BF_RELAX(T, S, 0.0);
            }
            if (last < 0)
                break;
        }
#undef BF_RELAX
        if (last < 0) {
            memcpy(t->pot, d, (size_t)V * sizeof(double));
            return 1;
        }
        int c0 = last;
        for (int k = 0; k < V; k++) { /* walk back into the cycle */
            c0 = (int)pred[c0];
            if (c0 < 0)
                return 0;
        }
        int b = c0, steps = 0;
        do {
            const int a = (int)pred[b];
            if (a < 0 || ++steps > V)
                return 0;
            if (IS_ROW(m, a) && IS_COL(m, b))
                t->x[(a - 1) * mp + COL_OF(m, b)] = 1;
            else if (IS_COL(m, a) && IS_ROW(m, b))
                t->x[(b - 1) * mp + COL_OF(m, a)] = 0;
            b = a;
        } while (b != c0);
    }
    return 0;
}

/* A feasible mask: empty, or the circulant band (exactly n per row and column). */
static void trivial_mask(tile_t *t, int full)
{
    const int m = t->m, n = t->n, mp = t->mp;
    memset(t->x, 0, (size_t)m * mp);
    if (full)
        for (int i = 0; i < m; i++)
            for (int k = 0; k < n; k++)
                t->x[i * mp + (i + k) % m] = 1;
    recount(t);
}

typedef struct {
    const double *tiles;
    int m, n, sat, flags;
    uint8_t *mask;
    double *u, *v;
    int8_t *status;
    int err;
} exact_ctx;

/* 2^k as a double, for -1022 <= k <= 1023 (exact, no libm call). */
static inline double pow2(int k)
{
    const uint64_t bits = (uint64_t)(k + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* The binary exponent e of x > 0 as frexp gives it (x = f * 2^e, f in [0.5, 1)). */
static inline int exponent_of(double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    const int biased = (int)((bits >> 52) & 0x7ff);
    if (biased == 0) { /* subnormal */
        int e;
        frexp(x, &e);
        return e;
    }
    return biased - 1022;
}

/* 2^-e and 2^e are normal doubles: the tile is scaled by a multiplication (else ldexp). */
#define NORMAL_SCALE(e) ((e) > -1000 && (e) < 1000)

/* Scan mm scores: 1 if one is NaN, infinite or negative, else 0 with the largest in *mx. */
static inline __attribute__((always_inline)) int scan_scores(const double *s, int mm, double *mx)
{
    const nm_vd zero = {0}, big = zero + DBL_MAX;
    nm_vd vmx = zero;
    nm_vi vbad = {0};
    int a = 0;
    for (; a + NM_W <= mm; a += NM_W) {
        const nm_vd x = vload_d(s + a);
        vbad |= ~(x >= zero) | (x > big); /* NaN fails the first test */
        vmx = vblend_d(x > vmx, x, vmx);
    }
    double best = 0.0;
    int bad = hsum_i(vbad) != 0;
    for (int q = 0; q < NM_W; q++)
        best = vmx[q] > best ? vmx[q] : best;
    for (; a < mm; a++) {
        const double sa = s[a];
        bad |= !(sa >= 0.0) | (sa > DBL_MAX);
        best = sa > best ? sa : best;
    }
    *mx = best;
    return bad;
}

/* Read, check and scale one tile into t->s / t->sT. Returns the binary exponent e of the
 * scale (scores were multiplied by 2^-e), or INT32_MIN for an all-zero tile. */
static inline __attribute__((always_inline)) int load_tile(tile_t *t, const double *s, int *err)
{
    const int m = t->m, mp = t->mp;
    double mx;
    if (scan_scores(s, m * m, &mx)) {
        *err = NM_ERR_VALUE;
        return 0;
    }
    if (mx == 0.0)
        return INT32_MIN;
    const int e = exponent_of(mx);
    const int fast = NORMAL_SCALE(e);
    const double f = fast ? pow2(-e) : 0.0;
    if (fast && m % NM_W == 0) { /* whole vectors, each also scattered into the transpose */
        for (int i = 0; i < m; i++)
            for (int j0 = 0; j0 < m; j0 += NM_W) {
                const nm_vd x = vload_d(s + i * m + j0) * f;
                memcpy(t->s + i * mp + j0, &x, sizeof x);
                for (int q = 0; q < NM_W; q++)
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

/* Everything after the shortest paths: fill, prices, self-check (and the fallback), scale
 * the prices back, write the mask out. */
static inline __attribute__((always_inline)) void finish_tile(tile_t *t, const exact_ctx *c,
                                                              int64_t k, int e, int ok)
{
    const int m = c->m, mp = t->mp;
    double *u = c->u + k * m, *v = c->v + k * m;
    int8_t status = NM_TILE_OK;
    if (e == INT32_MIN) { /* all zero: any full mask is optimal, prices 0 */
        trivial_mask(t, 1);
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
            recount(t);
            if (!ok || !feasible(t) || (c->flags & NM_FLAG_COLD_FALLBACK))
                trivial_mask(t, t->sat);
            if (cycle_cancel(t, NM_BF_EPS)) {
                recount(t);
                if (!t->sat)
                    fill_short(t);
                prices(t, u, v);
                if (!verified(t, u, v, NM_FALLBACK_TOL))
                    status = NM_TILE_UNVERIFIED;
            } else {
                status = NM_TILE_UNVERIFIED;
                recount(t);
                if (!feasible(t)) /* never hand back an invalid mask */
                    trivial_mask(t, t->sat);
                for (int i = 0; i < m; i++) /* proves nothing tight, but a valid bound */
                    u[i] = v[i] = t->sat ? 0.0 : 1.0;
            }
        }
        const int fast = NORMAL_SCALE(e);
        const double f = fast ? pow2(e) : 0.0;
        for (int i = 0; i < m; i++) {
            u[i] = fast ? u[i] * f : ldexp(u[i], e);
            v[i] = fast ? v[i] * f : ldexp(v[i], e);
        }
    }
    uint8_t *out = c->mask + k * m * m;
    for (int i = 0; i < m; i++)
        memcpy(out + i * m, t->x + i * mp, (size_t)m);
    c->status[k] = status;
}

/* ---- M = 4 (1:4, 2:4, 3:4, 4:4): the same algorithm with the tile in registers ----------
 *
 * A 4 x 4 tile is four NM_W-lane vectors, so the scores, the mask, and the potentials and
 * Dijkstra distances of the rows and of the columns are a vector each, with S and T as
 * scalars: a Dijkstra step is a handful of vector operations instead of passes over the
 * padded node arrays of the general path. Same warm start, potentials and self-check. A
 * tile this path does not certify, an all-zero tile and a tile whose scale is not a normal
 * power of two go through the general path (and its fallback) instead. */
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
    return vblend_d(r > (nm_vd){0}, r, (nm_vd){0}); /* max(r, 0), as +0.0 */
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
        next = vblend_d(rank == n, q->sT[j], next);
    }
    q4_transpose(q->xT, q->x);
    q->pr = vmax0(next);
    q->pc = (nm_vd){0};
    q->pS = q->pT = 0.0;
    q->rdeg = n;
    q->cdeg = -(q->x[0] + q->x[1] + q->x[2] + q->x[3]);
    q->cflow = vblend_i(q->cdeg < n, q->cdeg, n);
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
            dr = vblend_d(upd, cand, dr);
            prevr = vblend_i(upd, (nm_vi){0} + a, prevr);
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
            dc = vblend_d(upd, cand, dc);
            prevc = vblend_i(upd, (nm_vi){0} + a, prevc);
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
            dr = vblend_d(upd, cand, dr);
            prevr = vblend_i(upd, (nm_vi){0} + Q4_S, prevr);
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
        const nm_vi kr = ((nm_vi)vblend_d(doner, inf, dr) & ~low) | LANE;
        const nm_vi kc = ((nm_vi)vblend_d(donec, inf, dc) & ~low) | (LANE + 4);
        nm_vi k = vblend_i(kr < kc, kr, kc);
        nm_vi o = __builtin_shuffle(k, (nm_vi){2, 3, 0, 1});
        k = vblend_i(k < o, k, o);
        o = __builtin_shuffle(k, (nm_vi){1, 0, 3, 2});
        k = vblend_i(k < o, k, o);
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
    q->pr += vblend_d(dr < dTv, dr, dTv);
    q->pc += vblend_d(dc < dTv, dc, dTv);
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

static inline __attribute__((always_inline)) int q4_tile(const exact_ctx *c, int64_t k)
{
    const double *src = c->tiles + k * 16;
    const nm_vd zero = {0};
    double mx;
    if (scan_scores(src, 16, &mx))
        return NM_ERR_VALUE;
    if (mx == 0.0)
        return Q4_SKIPPED;
    const int e = exponent_of(mx);
    if (!NORMAL_SCALE(e))
        return Q4_SKIPPED;
    const double f = pow2(-e);
    q4_t q;
    for (int i = 0; i < 4; i++)
        q.s[i] = vload_d(src + 4 * i) * f;
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
        if (hsum_i(excess) == 0)
            break;
        if (paths >= 4 * q.n)
            return Q4_UNCERTIFIED;
        int j = 0;
        while (!excess[j])
            j++;
        if (!q4_path(&q, j))
            return Q4_UNCERTIFIED;
    }
    if (!q.sat && hsum_i((q.rdeg < n) | (q.cdeg < n)) != 0) /* fill_short: prices are 0 */
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
    if (hsum((u - u) + (v - v)) != 0.0) /* an infinite or NaN price */
        return Q4_UNCERTIFIED;
    nm_vd slack = zero, kept = zero;
    nm_vi cols = {0};
    for (int i = 0; i < 4; i++) {
        const nm_vd r = q.s[i] - u[i] - v;
        slack += (nm_vd)((nm_vi)r & (r > zero));
        kept += (nm_vd)((nm_vi)q.s[i] & q.x[i]);
        cols -= q.x[i];
        const int64_t ri = -hsum_i(q.x[i]);
        if (ri > q.n || (q.sat && ri != q.n))
            return Q4_UNCERTIFIED;
    }
    if (hsum_i((cols > n) | (q.sat ? cols != n : (nm_vi){0})) != 0)
        return Q4_UNCERTIFIED;
    const double kp = hsum(kept), bound = q.n * hsum(u) + q.n * hsum(v) + hsum(slack);
    double scale = kp > bound ? kp : bound;
    if (scale < 0.5) /* the optimum is >= the largest score, which is >= 0.5 */
        scale = 0.5;
    if (!(fabs(bound - kp) <= NM_GAP_TOL * scale))
        return Q4_UNCERTIFIED;
    const double g = pow2(e);
    u *= g;
    v *= g;
    memcpy(c->u + k * 4, &u, sizeof u);
    memcpy(c->v + k * 4, &v, sizeof v);
    uint8_t *out = c->mask + k * 16;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (uint8_t)(q.x[i][j] & 1);
    c->status[k] = NM_TILE_OK;
    return Q4_SOLVED;
}

/* One tile in flight. The Dijkstra of a single tile is a chain of dependent steps (argmin,
 * relax, argmin, ...); SLOTS tiles advance in turn, one step each, so that the processor
 * overlaps their chains. The results are the same as solving the tiles one by one. */
#define SLOTS 2
enum { SLOT_IDLE, SLOT_NEED_PATH, SLOT_SEARCH };

typedef struct {
    frontier_t front; /* Dijkstra: lane minima of the unsettled nodes */
    tile_t *t;
    int64_t k;
    int e, state, col, src, paths;
} slot_t;

/* Load tile k into the slot and warm-start it; returns an error code. */
static inline __attribute__((always_inline)) int slot_begin(slot_t *sl, const exact_ctx *c,
                                                            int64_t k)
{
    tile_t *t = sl->t;
    t->n = c->n;
    t->sat = c->sat;
    int err = NM_OK;
    sl->k = k;
    sl->e = load_tile(t, c->tiles + k * c->m * c->m, &err);
    if (err != NM_OK)
        return err;
    if (sl->e == INT32_MIN) {
        finish_tile(t, c, k, sl->e, 1);
        sl->state = SLOT_IDLE;
        return NM_OK;
    }
    warm_start(t);
    sl->col = 0;
    sl->paths = 0;
    sl->state = SLOT_NEED_PATH;
    return NM_OK;
}

/* Advance a slot by one step: start a path search, settle one node, or finish the tile. */
static inline __attribute__((always_inline)) void slot_step(slot_t *sl, const exact_ctx *c)
{
    tile_t *t = sl->t;
    const int m = t->m;
    if (sl->state == SLOT_NEED_PATH) {
        while (sl->col < m && t->cdeg[sl->col] <= t->cflow[sl->col])
            sl->col++;
        if (sl->col == m) {
            finish_tile(t, c, sl->k, sl->e, 1);
            sl->state = SLOT_IDLE;
            return;
        }
        if (++sl->paths > t->n * m) {
            finish_tile(t, c, sl->k, sl->e, 0);
            sl->state = SLOT_IDLE;
            return;
        }
        sl->src = NODE_COL(m, sl->col);
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
    int reached = 0;
    if (frontier_min(&sl->front, &a) >= INF_BITS) {
        finish_tile(t, c, sl->k, sl->e, 0); /* no path: impossible, the fallback decides */
        sl->state = SLOT_IDLE;
        return;
    }
    if (a == NODE_T) {
        reached = 1;
    } else {
        settle(t, a, &sl->front);
        /* a column with room reaches T at no extra reduced cost: T would be settled next
         * and change nothing */
        reached = t->dist[NODE_T] <= t->dist[a];
    }
    if (reached) {
        if (!augment(t, sl->src)) {
            finish_tile(t, c, sl->k, sl->e, 0);
            sl->state = SLOT_IDLE;
            return;
        }
        sl->state = SLOT_NEED_PATH;
    }
}

NM_SIMD_CLONES static void exact_task(void *vctx, int64_t lo, int64_t hi)
{
    exact_ctx *c = (exact_ctx *)vctx;
    slot_t *slots = (slot_t *)aligned_alloc(64, sizeof(slot_t) * SLOTS);
    int nslots = 0;
    if (!slots) {
        nm_set_error(&c->err, NM_ERR_NOMEM);
        return;
    }
    for (; nslots < SLOTS; nslots++) {
        slots[nslots].t = tile_alloc(c->m);
        if (!slots[nslots].t) {
            nm_set_error(&c->err, NM_ERR_NOMEM);
            goto done;
        }
        slots[nslots].state = SLOT_IDLE;
    }
    int64_t next = lo;
    if (c->m == 4 && !(c->flags & (NM_FLAG_FORCE_FALLBACK | NM_FLAG_COLD_FALLBACK |
                                   NM_FLAG_GENERAL_PATH))) {
        for (; next < hi; next++) {
            const int rc = q4_tile(c, next);
            if (rc < 0) {
                nm_set_error(&c->err, rc);
                goto done;
            }
            if (rc != Q4_SOLVED) { /* the general path, one tile at a time */
                slot_t *sl = &slots[0];
                const int rc2 = slot_begin(sl, c, next);
                if (rc2 != NM_OK) {
                    nm_set_error(&c->err, rc2);
                    goto done;
                }
                while (sl->state != SLOT_IDLE)
                    slot_step(sl, c);
                if (rc == Q4_UNCERTIFIED && c->status[next] == NM_TILE_OK)
                    c->status[next] = NM_TILE_FALLBACK;
            }
        }
        goto done;
    }
    for (;;) {
        int busy = 0;
        for (int q = 0; q < SLOTS; q++) {
            slot_t *sl = &slots[q];
            while (sl->state == SLOT_IDLE && next < hi) {
                const int rc = slot_begin(sl, c, next++);
                if (rc != NM_OK) {
                    nm_set_error(&c->err, rc);
                    goto done;
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
done:
    for (int q = 0; q < nslots; q++)
        free(slots[q].t);
    free(slots);
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
    exact_ctx c = {tiles, m, n, saturate != 0, flags, mask, u, v, status, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 16, 1), exact_task, &c);
    return c.err;
}
