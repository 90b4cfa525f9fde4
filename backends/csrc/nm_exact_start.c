/* Exact solver, general path: the dual start (see nm_exact.c, step 1).
 *
 * Column prices v >= 0 come from a previous solve (a warm start) or from a few rounds of dual
 * coordinate descent on the tile: u_i = max(0, (n+1)-th largest of s_ij - v_j over j), then
 * v_j = max(0, n-th largest of s_ij - u_i over i). Every row then keeps its top n of s - v
 * (only values >= 0), priced by the (n+1)-th. Whatever v is, the result is dual feasible; the
 * better v is, the fewer units the shortest paths have to move: at 16:32, 36 units per tile
 * with v = 0, 6.3 after six rounds. */
#include <math.h>
#include <string.h>

#include "nm_internal.h"
#include "nm_network.h"

#define LANE NM_LANE

/* The price rounds work in float (their prices are only a starting point: any v >= 0 is
 * one), NM_F rows or columns at a time in one vector; the start itself in double. */

/* Rounds of dual coordinate descent from v = 0 (see above) into v[0..m); n < m. m is a
 * constant where nm_price_rounds specialises. The scores are rounded to float once, row-major
 * and transposed (NM_F-lane rows; lanes past m are zero padding, unused). */
static inline __attribute__((always_inline)) void price_rounds(const nm_tile *t, int rounds,
                                                               double *v, const int m)
{
    const int n = t->n, mp = NM_ROUNDW(m), fp = (m + NM_F - 1) / NM_F * NM_F;
    const nm_vf zero = {0};
    float u[NM_MAX_M + NM_F], vf[NM_MAX_M + NM_F];
    float sf[NM_MAX_M * (NM_MAX_M + NM_F)] __attribute__((aligned(32)));
    float sfT[NM_MAX_M * (NM_MAX_M + NM_F)] __attribute__((aligned(32)));
    nm_vf a[NM_MAX_M];
    for (int i = 0; i < m; i++)
        for (int j = 0; j < fp; j++) {
            sf[i * fp + j] = j < mp ? (float)t->s[i * mp + j] : 0.0f;
            sfT[i * fp + j] = j < mp ? (float)t->sT[i * mp + j] : 0.0f;
        }
    for (int j = 0; j < m; j++)
        vf[j] = 0.0f;
    for (int r = 0; r < rounds; r++) {
        for (int i0 = 0; i0 < m; i0 += NM_F) { /* NM_F rows, from the transposed tile */
            for (int j = 0; j < m; j++) {
                nm_vf x;
                memcpy(&x, sfT + j * fp + i0, sizeof x);
                a[j] = x - vf[j];
            }
            const nm_vf k = kth_f(a, m, n + 1);
            const nm_vf ui = (nm_vf)((nm_vm)k & (k > zero));
            memcpy(u + i0, &ui, sizeof ui);
        }
        for (int j0 = 0; j0 < m; j0 += NM_F) { /* NM_F columns */
            for (int i = 0; i < m; i++) {
                nm_vf x;
                memcpy(&x, sf + i * fp + j0, sizeof x);
                a[i] = x - u[i];
            }
            const nm_vf k = kth_f(a, m, n);
            const nm_vf vj = (nm_vf)((nm_vm)k & (k > zero));
            memcpy(vf + j0, &vj, sizeof vj);
        }
    }
    for (int j = 0; j < m; j++)
        v[j] = vf[j];
}

/* price_rounds with m a constant at the common sizes. */
NM_SIMD_CLONES void nm_price_rounds(const nm_tile *t, int rounds, double *v)
{
    switch (t->m) {
    case 8: price_rounds(t, rounds, v, 8); break;
    case 16: price_rounds(t, rounds, v, 16); break;
    case 32: price_rounds(t, rounds, v, 32); break;
    default: price_rounds(t, rounds, v, t->m); break;
    }
}

/* The start from column prices v[0..m) (>= 0; all 0 with sat): every row keeps its top n of
 * s - v (ties: lower index, as numpy's stable argsort; at most n, only values >= 0) and is
 * priced u_i = max(0, its (n+1)-th largest). NM_W rows at a time from the transposed tile:
 * the (n+1)-th largest by the selection network, the top n as the values above it and, where
 * those are fewer than n (a tie at the boundary), the first values equal to it; at m <= 8 or
 * n = m by counting ranks. A column with a price holds its full n toward T (cflow = n), so
 * complementary slackness holds: it is a sink while it keeps fewer. The residual network is
 * left to nm_build_network: a tile with nothing to move needs none. */
static inline __attribute__((always_inline)) void dual_start(nm_tile *t, const double *v,
                                                             const int m)
{
    const int n = t->n, mp = NM_ROUNDW(m), st = 2 * NM_SEG(m);
    const nm_vd zero = {0};
    const nm_vi all = (nm_vi){0} - 1;
    nm_vd r[NM_MAX_M], work[NM_MAX_M];
    nm_vi top[NM_MAX_M];
    for (int a = 0; a < st; a++)
        t->pot[a] = 0.0;
    for (int j = 0; j < m; j++)
        t->cdeg[j] = 0;
    t->nkept = 0;
    for (int i0 = 0; i0 < mp; i0 += NM_W) {
        const nm_vi valid = (LANE + i0) < m;
        for (int j = 0; j < m; j++)
            work[j] = r[j] = nm_vload_d(t->sT + j * mp + i0) - v[j];
        nm_vd next = zero - HUGE_VAL;
        nm_vi count = {0};
        if (n < m && m > 8) { /* (at 8 and below, counting ranks is as fast) */
            next = kth_d(work, m, n + 1);
            for (int j = 0; j < m; j++) {
                top[j] = r[j] > next;
                count -= top[j];
            }
            /* fewer than n above it: a tie at the boundary (common with float32 weights and
             * prices from float rounds); the values equal to it fill the top n by index */
            nm_vi need = ((nm_vi){0} + n - count) & valid;
            for (int j = 0; j < m && nm_any(need); j++) {
                const nm_vi take = (r[j] == next) & (need > 0);
                top[j] |= take;
                need += take;
            }
        } else {
            top_by_rank(r, m, n, top, &next);
        }
        nm_vi rdeg = {0};
        for (int j = 0; j < m; j++) {
            const nm_vi keep = top[j] & valid & (t->sat ? all : (r[j] >= zero));
            uint8_t *xj = t->x + i0 * mp + j;
            for (int q = 0; q < NM_W && i0 + q < m; q++)
                xj[q * mp] = (uint8_t)(keep[q] & 1);
            const nm_vb kb = __builtin_convertvector(keep & 1, nm_vb);
            memcpy(t->xT + j * mp + i0, &kb, sizeof kb);
            t->cdeg[j] -= (int)nm_hsum_i(keep);
            rdeg -= keep;
        }
        for (int q = 0; q < NM_W && i0 + q < m; q++) {
            t->pot[NM_NODE_ROW(i0 + q)] = next[q] > 0.0 ? next[q] : 0.0;
            t->rdeg[i0 + q] = (int)rdeg[q];
            t->nkept += (int)rdeg[q];
        }
    }
    for (int j = 0; j < m; j++) {
        t->pot[NM_NODE_COL(m, j)] = -v[j];
        t->cflow[j] = v[j] > 0.0 ? n : (t->cdeg[j] < n ? t->cdeg[j] : n);
    }
}

/* dual_start with m a constant at M = 8, where its rank counting then unrolls (at 16 and 32
 * the unrolled selection network measured slower). */
NM_SIMD_CLONES void nm_dual_start(nm_tile *t, const double *v)
{
    if (t->m == 8)
        dual_start(t, v, 8);
    else
        dual_start(t, v, t->m);
}

/* The residual network of the start (every arc of it; entries that are no arc stay +inf
 * from the tile's allocation): before any unit has moved, so t->xT is still the mask. */
NM_SIMD_CLONES void nm_build_network(nm_tile *t)
{
    const int m = t->m, n = t->n, mp = t->mp, st = t->stride, seg = t->seg;
    const nm_vd inf = (nm_vd){0} + HUGE_VAL;
    for (int j = 0; j < m; j++) {
        /* column j -> rows: +s where kept; +inf elsewhere and on padding lanes */
        for (int i0 = 0; i0 < mp; i0 += NM_W) {
            const nm_vi keep = nm_vload_mask(t->xT + j * mp + i0);
            const nm_vd back = nm_vblend_d(keep, nm_vload_d(t->sT + j * mp + i0), inf);
            memcpy(t->cost + NM_NODE_COL(m, j) * st + NM_NODE_ROW(i0), &back, sizeof back);
        }
        nm_set_col_arcs(t, j);
    }
    for (int i = 0; i < m; i++) {
        /* row i -> columns: -s where not kept; +inf where kept and on padding lanes (the
         * lane of S is rewritten below) */
        double *fwd = t->cost + NM_NODE_ROW(i) * st + seg;
        for (int j0 = 0; j0 < mp; j0 += NM_W) {
            const nm_vi keep = nm_vload_mask(t->x + i * mp + j0) | ((LANE + j0) >= m);
            const nm_vd f = nm_vblend_d(keep, inf, -nm_vload_d(t->s + i * mp + j0));
            memcpy(fwd + j0, &f, sizeof f);
        }
        t->cost[NM_NODE_S(m) * st + NM_NODE_ROW(i)] = t->rdeg[i] < n ? 0.0 : HUGE_VAL;
        t->cost[NM_NODE_ROW(i) * st + NM_NODE_S(m)] = t->rdeg[i] > 0 ? 0.0 : HUGE_VAL;
    }
    t->cost[NM_NODE_S(m) * st + NM_NODE_T] = t->sat ? HUGE_VAL : 0.0;
    nm_set_bypass(t);
}
