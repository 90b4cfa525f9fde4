/* The certificate of a mask and prices, checked independently of the solver that produced
 * them: it shares only the matrix reader (nm_read_tile) with nm_exact_matrix. Per tile:
 *
 *   kept  = sum of the kept scores,
 *   bound = n * sum(u) + n * sum(v) + sum over all entries of max(0, s_ij - u_i - v_j),
 *
 * the LP dual bound, valid for any prices (>= 0 for at most n; any sign for exactly n), and
 * the rows and columns that keep more than n (bad), or with saturate not exactly n, or fewer
 * than n (short, the deficit); at most n also needs prices >= 0. Scores are checked here again
 * (NM_ERR_VALUE). nm_exact_matrix runs nm_certify_range on each block of tiles it has just
 * solved, while they are in cache; nm_certify runs it on a whole matrix. */
#include "nm_internal.h"

/* Lane l: the sum of the lanes of g[l] (four horizontal sums in six shuffles). */
static inline __attribute__((always_inline)) nm_vi lane_sums4(const nm_vi *g)
{
    _Static_assert(NM_W == 4, "four vectors of four lanes");
    const nm_vi t0 = __builtin_shuffle(g[0], g[1], (nm_vi){0, 4, 2, 6}) +
                     __builtin_shuffle(g[0], g[1], (nm_vi){1, 5, 3, 7});
    const nm_vi t1 = __builtin_shuffle(g[2], g[3], (nm_vi){0, 4, 2, 6}) +
                     __builtin_shuffle(g[2], g[3], (nm_vi){1, 5, 3, 7});
    return __builtin_shuffle(t0, t1, (nm_vi){0, 1, 4, 5}) +
           __builtin_shuffle(t0, t1, (nm_vi){2, 3, 6, 7});
}

/* Counts d of rows or columns against n: bad lanes (above n, or with sat not n) into *bad,
 * lanes below n counted (as -1 each) into *under. */
static inline __attribute__((always_inline)) void check_counts(nm_vi d, nm_vi n, int sat,
                                                               nm_vi *bad, nm_vi *under)
{
    *bad |= (d > n) | (sat ? d != n : (nm_vi){0});
    *under += d < n;
}

static inline __attribute__((always_inline)) int certify_range(
    const nm_src *src, const nm_cert *out, const int m, int n, int sat, int rowwise,
    const uint8_t *mask, int64_t mask_rs, const double *u, const double *v, int64_t lo,
    int64_t hi)
{
    double s[NM_MAX_M * NM_MAX_M] NM_A64;
    for (int64_t k = lo; k < hi; k++) {
        nm_read_tile(src, m, k, s);
        double mx;
        if (nm_scan_scores(s, m * m, &mx))
            return NM_ERR_VALUE;
        int64_t tr, tq; /* the tile's row and column in the grid */
        nm_tile_place(src, k, &tr, &tq);
        const uint8_t *x = mask + tr * m * mask_rs + tq * m;
        const double *uk = u + (k - lo) * m, *vk = v + (k - lo) * m;
        double kept = 0.0, slack = 0.0, prices = 0.0;
        int bad = 0, nshort = 0;
        for (int j = 0; j < m; j++) {
            prices += uk[j] + vk[j];
            bad |= !sat && (uk[j] < 0.0 || vk[j] < 0.0); /* at most n: prices are >= 0 */
        }
        if (m % NM_W == 0) { /* NM_W columns at a time; the mask holds 0 and 1 only */
            const nm_vd zero = {0};
            const nm_vi nv = (nm_vi){0} + n;
            nm_vd vkept = zero, vslack = zero;
            nm_vi vc[NM_MAX_M / NM_W], group[NM_W], vbad = {0}, under = {0};
            for (int q = 0; q < m / NM_W; q++)
                vc[q] = (nm_vi){0};
            for (int i = 0; i < m; i++) {
                const uint8_t *xi = x + i * mask_rs;
                const nm_vd ui = zero + uk[i];
                nm_vi rows = {0};
                for (int j0 = 0; j0 < m; j0 += NM_W) {
                    nm_vb b;
                    memcpy(&b, xi + j0, sizeof b);
                    const nm_vi keep = __builtin_convertvector(b != 0, nm_vi); /* 0 or -1 */
                    const nm_vd sv = nm_vload_d(s + i * m + j0);
                    const nm_vd r = sv - ui - nm_vload_d(vk + j0);
                    vkept += (nm_vd)((nm_vi)sv & keep);
                    vslack += (nm_vd)((nm_vi)r & (r > zero));
                    rows -= keep;
                    vc[j0 / NM_W] -= keep;
                }
                group[i % NM_W] = rows; /* rows i - 3 .. i, counted four at a time */
                if (i % NM_W == NM_W - 1)
                    check_counts(lane_sums4(group), nv, sat, &vbad, &under);
            }
            for (int q = 0; q < m / NM_W && !rowwise; q++)
                check_counts(vc[q], nv, sat, &vbad, &under);
            kept = nm_hsum(vkept);
            slack = nm_hsum(vslack);
            bad |= nm_any(vbad);
            nshort = -(int)nm_hsum_i(under);
        } else {
            int cdeg[NM_MAX_M] = {0};
            for (int i = 0; i < m; i++) {
                const uint8_t *xi = x + i * mask_rs;
                const double *si = s + i * m;
                int rdeg = 0;
                for (int j = 0; j < m; j++) {
                    const int keep = xi[j] != 0;
                    const double r = si[j] - uk[i] - vk[j];
                    kept += keep ? si[j] : 0.0;
                    slack += r > 0.0 ? r : 0.0;
                    rdeg += keep;
                    cdeg[j] += keep;
                }
                bad |= rdeg > n || (sat && rdeg != n);
                nshort += rdeg < n;
            }
            for (int j = 0; j < m && !rowwise; j++) {
                bad |= cdeg[j] > n || (sat && cdeg[j] != n);
                nshort += cdeg[j] < n;
            }
        }
        out->kept[k - lo] = kept;
        out->bound[k - lo] = n * prices + slack;
        out->nshort[k - lo] = nshort;
        out->bad[k - lo] = (int8_t)bad;
    }
    return NM_OK;
}

/* certify_range with m a constant at the common sizes (its loops unroll). */
NM_SIMD_CLONES int nm_certify_range(const nm_src *src, const nm_cert *out, int m, int n, int sat,
                                    int rowwise, const uint8_t *mask, int64_t mask_rs,
                                    const double *u, const double *v, int64_t lo, int64_t hi)
{
#define NM_CERTIFY(M) certify_range(src, out, M, n, sat, rowwise, mask, mask_rs, u, v, lo, hi)
    switch (m) {
    case 4: return NM_CERTIFY(4);
    case 8: return NM_CERTIFY(8);
    case 16: return NM_CERTIFY(16);
    case 32: return NM_CERTIFY(32);
    default: return NM_CERTIFY(m);
    }
#undef NM_CERTIFY
}

typedef struct {
    nm_src src;
    nm_cert out;
    int m, n, sat, rowwise;
    const uint8_t *mask;
    int64_t mask_rs;
    const double *u, *v;
    int err;
} certify_ctx;

NM_SIMD_CLONES static void certify_task(void *vctx, int64_t lo, int64_t hi)
{
    certify_ctx *c = (certify_ctx *)vctx;
    const nm_cert out = {c->out.kept + lo, c->out.bound + lo, c->out.nshort + lo,
                         c->out.bad + lo};
    const int rc = nm_certify_range(&c->src, &out, c->m, c->n, c->sat, c->rowwise, c->mask,
                                    c->mask_rs, c->u + lo * c->m, c->v + lo * c->m, lo, hi);
    if (rc != NM_OK)
        nm_set_error(&c->err, rc);
}

int nm_certify(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
               int64_t rs, int64_t cs, int m, int n, int saturate, int flags, const uint8_t *mask,
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
    certify_ctx c = {{data, dtype, absolute != 0, rs, cs, cols / m, nm_src_tdiv(cols / m, t)},
                     {kept, bound, nshort, bad},
                     m, n, saturate != 0, (flags & NM_FLAG_ROWWISE) != 0, mask, mask_rs, u, v, 0};
    nm_parallel_for(nthreads, t, nm_grain(t, nthreads, 16, 64), certify_task, &c);
    return c.err;
}
