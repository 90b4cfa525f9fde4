/* Mask application, the compressed N:M format and the sparse matmul that reads it.
 *
 * Packed layout (row-major): for row r and group g (columns g*m .. g*m+m-1), slots
 * k = g*n .. g*n+n-1 of values[r] / indices[r] hold the kept entries in ascending position,
 * then the lowest unused positions with value 0. The matmul clamps any index >= m to 0, so a
 * corrupted index array can give a wrong product but never an out-of-bounds read.
 */
#include <stdlib.h>
#include <string.h>

#include "nm_internal.h"

/* ---- apply mask ------------------------------------------------------------------------ */

typedef struct {
    const void *w;
    const uint8_t *mask;
    void *out;
    int dbl;
} apply_ctx;

NM_SIMD_CLONES static void apply_task(void *vctx, int64_t lo, int64_t hi)
{
    apply_ctx *c = (apply_ctx *)vctx;
    const uint8_t *mk = c->mask;
    if (c->dbl) {
        const double *w = (const double *)c->w;
        double *o = (double *)c->out;
        for (int64_t i = lo; i < hi; i++)
            o[i] = w[i] * (double)mk[i];
    } else {
        const float *w = (const float *)c->w;
        float *o = (float *)c->out;
        for (int64_t i = lo; i < hi; i++)
            o[i] = w[i] * (float)mk[i];
    }
}

static int apply_mask(const void *w, const uint8_t *mask, int64_t size, void *out, int nthreads,
                      int dbl)
{
    if (size < 0 || nthreads < 1)
        return NM_ERR_ARG;
    if (size == 0)
        return NM_OK;
    if (!w || !mask || !out)
        return NM_ERR_ARG;
    apply_ctx c = {w, mask, out, dbl};
    nm_parallel_for(nthreads, size, nm_grain(size, nthreads, 4, 1 << 16), apply_task, &c);
    return NM_OK;
}

int nm_apply_mask_f32(const float *w, const uint8_t *mask, int64_t size, float *out,
                      int nthreads)
{
    return apply_mask(w, mask, size, out, nthreads, 0);
}

int nm_apply_mask_f64(const double *w, const uint8_t *mask, int64_t size, double *out,
                      int nthreads)
{
    return apply_mask(w, mask, size, out, nthreads, 1);
}

/* ---- pack / unpack --------------------------------------------------------------------- */

typedef struct {
    const uint8_t *w; /* bytes */
    const uint8_t *mask;
    int64_t cols, groups;
    int elsize, n, m;
    uint8_t *values; /* bytes */
    uint8_t *indices;
    int err;
} pack_ctx;

static int packed_args(int64_t rows, int64_t cols, int elsize, int n, int m, int nthreads)
{
    if (rows < 0 || cols < 0 || m < 1 || m > 255 || n < 1 || n > m || nthreads < 1)
        return NM_ERR_ARG;
    if (elsize != 2 && elsize != 4 && elsize != 8)
        return NM_ERR_ARG;
    if (cols % m != 0)
        return NM_ERR_ARG;
    return NM_OK;
}

static void pack_task(void *vctx, int64_t lo, int64_t hi)
{
    pack_ctx *c = (pack_ctx *)vctx;
    const int n = c->n, m = c->m, es = c->elsize;
    const int64_t kr = c->groups * n; /* packed slots per row */
    for (int64_t r = lo; r < hi; r++) {
        for (int64_t g = 0; g < c->groups; g++) {
            const int64_t base = r * c->cols + g * m;
            const uint8_t *mk = c->mask + base;
            uint8_t *val = c->values + (r * kr + g * n) * es;
            uint8_t *idx = c->indices + r * kr + g * n;
            int k = 0;
            for (int j = 0; j < m; j++) {
                if (!mk[j])
                    continue;
                if (k == n) {
                    nm_set_error(&c->err, NM_ERR_GROUP);
                    return;
                }
                memcpy(val + (size_t)k * es, c->w + (base + j) * es, (size_t)es);
                idx[k++] = (uint8_t)j;
            }
            for (int j = 0; k < n && j < m; j++) { /* pad with unused positions, value 0 */
                if (mk[j])
                    continue;
                memset(val + (size_t)k * es, 0, (size_t)es);
                idx[k++] = (uint8_t)j;
            }
        }
    }
}

int nm_pack(const void *w, const uint8_t *mask, int64_t rows, int64_t cols, int elsize, int n,
            int m, void *values, uint8_t *indices, int nthreads)
{
    int rc = packed_args(rows, cols, elsize, n, m, nthreads);
    if (rc != NM_OK || rows == 0 || cols == 0)
        return rc;
    if (!w || !mask || !values || !indices)
        return NM_ERR_ARG;
    pack_ctx c = {(const uint8_t *)w, mask, cols, cols / m, elsize, n, m,
                  (uint8_t *)values, indices, 0};
    nm_parallel_for(nthreads, rows, nm_grain(rows, nthreads, 4, 1), pack_task, &c);
    return c.err;
}

typedef struct {
    const uint8_t *values;
    const uint8_t *indices;
    int64_t cols, groups;
    int elsize, n, m;
    uint8_t *out;
    int err;
} unpack_ctx;

static void unpack_task(void *vctx, int64_t lo, int64_t hi)
{
    unpack_ctx *c = (unpack_ctx *)vctx;
    const int n = c->n, m = c->m, es = c->elsize;
    const int64_t kr = c->groups * n;
    memset(c->out + lo * c->cols * es, 0, (size_t)((hi - lo) * c->cols * es));
    for (int64_t r = lo; r < hi; r++) {
        for (int64_t k = 0; k < kr; k++) {
            int j = c->indices[r * kr + k];
            if (j >= m) {
                nm_set_error(&c->err, NM_ERR_INDEX);
                return;
            }
            int64_t col = (k / n) * m + j;
            memcpy(c->out + (r * c->cols + col) * es, c->values + (r * kr + k) * es, (size_t)es);
        }
    }
}

int nm_unpack(const void *values, const uint8_t *indices, int64_t rows, int64_t cols,
              int elsize, int n, int m, void *out, int nthreads)
{
    int rc = packed_args(rows, cols, elsize, n, m, nthreads);
    if (rc != NM_OK || rows == 0 || cols == 0)
        return rc;
    if (!values || !indices || !out)
        return NM_ERR_ARG;
    unpack_ctx c = {(const uint8_t *)values, indices, cols, cols / m, elsize, n, m,
                    (uint8_t *)out, 0};
    nm_parallel_for(nthreads, rows, nm_grain(rows, nthreads, 4, 1), unpack_task, &c);
    return c.err;
}

/* ---- sparse matmul --------------------------------------------------------------------- */

#define BB 16  /* batch columns per register block (transposed path) */
#define DIRECT_MAX_B 3 /* batch sizes up to this read x directly */

typedef struct {
    const float *x;
    int64_t b, cols, rows, groups;
    const float *values;
    const uint8_t *indices;
    int n, m;
    float *y;
    float *xt; /* transposed batch blocks (nbb, cols, BB) */
    int64_t nbb;
    int avx512; /* the CPU runs the AVX-512 batch-1 path */
} spmm_ctx;

/* Column of packed slot k: a running (group base, position in group) pair avoids a division. */
#define NEXT_COL(IDX, BASE, POS, N, M, OUT)                                                  \
    do {                                                                                      \
        unsigned j_ = (IDX);                                                                  \
        (OUT) = (BASE) + (j_ < (unsigned)(M) ? j_ : 0u);                                      \
        if (++(POS) == (N)) {                                                                 \
            (POS) = 0;                                                                        \
            (BASE) += (M);                                                                    \
        }                                                                                     \
    } while (0)

/* One packed row of W against one row of x, scalar: 4 accumulators, no division. */
static inline __attribute__((always_inline)) float dot_scalar(const float *x, const float *val,
                                                              const uint8_t *idx, int64_t kr,
                                                              int n, int m, int64_t k,
                                                              int64_t base)
{
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t c0, c1, c2, c3;
    int pos = 0; /* k starts on a group boundary */
    for (; k + 4 <= kr; k += 4) {
        NEXT_COL(idx[k], base, pos, n, m, c0);
        NEXT_COL(idx[k + 1], base, pos, n, m, c1);
        NEXT_COL(idx[k + 2], base, pos, n, m, c2);
        NEXT_COL(idx[k + 3], base, pos, n, m, c3);
        a0 += val[k] * x[c0];
        a1 += val[k + 1] * x[c1];
        a2 += val[k + 2] * x[c2];
        a3 += val[k + 3] * x[c3];
    }
    for (; k < kr; k++) {
        NEXT_COL(idx[k], base, pos, n, m, c0);
        a0 += val[k] * x[c0];
    }
    return (a0 + a1) + (a2 + a3);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(NMOPT_PORTABLE)
#define NM_HAVE_AVX512_PATH 1
#include <immintrin.h>

/* 16 packed slots at a time when 16 % n == 0 and they span at most 32 columns (m <= 2n,
 * e.g. 2:4, 4:8, 8:16, 16:32): the 32 floats of x they can touch are two registers and one
 * two-source permute (vpermt2ps) picks the 16 operands, instead of 16 scalar loads. */
__attribute__((target("avx512f"))) static float dot_avx512(const float *x, int64_t cols,
                                                          const float *val, const uint8_t *idx,
                                                          int64_t kr, int n, int m)
{
    const int span = 16 / n * m; /* columns covered by 16 slots */
    int32_t pat[16];
    for (int l = 0; l < 16; l++)
        pat[l] = l / n * m;
    const __m512i pattern = _mm512_loadu_si512((const void *)pat);
    const __m512i top = _mm512_set1_epi32(m - 1);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0, c0 = 0;
#define NM_CHUNK(K, C0, ACC)                                                                  \
    do {                                                                                      \
        const __m512i j_ = _mm512_min_epu32(                                                  \
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(idx + (K)))), top);        \
        const __m512 g_ = _mm512_permutex2var_ps(_mm512_loadu_ps(x + (C0)),                  \
                                                 _mm512_add_epi32(pattern, j_),               \
                                                 _mm512_loadu_ps(x + (C0) + 16));             \
        ACC = _mm512_fmadd_ps(_mm512_loadu_ps(val + (K)), g_, ACC);                           \
    } while (0)
    for (; k + 32 <= kr && c0 + span + 32 <= cols; k += 32, c0 += 2 * span) {
        _mm_prefetch((const char *)(val + k + 512), _MM_HINT_T0); /* 2 KiB ahead */
        _mm_prefetch((const char *)(val + k + 528), _MM_HINT_T0);
        _mm_prefetch((const char *)(idx + k + 1024), _MM_HINT_T0);
        NM_CHUNK(k, c0, acc0);
        NM_CHUNK(k + 16, c0 + span, acc1);
    }
    for (; k + 16 <= kr && c0 + 32 <= cols; k += 16, c0 += span)
        NM_CHUNK(k, c0, acc0);
#undef NM_CHUNK
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    return sum + dot_scalar(x, val, idx, kr, n, m, k, c0);
}
#endif

/* Batch-1 style dot products: each row of W against each of the b (<= 3) rows of x. */
NM_SIMD_CLONES static void spmm_direct_task(void *vctx, int64_t lo, int64_t hi)
{
    spmm_ctx *c = (spmm_ctx *)vctx;
    const int n = c->n, m = c->m;
    const int64_t kr = c->groups * n;
#ifdef NM_HAVE_AVX512_PATH
    const int wide = c->avx512 && 16 % n == 0 && 16 / n * m <= 32;
#endif
    for (int64_t r = lo; r < hi; r++) {
        const float *val = c->values + r * kr;
        const uint8_t *idx = c->indices + r * kr;
        for (int64_t q = 0; q < c->b; q++) {
            const float *x = c->x + q * c->cols;
#ifdef NM_HAVE_AVX512_PATH
            if (wide) {
                c->y[q * c->rows + r] = dot_avx512(x, c->cols, val, idx, kr, n, m);
                continue;
            }
#endif
            c->y[q * c->rows + r] = dot_scalar(x, val, idx, kr, n, m, 0, 0);
        }
    }
}

static void transpose_task(void *vctx, int64_t lo, int64_t hi)
{
    spmm_ctx *c = (spmm_ctx *)vctx;
    for (int64_t blk = lo; blk < hi; blk++) {
        float *xt = c->xt + blk * c->cols * BB;
        for (int q = 0; q < BB; q++) {
            int64_t bq = blk * BB + q;
            if (bq < c->b) {
                const float *x = c->x + bq * c->cols;
                for (int64_t col = 0; col < c->cols; col++)
                    xt[col * BB + q] = x[col];
            } else {
                for (int64_t col = 0; col < c->cols; col++)
                    xt[col * BB + q] = 0.f;
            }
        }
    }
}

#define ROW_BLOCK 64 /* rows of W per task: their packed data stays in L2 across batch blocks */

/* Each packed slot scales a BB-wide row of the transposed x block (an axpy into registers). */
NM_SIMD_CLONES static void spmm_blocked_task(void *vctx, int64_t lo, int64_t hi)
{
    spmm_ctx *c = (spmm_ctx *)vctx;
    const int n = c->n, m = c->m;
    const int64_t kr = c->groups * n;
    const int64_t r_lo = lo * ROW_BLOCK;
    const int64_t r_hi = hi * ROW_BLOCK < c->rows ? hi * ROW_BLOCK : c->rows;
    for (int64_t blk = 0; blk < c->nbb; blk++) {
        const float *xt = c->xt + blk * c->cols * BB;
        const int64_t b0 = blk * BB;
        const int bq = c->b - b0 < BB ? (int)(c->b - b0) : BB;
        for (int64_t r = r_lo; r < r_hi; r++) {
            const float *val = c->values + r * kr;
            const uint8_t *idx = c->indices + r * kr;
            float acc0[BB] = {0}, acc1[BB] = {0};
            int64_t base = 0, c0, c1, k = 0;
            int pos = 0;
            for (; k + 2 <= kr; k += 2) {
                NEXT_COL(idx[k], base, pos, n, m, c0);
                NEXT_COL(idx[k + 1], base, pos, n, m, c1);
                const float v0 = val[k], v1 = val[k + 1];
                const float *x0 = xt + c0 * BB, *x1 = xt + c1 * BB;
                for (int q = 0; q < BB; q++) {
                    acc0[q] += v0 * x0[q];
                    acc1[q] += v1 * x1[q];
                }
            }
            for (; k < kr; k++) {
                NEXT_COL(idx[k], base, pos, n, m, c0);
                const float v0 = val[k];
                const float *x0 = xt + c0 * BB;
                for (int q = 0; q < BB; q++)
                    acc0[q] += v0 * x0[q];
            }
            for (int q = 0; q < bq; q++)
                c->y[(b0 + q) * c->rows + r] = acc0[q] + acc1[q];
        }
    }
}

int nm_sparse_matmul_f32(const float *x, int64_t b, int64_t cols, const float *values,
                         const uint8_t *indices, int64_t rows, int n, int m, float *y,
                         int nthreads)
{
    int rc = packed_args(rows, cols, 4, n, m, nthreads);
    if (rc != NM_OK || b < 0)
        return rc != NM_OK ? rc : NM_ERR_ARG;
    if (b == 0 || rows == 0)
        return NM_OK;
    if (!x || !y || (cols > 0 && (!values || !indices)))
        return NM_ERR_ARG;
    spmm_ctx c = {x, b, cols, rows, cols / m, values, indices, n, m, y, NULL, 0, 0};
#ifdef NM_HAVE_AVX512_PATH
    c.avx512 = __builtin_cpu_supports("avx512f");
#endif
    if (b <= DIRECT_MAX_B || cols == 0) {
        /* one contiguous block of rows per thread: streaming W is the whole cost */
        nm_parallel_for(nthreads, rows, nm_grain(rows, nthreads, 1, 16), spmm_direct_task, &c);
        return NM_OK;
    }
    c.nbb = (b + BB - 1) / BB;
    if (c.nbb > (int64_t)(SIZE_MAX / sizeof(float) / BB) / cols)
        return NM_ERR_NOMEM;
    c.xt = (float *)malloc((size_t)(c.nbb * cols * BB) * sizeof(float));
    if (!c.xt)
        return NM_ERR_NOMEM;
    nm_parallel_for(nthreads, c.nbb, 1, transpose_task, &c);
    int64_t nblocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    nm_parallel_for(nthreads, nblocks, 1, spmm_blocked_task, &c);
    free(c.xt);
    return NM_OK;
}
