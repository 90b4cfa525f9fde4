/* Descent prices: the cheap certificate of approximate masks (greedy, user callables), the C
 * version of nmopt.certificates.descent_prices, which documents the method. Per tile, from
 * each start v_j = beta * max(0, (n+1)-th largest of column j), sweeps of
 *
 *   u_i = max(0, (n+1)-th largest of s_ij - v_j over j),  v_j = max(0, (n+1)-th largest of
 *   s_ij - u_i over i),
 *
 * then the start whose bound n*sum(u) + n*sum(v) + sum(max(0, s - u - v)) is lowest (the first
 * on a tie). The prices of each start are the reference's bit for bit; the bounds are summed
 * in another order, so two starts whose bounds tie to rounding may be chosen differently. NM_W
 * rows or columns at a time, by the selection network of nm_network.h. */
#include <math.h>
#include <string.h>

#include "nm_internal.h"
#include "nm_network.h"

static inline __attribute__((always_inline)) nm_vd max0(nm_vd x)
{
    return nm_vblend_d(x >= (nm_vd){0}, x, (nm_vd){0});
}

/* k-th largest of each of NM_W columns j0.. of the padded tile a (rows of mp) minus the row
 * prices p (NULL: none), clipped at 0, into out[j0..). */
static inline __attribute__((always_inline)) void kth_cols(const double *a, int m, int mp,
                                                           const double *p, int k, double *out)
{
    nm_vd w[NM_MAX_M];
    for (int j0 = 0; j0 < m; j0 += NM_W) {
        for (int i = 0; i < m; i++)
            w[i] = nm_vload_d(a + i * mp + j0) - (p ? p[i] : 0.0);
        nm_vd x;
        if (m <= 8) { /* counting ranks: straight-line code, faster than the network here */
            nm_vi top[NM_MAX_M];
            top_by_rank(w, m, k - 1, top, &x);
        } else {
            x = kth_d(w, m, k);
        }
        x = max0(x);
        memcpy(out + j0, &x, sizeof x);
    }
}

static inline __attribute__((always_inline)) double bound_of(const double *s, int m, int mp,
                                                              int n, const double *u,
                                                              const double *v)
{
    double prices = 0.0;
    nm_vd slack = {0};
    for (int i = 0; i < m; i++) {
        prices += u[i] + v[i];
        for (int j0 = 0; j0 < mp; j0 += NM_W) /* padding lanes: s = 0 and v = 0 */
            slack += max0(nm_vload_d(s + i * mp + j0) - u[i] - nm_vload_d(v + j0));
    }
    return n * prices + nm_hsum(slack);
}

/* One tile's prices into u_out, v_out (m each); NM_ERR_VALUE on a score that is not finite. */
static inline __attribute__((always_inline)) int descent_tile(
    const double *tile, const int m, int n, int sweeps, const double *starts, int nstarts,
    double *u_out, double *v_out)
{
    const int mp = NM_ROUNDW(m);
    double s[NM_MAX_M * NM_MAX_M] NM_A64, sT[NM_MAX_M * NM_MAX_M] NM_A64;
    double col[NM_MAX_M] NM_A64, u[NM_MAX_M] NM_A64, v[NM_MAX_M] NM_A64;
    double finite = 0.0; /* stays 0 unless a score is infinite or NaN */
    for (int i = 0; i < m; i++)
        for (int j = 0; j < mp; j++) {
            s[i * mp + j] = j < m ? tile[i * m + j] : 0.0;
            sT[i * mp + j] = j < m ? tile[j * m + i] : 0.0;
            finite += s[i * mp + j] - s[i * mp + j];
        }
    memset(u_out, 0, sizeof(double) * m);
    memset(v_out, 0, sizeof(double) * m);
    if (finite != 0.0)
        return NM_ERR_VALUE;
    if (n >= m)
        return NM_OK;
    memset(u + m, 0, sizeof(double) * (mp - m));
    memset(v + m, 0, sizeof(double) * (mp - m));
    kth_cols(s, m, mp, NULL, n + 1, col);
    double best = HUGE_VAL;
    for (int b = 0; b < nstarts; b++) {
        for (int j = 0; j < m; j++)
            v[j] = starts[b] * col[j];
        for (int r = 0; r < sweeps; r++) {
            kth_cols(sT, m, mp, v, n + 1, u); /* rows of s are columns of sT */
            kth_cols(s, m, mp, u, n + 1, v);
        }
        const double bound = bound_of(s, m, mp, n, u, v);
        if (bound < best) {
            best = bound;
            memcpy(u_out, u, sizeof(double) * m);
            memcpy(v_out, v, sizeof(double) * m);
        }
    }
    return NM_OK;
}

NM_SIMD_CLONES int nm_descent_tile(const double *tile, int m, int n, int sweeps,
                                   const double *starts, int nstarts, double *u, double *v)
{
    switch (m) { /* m a constant at the common sizes: the loops unroll */
    case 4: return descent_tile(tile, 4, n, sweeps, starts, nstarts, u, v);
    case 8: return descent_tile(tile, 8, n, sweeps, starts, nstarts, u, v);
    case 16: return descent_tile(tile, 16, n, sweeps, starts, nstarts, u, v);
    case 32: return descent_tile(tile, 32, n, sweeps, starts, nstarts, u, v);
    default: return descent_tile(tile, m, n, sweeps, starts, nstarts, u, v);
    }
}

typedef struct {
    const double *tiles;
    int m, n, sweeps, nstarts;
    const double *starts;
    double *u, *v;
    int err;
} descent_ctx;

NM_SIMD_CLONES static void descent_task(void *vctx, int64_t lo, int64_t hi)
{
    descent_ctx *c = (descent_ctx *)vctx;
    const int m = c->m;
    for (int64_t k = lo; k < hi; k++)
        if (nm_descent_tile(c->tiles + k * m * m, m, c->n, c->sweeps, c->starts, c->nstarts,
                            c->u + k * m, c->v + k * m) != NM_OK) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            return;
        }
}

int nm_descent_args_ok(int sweeps, const double *starts, int nstarts)
{
    if (sweeps < 1 || nstarts < 1 || nstarts > 64 || !starts)
        return 0;
    for (int b = 0; b < nstarts; b++)
        if (!isfinite(starts[b]))
            return 0;
    return 1;
}

int nm_descent_prices(const double *tiles, int64_t t, int m, int n, int sweeps,
                      const double *starts, int nstarts, double *u, double *v, int nthreads)
{
    if (t < 0 || m < 1 || m > NM_MAX_M || n < 1 || n > m || nthreads < 1 ||
        !nm_descent_args_ok(sweeps, starts, nstarts))
        return NM_ERR_ARG;
    if (t == 0)
        return NM_OK;
    if (!tiles || !u || !v)
        return NM_ERR_ARG;
    descent_ctx c = {tiles, m, n, sweeps, nstarts, starts, u, v, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 8, 1), descent_task, &c);
    return c.err;
}
