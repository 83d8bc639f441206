/* y = x @ w.T for 4-bit weights in GGUF Q4_1 form, activations quantized to 16 bits per block
 * of 32 (llama.cpp's Q4_1 x Q8_1 dot product with 16-bit activations: 8 bits per block lost too
 * much on SmolLM2, top-1 96.7% against float32), float32 in and out.
 *
 * Weights, per output row n and block b of 32 input columns: 16 bytes of nibbles (byte j: value
 * j in the low nibble, value j + 16 in the high), w = q * d[n, b] + m[n, b].
 * Activations, per row r and block b: x ~= dx * qx (qx int16, |qx| <= QMAX), and
 * sum_b(w . x) = d * dx * sum(q * qx) + m * (dx * sum(qx)).
 *
 * From F32_MIN_ROWS activation rows on, each weight block is decoded to float32 once and
 * multiplied with up to F32_TILE rows of float32 activations (exact to float32 rounding;
 * ~1.1-1.2x the 16-bit path at 8-16 rows, slower at 4: docs/benchmarks.md, session 19).
 *
 * Output rows are split over the OpenMP threads of the calling thread's team; built against the
 * libgomp torch has loaded, it is torch's own pool and follows torch.set_num_threads.
 * Compiled and loaded by q4_native.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_simd.h"

#define QK 32
#define ROW_TILE 4 /* activation rows sharing one decoded weight block (16-bit path) */
#define F32_TILE 8 /* the same for the float path: 4 weight + 8 accumulator registers */
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

/* y[r, n] for rows 0 .. tile of float32 activations x (row stride k) and one output row n:
 * each block decoded once to float32, then 4 FMAs per row (exact to float32 accumulation). */
static inline void dot_tile_f32(const uint8_t *qs, const float *d, const float *m, int64_t nb,
                                const float *x, int64_t k, int tile, float *out) {
    __m256 acc[F32_TILE];
    for (int r = 0; r < tile; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        decode_block_f32(qs + b * 16, d[b], m[b], w);
        for (int r = 0; r < tile; r++) {
            const float *xb = x + r * k + b * QK;
            __m256 a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), acc[r]);
            a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), a);
            a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a);
            acc[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a);
        }
    }
    for (int r = 0; r < tile; r++) out[r] = hsum(acc[r]);
}

static void matmul_f32(const float *x, int64_t rows, int64_t k, const uint8_t *qs,
                       const float *d, const float *m, int64_t n, float *y) {
    const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float out[F32_TILE];
        for (int64_t r0 = 0; r0 < rows; r0 += F32_TILE) {
            const int tile = rows - r0 < F32_TILE ? (int)(rows - r0) : F32_TILE;
            dot_tile_f32(qs + j * nb * 16, d + j * nb, m + j * nb, nb, x + r0 * k, k, tile, out);
            for (int r = 0; r < tile; r++) y[(r0 + r) * n + j] = out[r];
        }
    }
}

/* x [rows, k] float32, qs [n, k / 2] bytes, d and m [n, k / 32] float32, y [rows, n] float32.
 * Returns 0, or -1 when memory ran out. */
int q4_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *qs, const float *d,
              const float *m, int64_t n, float *y) {
    if (rows >= F32_MIN_ROWS) {
        matmul_f32(x, rows, k, qs, d, m, n, y);
        return 0;
    }
    const int64_t nb = k / QK;
    const activations16 a = quantize_rows(x, rows, k);
    if (!a.q) return -1;
    const int16_t *qx = a.q;
    const float *dx = a.d, *sx = a.s;
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float out[ROW_TILE];
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_TILE) {
            const int tile = rows - r0 < ROW_TILE ? (int)(rows - r0) : ROW_TILE;
            dot_tile(qs + j * nb * 16, d + j * nb, m + j * nb, nb, qx + r0 * k, dx + r0 * nb,
                     sx + r0 * nb, k, tile, out);
            for (int r = 0; r < tile; r++) y[(r0 + r) * n + j] = out[r];
        }
    }
    free_activations(a);
    return 0;
}

/* The weight as float32 [n, k] (exactness checks and big prefill forwards). */
void q4_dequantize(const uint8_t *qs, const float *d, const float *m, int64_t n, int64_t k,
                   float *w) {
    const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = qs + (j * nb + b) * 16;
            float *out = w + j * k + b * QK;
            const float scale = d[j * nb + b], min = m[j * nb + b];
            for (int i = 0; i < 16; i++) {
                out[i] = (float)(q[i] & 0x0F) * scale + min;
                out[i + 16] = (float)(q[i] >> 4) * scale + min;
            }
        }
    }
}

/* ---- Q8_0 rows (the GGUF's own blocks: fp16 scale, then 32 int8), 16-bit activations ----
 * For a tied output layer read straight from the file's map: 1.5x fbgemm's fp16 GEMM at one
 * row (half the bytes), 0.85x at 16 rows (a float path like q4's was slower still there). */

#define Q8_BLOCK_BYTES 34

static inline __m256 q8_block_dot(const uint8_t *block, const int16_t *qx) {
    const __m128i lo = _mm_loadu_si128((const __m128i *)(block + 2));
    const __m128i hi = _mm_loadu_si128((const __m128i *)(block + 18));
    const __m256i a = _mm256_madd_epi16(_mm256_cvtepi8_epi16(lo), _mm256_loadu_si256((const __m256i *)qx));
    const __m256i b = _mm256_madd_epi16(_mm256_cvtepi8_epi16(hi), _mm256_loadu_si256((const __m256i *)(qx + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
}

static inline float fp16_scale(const uint8_t *block) {
    uint16_t bits;
    memcpy(&bits, block, 2);
    return _cvtsh_ss(bits);
}

/* x [rows, k] float32; w [n, row_bytes] Q8_0 rows (row_bytes = k / 32 * 34); y [rows, n].
 * Returns 0, or -1 when memory ran out. */
int q8_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t row_bytes,
              int64_t n, float *y) {
    const int64_t nb = k / QK;
    const activations16 a = quantize_rows(x, rows, k);
    if (!a.q) return -1;
    const int16_t *qx = a.q;
    const float *dx = a.d; /* Q8_0 has no minimum: the blocks' sums are not needed */
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *wj = w + j * row_bytes;
        for (int64_t r0 = 0; r0 < rows; r0 += ROW_TILE) {
            const int tile = rows - r0 < ROW_TILE ? (int)(rows - r0) : ROW_TILE;
            __m256 acc[ROW_TILE];
            for (int r = 0; r < tile; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *block = wj + b * Q8_BLOCK_BYTES;
                const float d = fp16_scale(block);
                for (int r = 0; r < tile; r++) {
                    const int64_t row = r0 + r;
                    acc[r] = _mm256_fmadd_ps(q8_block_dot(block, qx + row * k + b * QK),
                                             _mm256_set1_ps(d * dx[row * nb + b]), acc[r]);
                }
            }
            for (int r = 0; r < tile; r++) y[(r0 + r) * n + j] = hsum(acc[r]);
        }
    }
    free_activations(a);
    return 0;
}
