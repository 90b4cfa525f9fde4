/* Exact solver, the general path's fallback: cycle cancelling on true costs (Bellman-Ford),
 * for the tiles that the shortest paths do not certify (see nm_exact.c), with the mask helpers
 * that finish_tile (nm_exact_general.c) also uses. Off the hot path: only tiles that fail the
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
