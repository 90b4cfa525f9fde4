/* nmopt C kernels: the declarations cffi compiles against (see build_kernels.py).
 *
 * Conventions shared by every function:
 *  - arrays are C-contiguous; sizes are element counts; tiles are (t, m, m) row-major;
 *  - 1 <= n <= m <= 64 for the tile kernels, 1 <= n <= m <= 255 for the packed format;
 *  - nthreads >= 1 (values above the work available are clamped);
 *  - the return value is NM_OK or a negative NM_ERR_* code and never aborts; on an error the
 *    outputs are unspecified (the Python wrapper raises and discards them).
 * The cffi cdef reads this file with the preprocessor lines stripped.
 */
#ifndef NMOPT_KERNELS_H
#define NMOPT_KERNELS_H

#include <stdint.h>

enum {
    NM_OK = 0,
    NM_ERR_ARG = -1,     /* bad size, n, m, elsize or thread count */
    NM_ERR_VALUE = -2,   /* a score is NaN, infinite or (exact) negative */
    NM_ERR_NOMEM = -3,   /* allocation failed */
    NM_ERR_GROUP = -4,   /* pack: a group keeps more than n */
    NM_ERR_INDEX = -5    /* unpack: an index >= m */
};

/* Per-tile status written by nm_exact. */
enum {
    NM_TILE_OK = 0,        /* shortest-path solve verified: bound == objective */
    NM_TILE_FALLBACK = 1,  /* needed a fallback, then verified: cycle cancelling, or for
                            * M = 4 the general path when the register path fails */
    NM_TILE_UNVERIFIED = 2 /* fallback could not close the gap to NM_FALLBACK_TOL */
};

/* nm_exact flags (testing hooks). */
enum {
    NM_FLAG_FORCE_FALLBACK = 1, /* run the fallback on every tile, from the solved mask */
    NM_FLAG_COLD_FALLBACK = 2,  /* run the fallback on every tile, from a trivial mask */
    NM_FLAG_GENERAL_PATH = 4,   /* M = 4: skip the register path, solve as for any M */
    NM_FLAG_BREAK_MASK = 8,     /* nm_exact_matrix: keep all of row 0 of each block's first
                                 * tile, before the certificate (it must flag the tile) */
    NM_FLAG_ZERO_PRICES = 16,   /* nm_exact_matrix: prices 0 before the certificate (a valid
                                 * but loose bound) */
    NM_FLAG_ROWWISE = 32,       /* nm_exact_matrix and nm_certify: row-wise N:M (the top n of
                                 * every row of every tile, prices u = the (n+1)-th largest,
                                 * v = 0; columns unconstrained) instead of transposable */
    NM_FLAG_CERT_GROUPS = 64,   /* nm_exact_matrix: the certificate per group of tiles (see
                                 * nm_cert_group) instead of per tile */
    NM_FLAG_INF_PRICES = 128    /* nm_exact_matrix: the first price of each block's first tile
                                 * +inf, before the certificate (it must flag the group) */
};

/* Relative tolerances of the exact kernel's self-check (see nm_exact.c). */
double nm_gap_tol(void);
double nm_fallback_tol(void);

/* Transposable greedy; mask (t, m, m) uint8. Any finite scores (NM_ERR_VALUE otherwise). */
int nm_greedy(const double *tiles, int64_t t, int m, int n, uint8_t *mask, int nthreads);

/* Row-wise top n per tile row (ties: lower index first). Any finite scores. */
int nm_rowwise(const double *tiles, int64_t t, int m, int n, uint8_t *mask, int nthreads);

/* Descent prices (nmopt.certificates.descent_prices): per tile, from each of the nstarts start
 * factors (column prices starts[b] times the columns' (n+1)-th largest score), `sweeps` >= 1
 * rounds of block coordinate descent on the dual bound; u, v (t, m) the prices of the start
 * with the lowest bound, all 0 where n = m. Any finite scores (NM_ERR_VALUE otherwise). */
int nm_descent_prices(const double *tiles, int64_t t, int m, int n, int sweeps,
                      const double *starts, int nstarts, double *u, double *v, int nthreads);

/* The transposable greedy with its descent prices (nm_greedy, nm_descent_prices) on a matrix
 * read in place, as nm_exact_matrix reads it (scores |x| when absolute, else x, which must be
 * finite and >= 0: NM_ERR_VALUE otherwise): mask (rows, cols) with row stride mask_rs; u, v
 * (t, m) per tile in nm_exact's tile order. */
int nm_greedy_matrix(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
                     int64_t rs, int64_t cs, int m, int n, int sweeps, const double *starts,
                     int nstarts, uint8_t *mask, int64_t mask_rs, double *u, double *v,
                     int nthreads);

/* Exact transposable masks: at most n per tile row and column (saturate = 0) or exactly n
 * (saturate = 1), maximising the kept score. Scores must be finite and >= 0. Writes the mask,
 * dual prices u (t, m) and v (t, m) with bound(u, v) == kept score, and a per-tile status. */
int nm_exact(const double *tiles, int64_t t, int m, int n, int saturate, int flags,
             uint8_t *mask, double *u, double *v, int8_t *status, int nthreads);

/* Element types of a matrix read in place (nm_exact_matrix, nm_certify). */
enum { NM_F64 = 0, NM_F32 = 1, NM_F16 = 2, NM_BF16 = 3 };

/* nm_exact on a (rows, cols) matrix read where it lies: element (i, j) at data + i * rs +
 * j * cs elements of type dtype; the score is |x| when absolute, else x (must be >= 0).
 * rows and cols are multiples of m; tile k = (k / (cols/m), k % (cols/m)) as in nm_exact's
 * tile order. mask (rows, cols) uint8 with row stride mask_rs; u, v (t, m) and status (t)
 * as nm_exact. warm_v (t, m) or NULL: the column prices of a previous solve to start from
 * (saturate = 0 only): each tile starts from them instead of its own estimate and is solved
 * to the same certified optimum (M = 4 uses them only with warm_x). warm_x (rows, cols)
 * uint8, row stride warm_x_rs, or NULL: that solve's mask; with it, a tile whose previous mask
 * is still optimal keeps it, proven by prices fitted to the new scores (used when at least
 * half of a sample of tiles keep theirs, 85% at M = 4; else the prices alone, or cold).
 * u_rows (rows, cols/m), or NULL: u again, laid out by matrix row (row r of tile column q
 * at r * (cols/m) + q), written block by block while in cache; with it u may be NULL (each
 * thread then keeps a block's u in a buffer of its own).
 * kept, bound, nshort, bad (t), or all NULL: nm_certify's outputs, computed by its routine on
 * each block of tiles as soon as it is solved (while in cache). With NM_FLAG_CERT_GROUPS they
 * hold one entry per group g of nm_cert_group(m) tiles (the last one may be shorter): the
 * sums of the group's kept scores, bounds and short rows and columns (in tile order, so the
 * same whatever the threads), and bad = 1 where a tile breaks the pattern, | 2 where a
 * tile's bound is not finite while its kept score is (an infinite or NaN price). */
int nm_exact_matrix(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
                    int64_t rs, int64_t cs, int m, int n, int saturate, int flags,
                    const double *warm_v, const uint8_t *warm_x, int64_t warm_x_rs,
                    uint8_t *mask, int64_t mask_rs, double *u, double *v, double *u_rows,
                    int8_t *status,
                    double *kept, double *bound, int32_t *nshort, int8_t *bad, int nthreads);

/* Tiles per group of nm_exact_matrix's certificate with NM_FLAG_CERT_GROUPS. */
int64_t nm_cert_group(int m);

/* The certificate of a mask and prices on the same matrix, computed independently of the
 * solver: per tile the kept score, the dual bound n*sum(u) + n*sum(v) + sum(max(0, s-u-v)),
 * the rows plus columns keeping fewer than n (short), and bad = 1 where a row or column
 * keeps more than n (or, with saturate, not exactly n) or, at most n, a price is negative.
 * flags: NM_FLAG_ROWWISE checks rows only. NM_ERR_VALUE on a bad score. */
int nm_certify(const void *data, int dtype, int absolute, int64_t rows, int64_t cols,
               int64_t rs, int64_t cs, int m, int n, int saturate, int flags, const uint8_t *mask,
               int64_t mask_rs, const double *u, const double *v, double *kept, double *bound,
               int32_t *nshort, int8_t *bad, int nthreads);

/* out = w * mask (float multiply, as numpy does). */
int nm_apply_mask_f32(const float *w, const uint8_t *mask, int64_t size, float *out,
                      int nthreads);
int nm_apply_mask_f64(const double *w, const uint8_t *mask, int64_t size, double *out,
                      int nthreads);

/* Compressed N:M: w (rows, cols) with cols % m == 0, elements of elsize bytes (2, 4 or 8).
 * values (rows, cols/m*n) and indices (rows, cols/m*n): per group the kept positions in
 * ascending order, then the lowest unused positions with value 0 as padding. */
int nm_pack(const void *w, const uint8_t *mask, int64_t rows, int64_t cols, int elsize, int n,
            int m, void *values, uint8_t *indices, int nthreads);
int nm_unpack(const void *values, const uint8_t *indices, int64_t rows, int64_t cols,
              int elsize, int n, int m, void *out, int nthreads);

/* y (b, rows) = x (b, cols) @ W^T from W packed as above (float32). */
int nm_sparse_matmul_f32(const float *x, int64_t b, int64_t cols, const float *values,
                         const uint8_t *indices, int64_t rows, int n, int m, float *y,
                         int nthreads);

#endif
