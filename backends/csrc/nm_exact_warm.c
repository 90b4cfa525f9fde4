/* Exact solver, general path: the warm start from a previous solve (see nm_exact.c, step 0).
 *
 * The previous mask is often still optimal for the new scores, but the previous column
 * prices v sit at a vertex of the old dual polytope: many rows are tight, their least kept
 * s - v equal to their largest unkept one, and any change of the scores breaks about half of
 * those ties. So the prices are first fitted to the previous mask on the new scores, as a
 * system of differences solved by a Bellman-Ford on the columns. With a zero level z (the
 * prices are p = v - z, so that z can fall in place of every price rising), row i keeps its
 * choice while A_i <= B_i, with
 *   A_i = max(-z, largest s_ij - v_j where the row does not keep j),
 *   B_i = least s_ij - v_j where it keeps j;
 * that is, v_j <= hi_j = min over the rows keeping j of s_ij - A_i, for every j. A row keeping
 * fewer than n is unpriced (u_i = 0): its A_i is -z, and each unkept s_ij bounds v_j - z from
 * below, as 0 does every price; z is lowered to the least v_j - (that bound), and a column
 * keeping fewer than n (unpriced, p_j = 0) is held at z. Lowering v_j to hi_j raises the
 * unkept s - v of column j and so may lower other columns' hi: repeated, it ends at the
 * greatest fitting v and z below the previous ones, or runs out of passes. Then the previous
 * mask is optimal for the new scores by complementary slackness, priced p = v - z and
 * u_i = A_i + z. Else the tile is solved by the shortest paths, from the previous prices
 * (measured: the lowered ones leave more units to move once the mask has to change). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "nm_internal.h"

#define LANE NM_LANE

/* Passes of the Bellman-Ford at most: a tile that needs more takes the shortest paths. After
 * 1e-3 noise (2048² N(0,1)) 98.8% of the tiles fit at 4:8, 95.2% at 8:16, 83.1% at 16:32, in
 * 2.3, 3.1 and 4.4 passes on average; the optimal mask itself changed in 1.2%, 4.8% and
 * 16.2% of the tiles. */
#define WARM_PASSES 8

/* Tile k of the previous mask into t->x (bytes read as their lowest bit), and the tile's
 * scores split by it, row-major: keptR = s where kept, else +inf; freeR = s where not kept,
 * else -inf (padding columns: +inf and -inf). Rows keeping fewer than n are flagged in
 * short_row, columns in short_col (lanes); returns 0 if one keeps more than n. */
static inline __attribute__((always_inline)) int load_prev_mask(nm_tile *t,
                                                                const nm_exact_ctx *c, int64_t k,
                                                                uint8_t *short_row,
                                                                nm_vi *short_col, const int m)
{
    const int n = t->n, mp = NM_ROUNDW(m);
    const int64_t rs = c->warm_x_rs;
    int64_t tr, tq;
    nm_tile_place(&c->src, k, &tr, &tq);
    const uint8_t *p = c->warm_x + tr * m * rs + tq * m;
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    nm_vi cols[NM_MAX_M / NM_W];
    for (int q = 0; q < mp / NM_W; q++)
        cols[q] = (nm_vi){0};
    int ok = 1;
    for (int i = 0; i < m; i++) {
        uint8_t *x = t->x + i * mp;
        int j = 0, kept = 0;
        for (; j + 8 <= m; j += 8) { /* each byte to its lowest bit; their sum */
            uint64_t w;
            memcpy(&w, p + i * rs + j, sizeof w);
            w &= 0x0101010101010101ULL;
            memcpy(x + j, &w, sizeof w);
            kept += (int)((w * 0x0101010101010101ULL) >> 56);
        }
        for (; j < m; j++)
            kept += x[j] = p[i * rs + j] & 1;
        for (int j0 = 0; j0 < mp; j0 += NM_W) {
            const nm_vi keep = nm_vload_mask(x + j0) & ((LANE + j0) < m);
            const nm_vd s = nm_vload_d(t->s + i * mp + j0);
            const nm_vd kv = nm_vblend_d(keep, s, inf);
            const nm_vd fv = nm_vblend_d(keep | ((LANE + j0) >= m), -inf, s);
            memcpy(t->keptR + i * mp + j0, &kv, sizeof kv);
            memcpy(t->freeR + i * mp + j0, &fv, sizeof fv);
            cols[j0 / NM_W] -= keep;
        }
        ok &= kept <= n;
        short_row[i] = kept < n;
    }
    nm_vi over = {0};
    for (int j0 = 0; j0 < mp; j0 += NM_W) {
        const nm_vi valid = (LANE + j0) < m;
        over |= (cols[j0 / NM_W] > n) & valid;
        short_col[j0 / NM_W] = (cols[j0 / NM_W] < n) & valid;
    }
    return ok && !nm_any(over);
}

/* The largest lane of a, in every lane. */
static inline __attribute__((always_inline)) nm_vd lanes_max(nm_vd a)
{
    nm_vd o = __builtin_shuffle(a, (nm_vi){2, 3, 0, 1});
    a = nm_vblend_d(o > a, o, a);
    o = __builtin_shuffle(a, (nm_vi){1, 0, 3, 2});
    return nm_vblend_d(o > a, o, a);
}

/* Lane l of the result: the largest lane of a[l] (four horizontal maxima in three steps). */
static inline __attribute__((always_inline)) nm_vd lanes_max4(const nm_vd *a)
{
    _Static_assert(NM_W == 4, "four vectors of four lanes");
    const nm_vd p0 = __builtin_shuffle(a[0], a[1], (nm_vi){0, 4, 2, 6});
    const nm_vd q0 = __builtin_shuffle(a[0], a[1], (nm_vi){1, 5, 3, 7});
    const nm_vd p1 = __builtin_shuffle(a[2], a[3], (nm_vi){0, 4, 2, 6});
    const nm_vd q1 = __builtin_shuffle(a[2], a[3], (nm_vi){1, 5, 3, 7});
    const nm_vd t0 = nm_vblend_d(q0 > p0, q0, p0), t1 = nm_vblend_d(q1 > p1, q1, p1);
    const nm_vd lo = __builtin_shuffle(t0, t1, (nm_vi){0, 1, 4, 5});
    const nm_vd hi = __builtin_shuffle(t0, t1, (nm_vi){2, 3, 6, 7});
    return nm_vblend_d(hi > lo, hi, lo);
}

/* Lane-wise max(floor, s - v) over row i's unkept entries (freeR, -inf elsewhere). */
static inline __attribute__((always_inline)) nm_vd row_max(const nm_tile *t, int i,
                                                           const nm_vd *vv, nm_vd floor,
                                                           const int m)
{
    const int mp = NM_ROUNDW(m);
    nm_vd a = floor;
    for (int q = 0; q < mp / NM_W; q++) {
        const nm_vd f = nm_vload_d(t->freeR + i * mp + q * NM_W) - vv[q];
        a = nm_vblend_d(f > a, f, a);
    }
    return a;
}

/* Warm-start tile k (loaded into t->s; at most n, n < m) from column prices v (>= 0, scaled
 * like the scores; room for NM_ROUNDW(m) values): fits v as above. Returns 1 when the previous
 * mask is proven optimal, with it in t->x and its prices in u and v; else 0 (v then holds no
 * useful start). */
static inline __attribute__((always_inline)) int warm_tile(nm_tile *t, const nm_exact_ctx *c,
                                                            int64_t k, double *v, double *u,
                                                            const int m)
{
    const int mp = NM_ROUNDW(m), blocks = mp / NM_W;
    uint8_t short_row[NM_MAX_M];
    nm_vi short_col[NM_MAX_M / NM_W];
    if (!load_prev_mask(t, c, k, short_row, short_col, m))
        return 0;
    const nm_vd zero = {0}, inf = zero + HUGE_VAL;
    /* vv: the v above (prices v - z); low_j: the least v_j - z (0, or the largest unkept
     * score of a short row, whose u_i = 0), -inf on padding */
    nm_vd vv[NM_MAX_M / NM_W], low[NM_MAX_M / NM_W];
    nm_vi any_short = {0};
    for (int q = 0; q < blocks; q++) {
        for (int l = 0; l < NM_W; l++)
            vv[q][l] = q * NM_W + l < m ? v[q * NM_W + l] : 0.0;
        vv[q] = nm_vblend_d(short_col[q], zero, vv[q]); /* unpriced: a short column */
        low[q] = nm_vblend_d((LANE + q * NM_W) < m, zero, -inf);
        any_short |= short_col[q];
    }
    const int shorts = nm_any(any_short); /* a short row comes with a short column */
    for (int i = 0; i < m && shorts; i++) {
        if (!short_row[i])
            continue;
        for (int q = 0; q < blocks; q++) { /* bounds v from below; its A_i is the floor */
            const nm_vd f = nm_vload_d(t->freeR + i * mp + q * NM_W);
            low[q] = nm_vblend_d(f > low[q], f, low[q]);
            memcpy(t->freeR + i * mp + q * NM_W, &(nm_vd){0 - HUGE_VAL}, sizeof(nm_vd));
        }
    }
    double A[NM_MAX_M + NM_W], z = 0.0;
    /* v is lowered after each group of NM_W rows at m >= 16 (fewer passes), else after each
     * pass (the groups of a pass are then independent, which small tiles need more) */
    const int by_group = m >= 16;
    int fits = 0;
    for (int pass = 0; pass < WARM_PASSES && !fits; pass++) {
        nm_vi over = {0};
        nm_vd hi[NM_MAX_M / NM_W];
        for (int q = 0; q < blocks; q++)
            hi[q] = inf;
        const nm_vd floor = zero - z; /* kept s - v >= 0 */
        for (int i0 = 0; i0 < m; i0 += NM_W) { /* A_i of NM_W rows, hi_j = min s_ij - A_i */
            nm_vd a[NM_W];
            for (int r = 0; r < NM_W; r++) /* past row m: row i0 again, unused */
                a[r] = row_max(t, i0 + r < m ? i0 + r : i0, vv, floor, m);
            const nm_vd a4 = lanes_max4(a);
            memcpy(A + i0, &a4, sizeof a4);
            for (int r = 0; r < NM_W && i0 + r < m; r++)
                for (int q = 0; q < blocks; q++) { /* +inf where not kept and on padding */
                    const nm_vd h =
                        nm_vload_d(t->keptR + (i0 + r) * mp + q * NM_W) - a4[r];
                    hi[q] = nm_vblend_d(h < hi[q], h, hi[q]);
                }
            for (int q = 0; q < blocks && (by_group || i0 + NM_W >= m); q++) {
                const nm_vi gt = vv[q] > hi[q];
                over |= gt;
                vv[q] = nm_vblend_d(gt, hi[q], vv[q]);
                hi[q] = inf;
            }
        }
        nm_vd zm = inf; /* z <= v_j - low_j; the short columns at z */
        for (int q = 0; q < blocks; q++) {
            const nm_vd d = vv[q] - low[q];
            zm = nm_vblend_d(d < zm, d, zm);
        }
        zm = -lanes_max(-zm);
        const int zdown = zm[0] < z;
        z = zdown ? zm[0] : z;
        for (int q = 0; q < blocks; q++) {
            const nm_vi gt = short_col[q] & (vv[q] > z);
            over |= gt;
            vv[q] = nm_vblend_d(gt, zero + z, vv[q]);
        }
        fits = !nm_any(over) && !zdown; /* else lowered: another pass */
    }
    for (int q = 0; q < blocks; q++) { /* v has room for the padding */
        const nm_vd x = vv[q] - z;
        const nm_vd p = nm_vblend_d(x > zero, x, zero);
        memcpy(v + q * NM_W, &p, sizeof p);
    }
    for (int i0 = 0; i0 < m && fits; i0 += NM_W) { /* u: no more than m */
        const nm_vd x = nm_vload_d(A + i0) + z;
        const nm_vd p = nm_vblend_d(x > zero, x, zero);
        memcpy(u + i0, &p, sizeof(double) * (size_t)(m - i0 < NM_W ? m - i0 : NM_W));
    }
    return fits;
}

/* The fit with m a constant at the common sizes: its loops unroll and v stays in registers. */
NM_SIMD_CLONES int nm_warm_tile(nm_tile *t, const nm_exact_ctx *c, int64_t k, double *v,
                                double *u)
{
    switch (t->m) {
    case 8: return warm_tile(t, c, k, v, u, 8);
    case 16: return warm_tile(t, c, k, v, u, 16);
    case 32: return warm_tile(t, c, k, v, u, 32);
    default: return warm_tile(t, c, k, v, u, t->m);
    }
}

/* The units the shortest paths would have to move from the dual start with column prices v
 * on the loaded tile (its columns' and T's excess): how good a start v is. */
static int start_units(nm_tile *t, const double *v)
{
    nm_dual_start(t, v);
    int units = 0;
    for (int j = 0; j < t->m; j++)
        units += t->cdeg[j] > t->cflow[j] ? t->cdeg[j] - t->cflow[j] : 0;
    const int te = nm_t_excess(t);
    return units + (te > 0 ? te : 0);
}

/* A sample of tiles (every (t/64)-th, at most 64), in the first slot: the share whose
 * previous mask the warm start proves optimal on its own (nm_warm_tile; 1 when none could be
 * tried), and in *units, on every fourth of them, the units to move from the previous prices
 * over those from the tiles' own start (start_units; 1 when none). Reads and fits only:
 * nothing is written out. */
NM_SIMD_CLONES double nm_warm_probe(nm_slot *slots, const nm_exact_ctx *c, int64_t tiles,
                                    double *units)
{
    const int64_t samples = tiles < 64 ? tiles : 64, stride = tiles / (samples ? samples : 1);
    int tried = 0, fitted = 0;
    int64_t prev_units = 0, own_units = 0;
    for (int64_t q = 0; q < samples; q++) {
        const int64_t k = q * stride;
        double v[NM_MAX_M] NM_A64, u[NM_MAX_M], own[NM_MAX_M];
        nm_tile *t = nm_probe_tile(slots, c, k, v, q % 4 == 0 ? own : NULL);
        if (!t)
            continue;
        if (q % 4 == 0) {
            prev_units += start_units(t, v);
            own_units += start_units(t, own);
        }
        tried++;
        fitted += nm_warm_tile(t, c, k, v, u);
    }
    *units = prev_units ? (double)prev_units / (double)(own_units ? own_units : 1) : 1.0;
    return tried ? (double)fitted / tried : 1.0;
}
