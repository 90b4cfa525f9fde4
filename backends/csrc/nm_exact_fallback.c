/* Exact solver, the general path's fallback: cycle cancelling on true costs (Bellman-Ford),
 * for the tiles that the shortest paths do not certify (see nm_exact.c), with the mask helpers
 * that finish_tile (nm_exact_general.c) also uses, and the potentials of a warm start. Off the hot path: only tiles that fail the
 * self-check, all-zero tiles (nm_trivial_mask) and the testing flags come here. */
#include <string.h>

#include "nm_internal.h"

void nm_recount(nm_tile *t)
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

int nm_feasible(const nm_tile *t)
{
    for (int i = 0; i < t->m; i++) {
        if (t->rdeg[i] > t->n || t->cdeg[i] > t->n)
            return 0;
        if (t->sat && (t->rdeg[i] != t->n || t->cdeg[i] != t->n))
            return 0;
    }
    return 1;
}

/* Cycle cancelling on the current (feasible) mask: Bellman-Ford from a virtual source on the
 * residual graph with true costs. A relaxation counts only when it gains more than eps, so
 * every cycle found costs less than -eps and the loop ends; on convergence the distances
 * are potentials with reduced costs >= -eps. Independent of the shortest-path code on
 * purpose. 1 on success. */
int nm_cycle_cancel(nm_tile *t, double eps)
{
    const int m = t->m, n = t->n, mp = t->mp, S = NM_NODE_S(m), T = NM_NODE_T, V = t->stride;
    const int max_cancel = 4 * n * m + 64;
    double *d = t->dist;
    int64_t *pred = t->prev;
    for (int iter = 0; iter <= max_cancel; iter++) {
        nm_recount(t);
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
                        BF_RELAX(NM_NODE_COL(m, j), NM_NODE_ROW(i), sij);
                    else
                        BF_RELAX(NM_NODE_ROW(i), NM_NODE_COL(m, j), -sij);
                }
            for (int i = 0; i < m; i++) {
                if (t->rdeg[i] < n)
                    BF_RELAX(S, NM_NODE_ROW(i), 0.0);
                if (t->rdeg[i] > 0)
                    BF_RELAX(NM_NODE_ROW(i), S, 0.0);
                if (t->cdeg[i] < n)
                    BF_RELAX(NM_NODE_COL(m, i), T, 0.0);
                if (t->cdeg[i] > 0)
                    BF_RELAX(T, NM_NODE_COL(m, i), 0.0);
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
            if (NM_IS_ROW(m, a) && NM_IS_COL(m, b))
                t->x[(a - 1) * mp + NM_COL_OF(m, b)] = 1;
            else if (NM_IS_COL(m, a) && NM_IS_ROW(m, b))
                t->x[(b - 1) * mp + NM_COL_OF(m, a)] = 0;
            b = a;
        } while (b != c0);
    }
    return 0;
}

/* Shortest-path potentials of the current mask's residual network (at most n), by
 * Bellman-Ford passes that start from t->pot: when those are nearly feasible (a previous
 * solve's, the scores having changed a little) a few passes settle them. A pass relaxes
 * rows -> columns (unkept arcs, cost -s), columns -> T -> columns, columns -> rows (kept arcs,
 * cost +s), rows -> S -> rows and S <-> T, NM_W columns at a time; a relaxation counts only
 * when it gains more than eps. 1 with t->pot updated; 0 when the passes do not settle within
 * min(2m + 2, 16) passes (a negative cycle, the mask no longer optimal, or too slow a start:
 * the caller then solves the tile cold). */
NM_SIMD_CLONES int nm_settle_potentials(nm_tile *t, double eps)
{
    const int m = t->m, n = t->n, mp = t->mp, S = NM_NODE_S(m), T = NM_NODE_T;
    const nm_vd zero = {0}, inf = zero + HUGE_VAL, veps = zero + eps;
    double dc[NM_MAX_M] NM_A64, dr[NM_MAX_M];
    int total = 0;
    for (int j = 0; j < mp; j++)
        dc[j] = j < m ? t->pot[NM_NODE_COL(m, j)] : HUGE_VAL;
    for (int i = 0; i < m; i++) {
        dr[i] = t->pot[NM_NODE_ROW(i)];
        total += t->rdeg[i];
    }
    double dS = t->pot[S], dT = t->pot[T];
    const int bypass = !t->sat, back = !t->sat && total < n * m;
    const int passes = 2 * m + 2 < 16 ? 2 * m + 2 : 16;
    for (int pass = 0; pass <= passes; pass++) {
        int changed = 0;
        for (int i = 0; i < m; i++) { /* row i -> unkept columns */
            const nm_vd di = zero + dr[i];
            for (int j0 = 0; j0 < mp; j0 += NM_W) {
                const nm_vi open = ~nm_vload_mask(t->x + i * mp + j0) & ((NM_LANE + j0) < m);
                const nm_vd c = nm_vblend_d(open, di - nm_vload_d(t->s + i * mp + j0), inf);
                const nm_vd old = nm_vload_d(dc + j0);
                const nm_vi lt = c < old - veps;
                const nm_vd nd = nm_vblend_d(lt, c, old);
                memcpy(dc + j0, &nd, sizeof nd);
                changed |= nm_hsum_i(lt) != 0;
            }
        }
        for (int j = 0; j < m; j++) { /* columns <-> T */
            if (t->cdeg[j] < n && dc[j] < dT - eps) {
                dT = dc[j];
                changed = 1;
            }
        }
        for (int j = 0; j < m; j++)
            if (t->cdeg[j] > 0 && dT < dc[j] - eps) {
                dc[j] = dT;
                changed = 1;
            }
        for (int i = 0; i < m; i++) { /* kept columns -> row i */
            nm_vd best = inf;
            for (int j0 = 0; j0 < mp; j0 += NM_W) {
                const nm_vi kept = nm_vload_mask(t->x + i * mp + j0);
                const nm_vd c = nm_vload_d(dc + j0) + nm_vload_d(t->s + i * mp + j0);
                best = nm_vblend_d(kept & (c < best), c, best);
            }
            double b = best[0];
            for (int q = 1; q < NM_W; q++)
                b = best[q] < b ? best[q] : b;
            if (b < dr[i] - eps) {
                dr[i] = b;
                changed = 1;
            }
        }
        for (int i = 0; i < m; i++) /* rows -> S */
            if (t->rdeg[i] > 0 && dr[i] < dS - eps) {
                dS = dr[i];
                changed = 1;
            }
        if (bypass && dS < dT - eps) {
            dT = dS;
            changed = 1;
        }
        if (back && dT < dS - eps) {
            dS = dT;
            changed = 1;
        }
        for (int i = 0; i < m; i++) /* S -> rows */
            if (t->rdeg[i] < n && dS < dr[i] - eps) {
                dr[i] = dS;
                changed = 1;
            }
        if (!changed) {
            for (int j = 0; j < m; j++)
                t->pot[NM_NODE_COL(m, j)] = dc[j];
            for (int i = 0; i < m; i++)
                t->pot[NM_NODE_ROW(i)] = dr[i];
            t->pot[S] = dS;
            t->pot[T] = dT;
            return 1;
        }
    }
    return 0;
}

/* A feasible mask: empty, or the circulant band (exactly n per row and column). */
void nm_trivial_mask(nm_tile *t, int full)
{
    const int m = t->m, n = t->n, mp = t->mp;
    memset(t->x, 0, (size_t)m * mp);
    if (full)
        for (int i = 0; i < m; i++)
            for (int k = 0; k < n; k++)
                t->x[i * mp + (i + k) % m] = 1;
    nm_recount(t);
}
