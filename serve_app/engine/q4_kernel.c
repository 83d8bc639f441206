/* y = x @ w.T for 4-bit weights in GGUF Q4_1 form, activations quantized to 16 bits per block
 * of 32 (llama.cpp's Q4_1 x Q8_1 dot product with 16-bit activations: 8 bits per block lost too
 * much on SmolLM2, top-1 96.7% against float32), float32 in and out.
 *
 * Weights, per output row n and block b of 32 input columns: 16 bytes of nibbles (byte j: value
 * j in the low nibble, value j + 16 in the high), w = q * d[n, b] + m[n, b].
 * Activations, per row r and block b: x ~= dx * qx (qx int16, |qx| <= QMAX), and
 * sum_b(w . x) = d * dx * sum(q * qx) + m * (dx * sum(qx)).
 *
 * From F32_MIN_ROWS activation rows on (the float path), each thread decodes GEMM_NR output
 * rows to float32 into a buffer of its own and multiplies them with every activation row, 4 x 3
 * accumulators at a time (exact to float32 rounding). In SmolLM2's whole 16-row decode step it
 * is faster than fbgemm's fp16 GEMM on copies of the weights (it reads ~60 MB a step, the copies
 * ~350 MB), ~1.1-1.3x slower with every weight in cache (docs/benchmarks.md, session 25).
 *
 * Output rows are split over the threads of work_pool.c (work_pool_set_threads; q4_native.py
 * keeps it at torch's thread count).
 * Compiled and loaded by q4_native.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_simd.h"
#include "work_pool.h"

#define QK 32
#define ROW_TILE 4 /* activation rows sharing one decoded weight block (16-bit path) */
#define GEMM_MR 4 /* float path: activation rows ... */
#define GEMM_NR 3 /* ... times output rows per register tile */
#define GEMM_ROW_BLOCK 64 /* activation rows per pass over the weights (kept in L2) */
#define F32_MIN_ROWS 8 /* from this many rows on, weights are decoded to float32 instead */
#define QMAX 32767.0f

/* One row of K floats -> K int16, a scale and a scaled sum per block. */
static void quantize_row(const float *x, int64_t k, int16_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        __m256 maxabs = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < QK; i += 8)
            maxabs = _mm256_max_ps(maxabs, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(maxabs), _mm256_extractf128_ps(maxabs, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / QMAX;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            const int v = (int)lrintf(xb[i] * id);
            qx[b * QK + i] = (int16_t)v;
            sum += v;
        }
        dx[b] = d;
        sx[b] = d * (float)sum;
    }
}

/* Every row's activations quantized (quantize_row), in one buffer free_activations releases;
 * q is NULL when it could not be allocated. */
typedef struct {
    int16_t *q;
    float *d, *s;
} activations16;

static activations16 quantize_rows(const float *x, int64_t rows, int64_t k) {
    const int64_t nb = k / QK;
    activations16 a;
    float *factors = malloc(sizeof(float) * (size_t)(2 * rows * nb) + sizeof(int16_t) * (size_t)(rows * k));
    a.d = factors;
    a.s = factors ? factors + rows * nb : NULL;
    a.q = factors ? (int16_t *)(factors + 2 * rows * nb) : NULL;
    if (!factors) return a;
    for (int64_t r = 0; r < rows; r++)
        quantize_row(x + r * k, k, a.q + r * k, a.d + r * nb, a.s + r * nb);
    return a;
}

static void free_activations(activations16 a) { free(a.d); }

/* A block's 32 weights as int16: values 0..15 (low nibbles), then 16..31 (high nibbles). */
typedef struct {
    __m256i lo, hi;
} block16;

static inline block16 unpack_nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    block16 w;
    w.lo = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));
    w.hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
    return w;
}

/* sum_b a[b] * b[b] over nb blocks (the weights' minimums against the blocks' sums). */
static inline float dot_floats(const float *a, const float *b, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < nb; i++) sum += a[i] * b[i];
    return sum;
}

/* sum(q * qx) of one block in 8 int32 lanes (each at most 4 * 15 * 32767), as floats. */
static inline __m256 block_dot(block16 w, const int16_t *qx) {
    const __m256i lo = _mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i *)qx));
    const __m256i hi = _mm256_madd_epi16(w.hi, _mm256_loadu_si256((const __m256i *)(qx + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
}

/* y[r, n] for one output row n and one activation row (two blocks a step, two accumulators). */
static inline float dot_row(const uint8_t *qs, const float *d, const float *m, int64_t nb,
                            const int16_t *qx, const float *dx, const float *sx) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256 s0 = block_dot(unpack_nibbles(qs + b * 16), qx + b * QK);
        const __m256 s1 = block_dot(unpack_nibbles(qs + (b + 1) * 16), qx + (b + 1) * QK);
        acc0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(d[b] * dx[b]), acc0);
        acc1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(d[b + 1] * dx[b + 1]), acc1);
    }
    for (; b < nb; b++)
        acc0 = _mm256_fmadd_ps(block_dot(unpack_nibbles(qs + b * 16), qx + b * QK),
                               _mm256_set1_ps(d[b] * dx[b]), acc0);
    return hsum(_mm256_add_ps(acc0, acc1)) + dot_floats(m, sx, nb);
}

/* y[r, n] for rows r0 .. r0 + tile of one output row n, each weight block decoded once. */
static inline void dot_tile(const uint8_t *qs, const float *d, const float *m, int64_t nb,
                            const int16_t *qx, const float *dx, const float *sx, int64_t k,
                            int tile, float *out) {
    if (tile == 1) {
        out[0] = dot_row(qs, d, m, nb, qx, dx, sx);
        return;
    }
    __m256 acc[ROW_TILE];
    for (int r = 0; r < tile; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block16 w = unpack_nibbles(qs + b * 16);
        for (int r = 0; r < tile; r++)
            acc[r] = _mm256_fmadd_ps(block_dot(w, qx + r * k + b * QK),
                                     _mm256_set1_ps(d[b] * dx[r * nb + b]), acc[r]);
    }
    for (int r = 0; r < tile; r++) out[r] = hsum(acc[r]) + dot_floats(m, sx + r * nb, nb);
}

/* A block's 32 weights as float32 (q * d + m) in four registers: values 0-7, 8-15, 16-23, 24-31. */
static inline void decode_block_f32(const uint8_t *qs, float d, float m, __m256 w[4]) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(packed, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv);
}

/* y[r0 .. r0 + mr, j0 .. j0 + nr] from mr rows of float32 activations x (row stride k) and nr
 * output rows already decoded to float32 in w ([nr, k]): mr x nr accumulators along k, each row's
 * activations loaded once per 8 columns for all nr outputs (4 x 3: 12 accumulators, 3 weight
 * registers and one activation register, the 16 AVX2 has). Called with constant mr and nr. */
static inline __attribute__((always_inline)) void gemm_tile(const float *x, int64_t k,
                                                              const float *w, int mr, int nr,
                                                              float *y, int64_t ldy) {
    __m256 acc[GEMM_MR][GEMM_NR];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        __m256 wv[GEMM_NR];
        for (int c = 0; c < nr; c++) wv[c] = _mm256_load_ps(w + c * k + i);
        for (int r = 0; r < mr; r++) {
            const __m256 a = _mm256_loadu_ps(x + r * k + i);
            for (int c = 0; c < nr; c++) acc[r][c] = _mm256_fmadd_ps(a, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) y[r * ldy + c] = hsum(acc[r][c]);
}

/* Every activation row times nr decoded output rows, GEMM_MR rows at a time. */
static void gemm_columns(const float *x, int64_t rows, int64_t k, const float *w, int nr,
                         float *y, int64_t n) {
    int64_t r = 0;
    if (nr == GEMM_NR)
        for (; r + GEMM_MR <= rows; r += GEMM_MR)
            gemm_tile(x + r * k, k, w, GEMM_MR, GEMM_NR, y + r * n, n);
    for (; r < rows; r++) {
        if (nr == GEMM_NR) gemm_tile(x + r * k, k, w, 1, GEMM_NR, y + r * n, n);
        else
            for (int c = 0; c < nr; c++) gemm_tile(x + r * k, k, w + c * k, 1, 1, y + r * n + c, n);
    }
}

#define Q8_BLOCK_BYTES 34

/* A Q8_0 block's fp16 scale. */
static inline float fp16_scale(const uint8_t *block) {
    uint16_t bits;
    memcpy(&bits, block, 2);
    return _cvtsh_ss(bits);
}

/* The weights the float path decodes: Q4_1 nibbles with float32 factors (q4_matmul), or the
 * GGUF's own Q8_0 rows (q8_matmul). */
typedef struct {
    const uint8_t *qs; /* Q4: [n, k / 2] nibbles; Q8: [n, row_bytes] blocks */
    const float *d, *m; /* Q4 only: [n, k / 32] each */
    int64_t q8_row_bytes; /* 0 for Q4 */
} float_path_weights;

/* A Q8_0 block (fp16 scale, 32 int8) as float32 in four registers. */
static inline void decode_q8_block_f32(const uint8_t *block, __m256 w[4]) {
    const __m256 dv = _mm256_set1_ps(fp16_scale(block));
    for (int part = 0; part < 4; part++) {
        const __m128i q = _mm_loadl_epi64((const __m128i *)(block + 2 + part * 8));
        w[part] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), dv);
    }
}

/* Output rows j .. j + nr decoded to float32 into out [nr, k]. */
static void decode_rows_f32(const float_path_weights *w, int64_t j, int nr, int64_t nb,
                            float *out) {
    for (int c = 0; c < nr; c++) {
        for (int64_t b = 0; b < nb; b++, out += QK) {
            const int64_t i = (j + c) * nb + b;
            __m256 v[4];
            if (w->q8_row_bytes)
                decode_q8_block_f32(w->qs + (j + c) * w->q8_row_bytes + b * Q8_BLOCK_BYTES, v);
            else
                decode_block_f32(w->qs + i * 16, w->d[i], w->m[i], v);
            for (int part = 0; part < 4; part++) _mm256_store_ps(out + part * 8, v[part]);
        }
    }
}

/* A float buffer of this thread's, grown as needed (kept: the pool's threads live on). */
static float *thread_buffer(size_t floats) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (capacity < floats) {
        free(buffer);
        buffer = aligned_alloc(32, (floats * sizeof(float) + 31) / 32 * 32);
        capacity = buffer ? floats : 0;
    }
    return buffer;
}

typedef struct {
    const float *x; /* the rows of this pass */
    int64_t rows, k, n, nb;
    const float_path_weights *weights;
    float *y;
    _Atomic int failed;
} float_pass;

/* Column groups [begin, end) of one pass: each GEMM_NR output rows decoded once into this
 * thread's buffer, then multiplied with every activation row of the pass. */
static void float_pass_columns(void *arg, int64_t begin, int64_t end) {
    float_pass *p = arg;
    float *w = thread_buffer((size_t)(GEMM_NR * p->k));
    if (!w) {
        atomic_store(&p->failed, 1);
        return;
    }
    for (int64_t group = begin; group < end; group++) {
        const int64_t j = group * GEMM_NR;
        const int nr = p->n - j < GEMM_NR ? (int)(p->n - j) : GEMM_NR;
        decode_rows_f32(p->weights, j, nr, p->nb, w);
        gemm_columns(p->x, p->rows, p->k, w, nr, p->y + j, p->n);
    }
}

/* The float path, in passes of GEMM_ROW_BLOCK activation rows (kept in L2), each split over the
 * work pool by groups of GEMM_NR output rows. */
static int matmul_f32(const float *x, int64_t rows, int64_t k, const float_path_weights *weights,
                      int64_t n, float *y) {
    const int64_t groups = (n + GEMM_NR - 1) / GEMM_NR;
    float_pass pass = {.k = k, .n = n, .nb = k / QK, .weights = weights, .failed = 0};
    for (int64_t r = 0; r < rows; r += GEMM_ROW_BLOCK) {
        pass.x = x + r * k;
        pass.rows = rows - r < GEMM_ROW_BLOCK ? rows - r : GEMM_ROW_BLOCK;
        pass.y = y + r * n;
        work_pool_for(groups, work_pool_chunk(groups, 8), float_pass_columns, &pass);
    }
    return atomic_load(&pass.failed) ? -1 : 0;
}

typedef struct {
    activations16 a;
    int64_t rows, k;
    const uint8_t *qs;
    const float *d, *m;
    int64_t n;
    float *y;
} q4_rows16;

/* Outputs [begin, end) of the 16-bit path. */
static void q4_outputs16(void *arg, int64_t begin, int64_t end) {
    const q4_rows16 *p = arg;
    const int64_t k = p->k, nb = k / QK, n = p->n;
    for (int64_t j = begin; j < end; j++) {
        float out[ROW_TILE];
        for (int64_t r0 = 0; r0 < p->rows; r0 += ROW_TILE) {
            const int tile = p->rows - r0 < ROW_TILE ? (int)(p->rows - r0) : ROW_TILE;
            dot_tile(p->qs + j * nb * 16, p->d + j * nb, p->m + j * nb, nb, p->a.q + r0 * k,
                     p->a.d + r0 * nb, p->a.s + r0 * nb, k, tile, out);
            for (int r = 0; r < tile; r++) p->y[(r0 + r) * n + j] = out[r];
        }
    }
}

/* x [rows, k] float32, qs [n, k / 2] bytes, d and m [n, k / 32] float32, y [rows, n] float32.
 * Returns 0, or -1 when memory ran out. */
int q4_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *qs, const float *d,
              const float *m, int64_t n, float *y) {
    if (rows >= F32_MIN_ROWS) {
        const float_path_weights weights = {qs, d, m, 0};
        return matmul_f32(x, rows, k, &weights, n, y);
    }
    const activations16 a = quantize_rows(x, rows, k);
    if (!a.q) return -1;
    q4_rows16 job = {a, rows, k, qs, d, m, n, y};
    work_pool_for(n, work_pool_chunk(n, 2), q4_outputs16, &job);
    free_activations(a);
    return 0;
}

typedef struct {
    const uint8_t *qs;
    const float *d, *m;
    int64_t k;
    float *w;
} q4_unpack;

/* Output rows [begin, end) of q4_dequantize. */
static void q4_dequantize_rows(void *arg, int64_t begin, int64_t end) {
    const q4_unpack *p = arg;
    const int64_t k = p->k, nb = k / QK;
    for (int64_t j = begin; j < end; j++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = p->qs + (j * nb + b) * 16;
            float *out = p->w + j * k + b * QK;
            const float scale = p->d[j * nb + b], min = p->m[j * nb + b];
            for (int i = 0; i < 16; i++) {
                out[i] = (float)(q[i] & 0x0F) * scale + min;
                out[i + 16] = (float)(q[i] >> 4) * scale + min;
            }
        }
    }
}

/* The weight as float32 [n, k] (exactness checks and big prefill forwards). */
void q4_dequantize(const uint8_t *qs, const float *d, const float *m, int64_t n, int64_t k,
                   float *w) {
    q4_unpack job = {qs, d, m, k, w};
    work_pool_for(n, work_pool_chunk(n, 4), q4_dequantize_rows, &job);
}

/* ---- Q8_0 rows (the GGUF's own blocks: fp16 scale, then 32 int8), 16-bit activations ----
 * For a tied output layer read straight from the file's map: 1.5x fbgemm's fp16 GEMM at one
 * row (half the bytes); from F32_MIN_ROWS rows on, the float path above. */

static inline __m256 q8_block_dot(const uint8_t *block, const int16_t *qx) {
    const __m128i lo = _mm_loadu_si128((const __m128i *)(block + 2));
    const __m128i hi = _mm_loadu_si128((const __m128i *)(block + 18));
    const __m256i a = _mm256_madd_epi16(_mm256_cvtepi8_epi16(lo), _mm256_loadu_si256((const __m256i *)qx));
    const __m256i b = _mm256_madd_epi16(_mm256_cvtepi8_epi16(hi), _mm256_loadu_si256((const __m256i *)(qx + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
}

typedef struct {
    activations16 a;
    int64_t rows, k;
    const uint8_t *w;
    int64_t row_bytes, n;
    float *y;
} q8_rows16;

/* Outputs [begin, end) of the 16-bit path on Q8_0 rows (no minimum: no block sums needed). */
static void q8_outputs16(void *arg, int64_t begin, int64_t end) {
    const q8_rows16 *p = arg;
    const int64_t k = p->k, nb = k / QK, n = p->n;
    for (int64_t j = begin; j < end; j++) {
        const uint8_t *wj = p->w + j * p->row_bytes;
        for (int64_t r0 = 0; r0 < p->rows; r0 += ROW_TILE) {
            const int tile = p->rows - r0 < ROW_TILE ? (int)(p->rows - r0) : ROW_TILE;
            __m256 acc[ROW_TILE];
            for (int r = 0; r < tile; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *block = wj + b * Q8_BLOCK_BYTES;
                const float d = fp16_scale(block);
                for (int r = 0; r < tile; r++) {
                    const int64_t row = r0 + r;
                    acc[r] = _mm256_fmadd_ps(q8_block_dot(block, p->a.q + row * k + b * QK),
                                             _mm256_set1_ps(d * p->a.d[row * nb + b]), acc[r]);
                }
            }
            for (int r = 0; r < tile; r++) p->y[(r0 + r) * n + j] = hsum(acc[r]);
        }
    }
}

/* x [rows, k] float32; w [n, row_bytes] Q8_0 rows (row_bytes = k / 32 * 34); y [rows, n].
 * Returns 0, or -1 when memory ran out. */
int q8_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t row_bytes,
              int64_t n, float *y) {
    if (rows >= F32_MIN_ROWS) {
        const float_path_weights weights = {w, NULL, NULL, row_bytes};
        return matmul_f32(x, rows, k, &weights, n, y);
    }
    const activations16 a = quantize_rows(x, rows, k);
    if (!a.q) return -1;
    q8_rows16 job = {a, rows, k, w, row_bytes, n, y};
    work_pool_for(n, work_pool_chunk(n, 2), q8_outputs16, &job);
    free_activations(a);
    return 0;
}
