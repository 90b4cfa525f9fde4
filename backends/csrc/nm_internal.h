/* Helpers shared by the kernel sources; not part of the cffi interface. */
#ifndef NM_INTERNAL_H
#define NM_INTERNAL_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "nmopt_kernels.h"

#define NM_MAX_M 64
#define NM_MAX_THREADS 256

/* A task processes items [lo, hi) of a parallel loop. */
typedef void (*nm_task_fn)(void *ctx, int64_t lo, int64_t hi);

/* Run fn over [0, ntasks) in chunks of `grain` items, handed out dynamically to up to
 * `nthreads` threads (the caller is one of them). Falls back to fewer threads, down to the
 * caller alone, when threads cannot be started. */
void nm_parallel_for(int nthreads, int64_t ntasks, int64_t grain, nm_task_fn fn, void *ctx);

/* Record the first error code of a parallel loop (thread-safe). */
static inline void nm_set_error(int *slot, int code)
{
    int expected = 0;
    __atomic_compare_exchange_n(slot, &expected, code, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static inline int nm_get_error(int *slot) { return __atomic_load_n(slot, __ATOMIC_RELAXED); }

/* Set keep[0..m) to 1 for the n largest of s[0..m), ties to the lower index (numpy's stable
 * argsort of -s), 0 elsewhere. Returns the (n+1)-th largest value (-HUGE_VAL if n >= m).
 * Rank counting: O(m^2) but branch-free and vectorised, faster than a selection for m <= 64. */
static inline __attribute__((always_inline)) double nm_row_topn(const double *s, int m, int n,
                                                                uint8_t *keep)
{
    double next = -HUGE_VAL;
    for (int j = 0; j < m; j++) {
        const double sj = s[j];
        int rank = 0;
        for (int k = 0; k < m; k++)
            rank += (s[k] > sj) | ((s[k] == sj) & (k < j));
        keep[j] = (uint8_t)(rank < n);
        next = rank == n ? sj : next;
    }
    return next;
}

/* Grain (items per chunk) that gives each of nthreads about `per_thread` chunks. */
static inline int64_t nm_grain(int64_t ntasks, int nthreads, int per_thread, int64_t min_grain)
{
    int64_t g = ntasks / ((int64_t)(nthreads < 1 ? 1 : nthreads) * per_thread);
    return g < min_grain ? min_grain : g;
}

/* GCC vector types of NM_W = 4 lanes of 64 bits (256 bits): native registers in the AVX2
 * and AVX-512 clones, pairs of SSE registers otherwise. (512-bit generic vectors compile to
 * slow code without AVX-512, and gain little on CPUs that execute them as two halves.) */
#define NM_W 4
typedef double nm_vd __attribute__((vector_size(8 * NM_W)));
typedef int64_t nm_vi __attribute__((vector_size(8 * NM_W)));
#define NM_LANE ((nm_vi){0, 1, 2, 3})

/* SIMD clones (baseline, AVX2, AVX-512) picked at load time by the CPU's features; off with
 * -DNMOPT_PORTABLE, or where the toolchain lacks ifunc support. The baseline x86-64 clone is
 * correct but several times slower: GCC lowers the 256-bit vector code poorly to SSE2. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(NMOPT_PORTABLE)
#define NM_SIMD_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define NM_SIMD_CLONES
#endif

/* ---- The exact solver ----------------------------------------------------------------------
 * nm_exact.c          the entry point and the per-thread driver (and the algorithm's notes);
 * nm_exact_general.c  the general path (any M): shortest paths, self-check, and
 *                     the SLOTS tiles a thread interleaves;
 * nm_exact_start.c    its dual start: the column prices and the rows' top n;
 * nm_exact_warm.c     its warm start from a previous mask and prices, and the sample that
 *                     decides how a call uses them;
 * nm_exact_q4.c       the M = 4 path, with the tile in vector registers;
 * nm_exact_fallback.c cycle cancelling, for the tiles the shortest paths do not certify.
 * Functions that hold hot code called from another file carry NM_SIMD_CLONES themselves. */

/* Relative tolerances of the self-check (nm_gap_tol, nm_fallback_tol), and the least gain of
 * a cycle the fallback cancels. */
#define NM_GAP_TOL 1e-12
#define NM_FALLBACK_TOL 1e-10
#define NM_BF_EPS 1e-14 /* in units of the tile's largest score */

#define NM_A64 __attribute__((aligned(64)))

typedef uint8_t nm_vb __attribute__((vector_size(NM_W)));

static inline __attribute__((always_inline)) nm_vi nm_vload_i(const int64_t *p)
{
    nm_vi v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) nm_vd nm_vload_d(const double *p)
{
    nm_vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) nm_vi nm_vload_mask(const uint8_t *p)
{
    _Static_assert(NM_W == 4, "one 32-bit word per vector of lanes");
    uint32_t w; /* NM_W = 4 bytes, 0/1 each -> lanes 0/-1 (a shift per lane, no byte inserts) */
    memcpy(&w, p, sizeof w);
    return -((((nm_vi){0} + (int64_t)w) >> (nm_vi){0, 8, 16, 24}) & 1);
}

static inline __attribute__((always_inline)) nm_vd nm_vblend_d(nm_vi mask, nm_vd a, nm_vd b)
{
    return (nm_vd)((mask & (nm_vi)a) | (~mask & (nm_vi)b));
}

static inline __attribute__((always_inline)) nm_vi nm_vblend_i(nm_vi mask, nm_vi a, nm_vi b)
{
    return (mask & a) | (~mask & b);
}

static inline __attribute__((always_inline)) double nm_hsum(nm_vd v)
{
    double s = 0.0;
    for (int q = 0; q < NM_W; q++)
        s += v[q];
    return s;
}

/* Whether any lane is nonzero (two shuffles, no lane extracts). */
static inline __attribute__((always_inline)) int nm_any(nm_vi v)
{
    v |= __builtin_shuffle(v, (nm_vi){2, 3, 0, 1});
    v |= __builtin_shuffle(v, (nm_vi){1, 0, 3, 2});
    return v[0] != 0;
}

static inline __attribute__((always_inline)) int64_t nm_hsum_i(nm_vi v)
{
    int64_t s = 0;
    for (int q = 0; q < NM_W; q++)
        s += v[q];
    return s;
}

/* Node layout, in two segments of NM_SEG(m) nodes (a multiple of NM_W):
 *   A = [0, SEG):      T = 0, rows 1..m, inert padding;
 *   B = [SEG, 2 SEG):  columns SEG..SEG+m-1, S = SEG+m, inert padding.
 * Rows only reach columns and S (segment B); columns and S only reach T and rows (segment A).
 * A Dijkstra step relaxes one segment and re-scans the other for its minimum: two
 * fixed-length vector passes. Padding nodes have infinite costs and distances. */
#define NM_ROUNDW(x) (((x) + NM_W - 1) & ~(NM_W - 1))
#define NM_SEG(m) NM_ROUNDW((m) + 1)
#define NM_NODES (2 * NM_SEG(NM_MAX_M))
#define NM_NODE_T 0
#define NM_NODE_ROW(i) (1 + (i))
#define NM_NODE_COL(m, j) (NM_SEG(m) + (j))
#define NM_NODE_S(m) (NM_SEG(m) + (m))
#define NM_IS_ROW(m, a) ((a) >= 1 && (a) <= (m))
#define NM_IS_COL(m, a) ((a) >= NM_SEG(m) && (a) < NM_SEG(m) + (m))
#define NM_COL_OF(m, a) ((a) - NM_SEG(m))

/* A tile of the general path: its scores, mask, degrees and residual network. */
typedef struct {
    int m, n, sat, mp, seg, stride; /* mp = NM_ROUNDW(m); stride = 2 * seg */
    int rdeg[NM_MAX_M], cdeg[NM_MAX_M];
    int cflow[NM_MAX_M]; /* flow on col -> T; cdeg - cflow is the column's excess */
    int nkept;           /* sum of rdeg; the bypass S -> T carries n*m - nkept */
    /* Scaled scores, row-major and transposed, and the mask; row stride mp, zero padded.
     * The warm start's fit (nm_exact_warm.c) runs before sT is written and after `in` is read:
     * its scores split by the previous mask share their memory. */
    double s[NM_MAX_M * NM_MAX_M] NM_A64;
    union {
        double sT[NM_MAX_M * NM_MAX_M] NM_A64;
        double keptR[NM_MAX_M * NM_MAX_M] NM_A64;
    };
    uint8_t x[NM_MAX_M * NM_MAX_M] NM_A64;
    uint8_t xT[NM_MAX_M * NM_MAX_M] NM_A64; /* the start's mask, transposed (nm_dual_start) */
    union {
        double in[NM_MAX_M * NM_MAX_M] NM_A64; /* a tile read from a matrix (nm_tile_scores) */
        double freeR[NM_MAX_M * NM_MAX_M] NM_A64;
    };
    double pot[NM_NODES] NM_A64;
    double dist[NM_NODES] NM_A64;
    int64_t done[NM_NODES] NM_A64; /* 0, or -1 (all bits) once settled */
    int64_t prev[NM_NODES] NM_A64;
    /* cost[a*stride + b]: cost of the residual arc a -> b, +inf when absent. Only the arcs of
     * the network are ever written; every other entry stays +inf from tile_alloc. */
    double cost[] NM_A64;
} nm_tile;

/* Column j's arcs to T (open below n) and back from T (open above 0), by its flow cflow. */
static inline void nm_set_col_arcs(nm_tile *t, int j)
{
    const int col = NM_NODE_COL(t->m, j), st = t->stride;
    t->cost[col * st + NM_NODE_T] = t->cflow[j] < t->n ? 0.0 : HUGE_VAL;
    t->cost[NM_NODE_T * st + col] = t->cflow[j] > 0 ? 0.0 : HUGE_VAL;
}

/* The bypass's residual arc back T -> S: open while it carries flow (at most n only). */
static inline void nm_set_bypass(nm_tile *t)
{
    t->cost[NM_NODE_T * t->stride + NM_NODE_S(t->m)] =
        !t->sat && t->nkept < t->n * t->m ? 0.0 : HUGE_VAL;
}

/* T's excess, sum(cflow) - nkept: the flow into T beyond its demand n*m, which is minus the
 * columns' total excess (every other node is balanced). */
static inline int nm_t_excess(const nm_tile *t)
{
    int e = -t->nkept;
    for (int j = 0; j < t->m; j++)
        e += t->cflow[j];
    return e;
}

/* The dual start (nm_exact_start.c): column prices from rounds of dual coordinate descent
 * (n < m), the start from column prices v (rows keep their top n of s - v), and the residual
 * network of the start, built once a unit has to move. */
void nm_price_rounds(const nm_tile *t, int rounds, double *v);
void nm_dual_start(nm_tile *t, const double *v);
void nm_build_network(nm_tile *t);

/* The warm start with the previous mask (nm_exact_warm.c): 1 when it is proven optimal for
 * tile k (loaded into t->s), with its prices: v fitted from the previous ones, and u; else 0.
 * nm_warm_probe: how a call should use the previous result, from a sample of its tiles. */
typedef struct nm_exact_ctx nm_exact_ctx;
typedef struct nm_slot nm_slot;
int nm_warm_tile(nm_tile *t, const nm_exact_ctx *c, int64_t k, double *v, double *u);
double nm_warm_probe(nm_slot *slots, const nm_exact_ctx *c, int64_t tiles, double *units);

/* The transposable greedy on one tile (nm_select.c): finite scores s (m*m) -> keep (m*m, 0 or
 * 1), with a workspace for m from nm_greedy_ws_alloc (NULL: out of memory). */
typedef struct nm_greedy_ws nm_greedy_ws;
nm_greedy_ws *nm_greedy_ws_alloc(int m);
void nm_greedy_ws_free(nm_greedy_ws *ws);
void nm_greedy_tile(nm_greedy_ws *ws, const double *s, int n, uint8_t *keep);

/* Descent prices of one tile (nm_descent.c, see nm_descent_prices): u, v (m each); NM_OK, or
 * NM_ERR_VALUE on a score that is not finite. nm_descent_args_ok: sweeps and starts valid. */
int nm_descent_tile(const double *tile, int m, int n, int sweeps, const double *starts,
                    int nstarts, double *u, double *v);
int nm_descent_args_ok(int sweeps, const double *starts, int nstarts);

/* A matrix read in place (nm_exact_matrix, nm_certify): see nmopt_kernels.h. */
typedef struct {
    const void *data;
    int dtype, absolute;
    int64_t rs, cs, tcols; /* strides in elements; tiles per row of tiles */
    uint64_t tdiv;         /* nm_src_tdiv(tcols, tiles): k / tcols without a division */
} nm_src;

/* For k / tcols by a multiplication (Lemire, Kaser and Kurz, "Faster remainder by direct
 * computation", 2019): ceil(2^64 / tcols), exact for every k and tcols below 2^32; 0 (divide)
 * when tcols is 1 or the sizes are larger. */
static inline uint64_t nm_src_tdiv(int64_t tcols, int64_t tiles)
{
    return tcols > 1 && tcols < (INT64_C(1) << 32) && tiles <= (INT64_C(1) << 32)
               ? UINT64_MAX / (uint64_t)tcols + 1
               : 0;
}

/* Tile k's row and column in the grid of tiles (k < tiles). */
static inline __attribute__((always_inline)) void nm_tile_place(const nm_src *src, int64_t k,
                                                                int64_t *r, int64_t *q)
{
    if (src->tdiv) {
        *r = (int64_t)(((unsigned __int128)src->tdiv * (uint64_t)k) >> 64);
        *q = k - *r * src->tcols;
    } else {
        *r = k / src->tcols;
        *q = k % src->tcols;
    }
}

/* The sizes of a matrix call (nm_exact_matrix, nm_certify) are valid. */
static inline int nm_matrix_args_ok(int dtype, int64_t rows, int64_t cols, int m, int n,
                                    int64_t mask_rs, int nthreads)
{
    return rows >= 0 && cols >= 0 && m >= 1 && m <= NM_MAX_M && n >= 1 && n <= m &&
           nthreads >= 1 && rows % m == 0 && cols % m == 0 && dtype >= NM_F64 &&
           dtype <= NM_BF16 && mask_rs >= cols;
}

/* IEEE half and bfloat16 bits to double (exact). */
static inline double nm_half(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, ex = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (ex == 0) { /* zero or subnormal: man * 2^-24 */
        f = (float)man * 5.9604644775390625e-08f;
        return sign ? -(double)f : (double)f;
    }
    const uint32_t bits = sign | (ex == 31 ? 0x7f800000u | (man << 13)
                                           : ((ex + 112) << 23) | (man << 13));
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

static inline double nm_bf16(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* Copy the scores of tile k (m x m, row-major) into buf, as float64: |x| when absolute.
 * Checking them is the caller's (nm_scan_scores). */
static inline __attribute__((always_inline)) void nm_read_tile(const nm_src *src, int m,
                                                               int64_t k, double *buf)
{
    int64_t r0, c0;
    nm_tile_place(src, k, &r0, &c0);
    r0 *= m;
    c0 *= m;
    const int64_t rs = src->rs, cs = src->cs;
    const int ab = src->absolute;
    if (src->dtype == NM_F32 && cs == 1 && m % NM_W == 0) { /* NM_W floats per vector */
        typedef float nm_vf __attribute__((vector_size(4 * NM_W)));
        _Static_assert(NM_W == 4, "four floats per vector, converted lane by lane");
        const nm_vi sign = ab ? (nm_vi){0} + INT64_MAX : (nm_vi){0} - 1;
        const float *base = (const float *)src->data + r0 * rs + c0;
        for (int i = 0; i < m; i++)
            for (int j0 = 0; j0 < m; j0 += NM_W) {
                nm_vf f;
                memcpy(&f, base + i * rs + j0, sizeof f);
                /* lane by lane: GCC 12 turns this into one vcvtps2pd, but a convertvector
                 * into two half-width ones and an insert */
                const nm_vd x = {f[0], f[1], f[2], f[3]};
                const nm_vd d = (nm_vd)((nm_vi)x & sign);
                memcpy(buf + i * m + j0, &d, sizeof d);
            }
        return;
    }
#define NM_READ(TYPE, CONV)                                                                   \
    do {                                                                                      \
        const TYPE *base = (const TYPE *)src->data + r0 * rs + c0 * cs;                       \
        for (int i = 0; i < m; i++) {                                                         \
            const TYPE *row = base + i * rs;                                                  \
            double *out = buf + i * m;                                                        \
            if (cs == 1 && ab)                                                                \
                for (int j = 0; j < m; j++)                                                   \
                    out[j] = fabs(CONV(row[j]));                                              \
            else if (cs == 1)                                                                 \
                for (int j = 0; j < m; j++)                                                   \
                    out[j] = CONV(row[j]);                                                    \
            else                                                                              \
                for (int j = 0; j < m; j++) {                                                 \
                    const double x = CONV(row[j * cs]);                                       \
                    out[j] = ab ? fabs(x) : x;                                                \
                }                                                                             \
        }                                                                                     \
    } while (0)
#define NM_ID(x) ((double)(x))
    switch (src->dtype) {
    case NM_F64: NM_READ(double, NM_ID); break;
    case NM_F32: NM_READ(float, NM_ID); break;
    case NM_F16: NM_READ(uint16_t, nm_half); break;
    default: NM_READ(uint16_t, nm_bf16); break;
    }
#undef NM_ID
#undef NM_READ
}

/* Per-tile certificate outputs (see nm_certify in nmopt_kernels.h). */
typedef struct {
    double *kept, *bound;
    int32_t *nshort;
    int8_t *bad;
} nm_cert;

/* The certificate of tiles [lo, hi) of a mask and its prices (nm_certify.c): the kept score,
 * the dual bound, the short rows and columns and the broken ones, computed apart from the
 * solver, tile k's at out->kept[k - lo] etc. NM_ERR_VALUE on a bad score. */
int nm_certify_range(const nm_src *src, const nm_cert *out, int m, int n, int sat, int rowwise,
                     const uint8_t *mask, int64_t mask_rs, const double *u, const double *v,
                     int64_t lo, int64_t hi);

/* One nm_exact call: inputs, outputs, and the first error (nm_set_error). The scores come
 * from `tiles` ((t, m, m) float64), or when it is NULL from `src`, a matrix read in place;
 * the mask goes to the tiles of `mask` or, with a matrix, into `mask` with row stride
 * mask_rs. warm_v: the column prices of a previous solve to start from, or NULL; warm_x:
 * its mask (like `mask`, row stride warm_x_rs), or NULL. */
struct nm_exact_ctx {
    const double *tiles;
    nm_src src;
    int m, n, sat, flags;
    uint8_t *mask;
    int64_t mask_rs;
    double *u, *v;
    int64_t u_first; /* the tile whose row prices are at u[0] (a thread's block, or 0) */
    const double *warm_v; /* (t, m), or NULL */
    const uint8_t *warm_x; /* with a matrix and warm_v: the previous mask, or NULL */
    int64_t warm_x_rs;
    double *u_rows; /* with a matrix: u by matrix row (nm_exact_matrix), or NULL */
    nm_cert cert; /* with a matrix: certify each block of tiles once solved (kept != NULL) */
    int8_t *status;
    int err;
};

/* Where tile k's row prices go. */
static inline double *nm_tile_u(const nm_exact_ctx *c, int64_t k)
{
    return c->u + (k - c->u_first) * c->m;
}

/* Scores of tile k (m = c->m, a constant where the caller specialises): in place for float64
 * tiles, else read into buf (m*m doubles). */
static inline __attribute__((always_inline)) const double *
nm_tile_scores_m(const nm_exact_ctx *c, int64_t k, double *buf, const int m)
{
    if (c->tiles)
        return c->tiles + k * m * m;
    nm_read_tile(&c->src, m, k, buf);
    return buf;
}

static inline __attribute__((always_inline)) const double *nm_tile_scores(const nm_exact_ctx *c,
                                                                          int64_t k, double *buf)
{
    return nm_tile_scores_m(c, k, buf, c->m);
}

/* Ask the caches for tile k of a matrix read in place (its scores and the previous mask)
 * ahead of its use: its rows lie a row stride apart, which the hardware prefetchers do not
 * follow from tile to tile. Always inlined: GCC drops calls to a function of prefetches only. */
static inline __attribute__((always_inline)) void nm_prefetch_tile(const nm_exact_ctx *c,
                                                                   int64_t k)
{
    if (c->tiles || c->src.cs != 1)
        return;
    const int m = c->m, es = c->src.dtype == NM_F64 ? 8 : c->src.dtype == NM_F32 ? 4 : 2;
    int64_t r0, c0;
    nm_tile_place(&c->src, k, &r0, &c0);
    r0 *= m;
    c0 *= m;
    const char *s = (const char *)c->src.data + (r0 * c->src.rs + c0) * es;
    for (int i = 0; i < m; i++) {
        const char *row = s + i * c->src.rs * es;
        __builtin_prefetch(row);
        __builtin_prefetch(row + (m - 1) * es);
        if (c->warm_x)
            __builtin_prefetch(c->warm_x + (r0 + i) * c->warm_x_rs + c0);
    }
}

/* Where row 0 of tile k's mask goes, and the stride between its rows. */
static inline uint8_t *nm_tile_mask_out(const nm_exact_ctx *c, int64_t k, int64_t *stride)
{
    const int m = c->m;
    if (c->tiles) {
        *stride = m;
        return c->mask + k * m * m;
    }
    *stride = c->mask_rs;
    int64_t r, q;
    nm_tile_place(&c->src, k, &r, &q);
    return c->mask + r * m * c->mask_rs + q * m;
}

/* 2^k as a double, for -1022 <= k <= 1023 (exact, no libm call). */
static inline double nm_pow2(int k)
{
    const uint64_t bits = (uint64_t)(k + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* The binary exponent e of x > 0 as frexp gives it (x = f * 2^e, f in [0.5, 1)). */
static inline int nm_exponent_of(double x)
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
#define NM_NORMAL_SCALE(e) ((e) > -1000 && (e) < 1000)

/* Scan mm scores: 1 if one is NaN, infinite or negative, else 0 with the largest in *mx. */
static inline __attribute__((always_inline)) int nm_scan_scores(const double *s, int mm,
                                                                double *mx)
{
    const nm_vd zero = {0}, big = zero + DBL_MAX;
    nm_vd vmx = zero;
    nm_vi vbad = {0};
    int a = 0;
    for (; a + NM_W <= mm; a += NM_W) {
        const nm_vd x = nm_vload_d(s + a);
        vbad |= ~(x >= zero) | (x > big); /* NaN fails the first test */
        vmx = nm_vblend_d(x > vmx, x, vmx);
    }
    double best = 0.0;
    int bad = nm_hsum_i(vbad) != 0;
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

/* General path (nm_exact_general.c). A thread's workspace is an array of slots, the tiles it
 * has in flight; nm_general_run solves tiles [lo, hi) with them, nm_general_tile solves one
 * tile in the first slot. Errors go to c->err. */
nm_slot *nm_slots_alloc(int m); /* NULL when out of memory */
void nm_slots_free(nm_slot *slots);
void nm_general_run(nm_exact_ctx *c, nm_slot *slots, int64_t lo, int64_t hi);
int nm_general_tile(nm_slot *slots, const nm_exact_ctx *c, int64_t k);
nm_tile *nm_probe_tile(nm_slot *slots, const nm_exact_ctx *c, int64_t k, double *v,
                       double *own);

/* M = 4 path (nm_exact_q4.c): tiles [lo, hi), the ones it cannot certify through
 * nm_general_tile. */
void nm_q4_run(nm_exact_ctx *c, nm_slot *slots, int64_t lo, int64_t hi);

/* Fallback (nm_exact_fallback.c): degrees recounted from the mask, the mask's validity, cycle
 * cancelling (1 on success) and a valid starting mask (empty, or full: n per row/column).
 * nm_exact_general.c, their caller, redeclares them cold. */
void nm_recount(nm_tile *t);
int nm_feasible(const nm_tile *t);
int nm_cycle_cancel(nm_tile *t, double eps);
void nm_trivial_mask(nm_tile *t, int full);

#endif
