/* The certificate of a mask and prices, checked independently of the solver that produced
 * them: it shares only the matrix reader (nm_read_tile) with nm_exact_matrix. Per tile:
 *
 *   kept  = sum of the kept scores,
 *   bound = n * sum(u) + n * sum(v) + sum over all entries of max(0, s_ij - u_i - v_j),
 *
 * the LP dual bound, valid for any prices (>= 0 for at most n; any sign for exactly n), and
 * the rows and columns that keep more than n (bad), or with saturate not exactly n, or fewer
 * than n (short, the deficit). Scores are checked here again (NM_ERR_VALUE). */
#include "nm_internal.h"

typedef struct {
    nm_src src;
    int m, n, sat;
    const uint8_t *mask;
    int64_t mask_rs;
    const double *u, *v;
    double *kept, *bound;
    int32_t *nshort;
    int8_t *bad;
    int err;
} certify_ctx;

NM_SIMD_CLONES static void certify_task(void *vctx, int64_t lo, int64_t hi)
{
    certify_ctx *c = (certify_ctx *)vctx;
    const int m = c->m, n = c->n;
    double s[NM_MAX_M * NM_MAX_M];
    for (int64_t k = lo; k < hi; k++) {
        nm_read_tile(&c->src, m, k, s);
        double mx;
        if (nm_scan_scores(s, m * m, &mx)) {
            nm_set_error(&c->err, NM_ERR_VALUE);
            return;
        }
        const uint8_t *x = c->mask + (k / c->src.tcols) * m * c->mask_rs +
                           (k % c->src.tcols) * m;
        const double *u = c->u + k * m, *v = c->v + k * m;
        double kept = 0.0, slack = 0.0, prices = 0.0;
        int cdeg[NM_MAX_M] = {0};
        int bad = 0, nshort = 0;
        for (int i = 0; i < m; i++) {
            const uint8_t *xi = x + i * c->mask_rs;
            const double *si = s + i * m;
            int rdeg = 0;
            for (int j = 0; j < m; j++) {
                const int keep = xi[j] != 0;
                const double r = si[j] - u[i] - v[j];
                kept += keep ? si[j] : 0.0;
                slack += r > 0.0 ? r : 0.0;
                rdeg += keep;
                cdeg[j] += keep;
            }
            prices += u[i] + v[i];
            bad |= rdeg > n || (c->sat && rdeg != n);
            nshort += rdeg < n;
        }
        for (int j = 0; j < m; j++) {
            bad |= cdeg[j] > n || (c->sat && cdeg[j] != n);
            nshort += cdeg[j] < n;
        }
        c->kept[k] = kept;
        c->bound[k] = n * prices + slack;
        c->nshort[k] = nshort;
        c->bad[k] = (int8_t)bad;
    }
}

int nm_certify(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
               int64_t rs, int64_t cs, int m, int n, int saturate, const uint8_t *mask,
               int64_t mask_rs, const double *u, const double *v, double *kept, double *bound,
               int32_t *nshort, int8_t *bad, int nthreads)
{
    if (!nm_matrix_args_ok(dtype, rows, cols, m, n, mask_rs, nthreads))
        return NM_ERR_ARG;
    const int64_t t = (rows / m) * (cols / m);
    if (t == 0)
        return NM_OK;
    if (!data || !mask || !u || !v || !kept || !bound || !nshort || !bad)
        return NM_ERR_ARG;
    certify_ctx c = {{data, dtype, absolute != 0, rs, cs, cols / m}, m, n, saturate != 0,
                     mask, mask_rs, u, v, kept, bound, nshort, bad, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 16, 64), certify_task, &c);
    return c.err;
}
