/* The rest of a Llama decode step in C: RMSNorm (with the residual add before it), RoPE, the
 * KV-cache write and attention over the cached columns, SiLU x up, and a whole decoder layer on
 * 4-bit weights (q4_kernel.c's q4_matmul) in one call.
 *
 * Why: at one row a step's matmuls take ~6 ms of SmolLM2's ~12 ms; the other half was ~25 small
 * torch ops a layer (a few us each) and torch's flash-attention kernel, ~50 us a call at one
 * row and ~490 at 16 (docs/benchmarks.md, session 20). Called by llama_decode.py; float32 in and
 * out, and the values of its torch path to float32 rounding (tests/unit/test_llama_decode.py).
 *
 * Layouts (all contiguous, float32 unless said):
 *   hidden [rows, dim]; cos, sin [rows, head_dim], sin with its first half negated;
 *   qkv [rows, (heads + 2 kv_heads) head_dim]: q heads, then k heads, then v heads;
 *   keys, values [sequences, kv_heads, capacity, head_dim] (the cache's buffers). Activation
 *   rows are `tokens` consecutive new tokens of each sequence (1 in a decode step, a prompt's
 *   left-padded tokens in a prefill): row i is token t = i % tokens of sequence s = i / tokens;
 *   it writes its key and value at column c = first_column + t and attends over columns 0..c
 *   of its sequence where mask [sequences, first_column + tokens] (int64, the batch's attention
 *   mask) is not 0.
 * Functions that allocate return 0, or -1 when memory or a shape limit ran out.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernel_simd.h"
#include "work_pool.h"

#define MAX_GROUP 16       /* query heads per key/value head */
#define MAX_HEAD_DIM 256   /* a multiple of 8 too */
#define SCORE_BLOCK 64     /* columns scored before their values are summed (a multiple of 8) */
#define PARALLEL_WORK 1024 /* rows x kv heads x columns below which attention runs on one thread */

int q4_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *qs, const float *d,
              const float *m, int64_t n, float *y);

/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, 2^n
 * built in the exponent bits. x is clamped to [-87.3, 88.3] so 2^n stays a normal float
 * (relative error ~2e-7); callers that need an exact 0 mask it. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
}

/* ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, per row ---- */

/* hidden += delta first where delta is given (the residual add the norm follows). */
void add_rms_norm(float *hidden, const float *delta, int64_t rows, int64_t dim, const float *w,
                  float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = hidden + r * dim;
        float *yr = y + r * dim;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (delta) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(delta + r * dim + i));
                _mm256_storeu_ps(xr + i, v);
            }
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sum = hsum(acc);
        for (; i < dim; i++) {
            if (delta) xr[i] += delta[r * dim + i];
            sum += xr[i] * xr[i];
        }
        const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        const __m256 sv = _mm256_set1_ps(scale);
        for (i = 0; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), sv),
                                                   _mm256_loadu_ps(w + i)));
        for (; i < dim; i++) yr[i] = xr[i] * scale * w[i];
    }
}

void rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *y) {
    add_rms_norm((float *)x, NULL, rows, dim, w, eps, y); /* x is only read without a delta */
}

/* ---- out [rows, inter] = silu(gate) * up, gate_up [rows, 2 inter] side by side ---- */

void silu_mul(const float *gate_up, int64_t rows, int64_t inter, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * inter, *up = gate + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
        for (; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* ---- RoPE, the cache write and attention ---- */

/* y = (x * cos + flip_halves(x) * sin) * scale for one head (sin signed). */
static inline void rotate(const float *x, const float *cos, const float *sin, int64_t dim,
                          float scale, float *y) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        y[i] = (a * cos[i] + b * sin[i]) * scale;
        y[i + half] = (b * cos[i + half] + a * sin[i + half]) * scale;
    }
}

static inline float dot(const float *a, const float *b, int64_t dim) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (int64_t i = 8; i < dim; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

/* acc = acc * factor (one head's running sum of values) */
static inline void scale_in_place(float *acc, int64_t dim, float factor) {
    const __m256 f = _mm256_set1_ps(factor);
    for (int64_t i = 0; i < dim; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), f));
}

/* softmax(q k^T) v for `group` query heads sharing one key/value head, one row: each key and
 * value column is read once for all of them. Columns go in blocks of SCORE_BLOCK: score the
 * block, rescale the running sums to the new maximum (online softmax), add the block's values. */
static void attend_group(const float *q, int group, const float *keys, const float *values,
                         int64_t length, const int64_t *mask, int64_t dim, float *out) {
    float acc[MAX_GROUP * MAX_HEAD_DIM]; /* only group x dim of it is used and zeroed */
    float top[MAX_GROUP], total[MAX_GROUP];
    float scores[MAX_GROUP][SCORE_BLOCK];
    for (int64_t i = 0; i < group * dim; i++) acc[i] = 0.0f;
    for (int h = 0; h < group; h++) top[h] = -INFINITY, total[h] = 0.0f;
    const __m256 masked = _mm256_set1_ps(-INFINITY);
    for (int64_t c0 = 0; c0 < length; c0 += SCORE_BLOCK) {
        const int64_t n = length - c0 < SCORE_BLOCK ? length - c0 : SCORE_BLOCK;
        const int64_t padded = (n + 7) / 8 * 8;
        float block_top[MAX_GROUP];
        for (int h = 0; h < group; h++) block_top[h] = -INFINITY;
        for (int64_t c = 0; c < padded; c++) {
            const int live = c < n && mask[c0 + c] != 0;
            for (int h = 0; h < group; h++) {
                const float s = live ? dot(q + h * dim, keys + (c0 + c) * dim, dim) : -INFINITY;
                scores[h][c] = s;
                block_top[h] = s > block_top[h] ? s : block_top[h];
            }
        }
        for (int h = 0; h < group; h++) {
            if (block_top[h] == -INFINITY) continue; /* the whole block is padding */
            if (block_top[h] > top[h]) {
                const float factor = top[h] == -INFINITY ? 0.0f : expf(top[h] - block_top[h]);
                total[h] *= factor;
                scale_in_place(acc + h * dim, dim, factor);
                top[h] = block_top[h];
            }
            const __m256 t = _mm256_set1_ps(top[h]);
            __m256 sum = _mm256_setzero_ps();
            for (int64_t c = 0; c < padded; c += 8) {
                const __m256 s = _mm256_loadu_ps(scores[h] + c);
                const __m256 live = _mm256_cmp_ps(s, masked, _CMP_NEQ_OQ);
                const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(s, t)), live);
                _mm256_storeu_ps(scores[h] + c, p);
                sum = _mm256_add_ps(sum, p);
            }
            total[h] += hsum(sum);
        }
        for (int64_t c = 0; c < n; c++) {
            if (mask[c0 + c] == 0) continue;
            const float *v = values + (c0 + c) * dim;
            for (int h = 0; h < group; h++) {
                const __m256 p = _mm256_set1_ps(scores[h][c]);
                float *a = acc + h * dim;
                for (int64_t i = 0; i < dim; i += 8)
                    _mm256_storeu_ps(a + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i),
                                                            _mm256_loadu_ps(a + i)));
            }
        }
    }
    for (int h = 0; h < group; h++) {
        const float inverse = total[h] > 0.0f ? 1.0f / total[h] : 0.0f;
        for (int64_t i = 0; i < dim; i++) out[h * dim + i] = acc[h * dim + i] * inverse;
    }
}

typedef struct {
    const float *qkv;
    int64_t tokens, heads, kv_heads, head_dim, group, width, qkv_width;
    float scale;
    const float *cos, *sin;
    float *keys, *values;
    int64_t capacity, first_column;
    const int64_t *mask;
    float *out;
} attention_job;

/* (row, kv head) pairs [begin, end): k rotated and k, v written into the row's cache column. */
static void write_new_columns(void *arg, int64_t begin, int64_t end) {
    const attention_job *p = arg;
    const int64_t kv_heads = p->kv_heads, head_dim = p->head_dim;
    for (int64_t pair = begin; pair < end; pair++) {
        const int64_t r = pair / kv_heads, g = pair % kv_heads;
        const int64_t column = p->first_column + r % p->tokens;
        const float *row = p->qkv + r * p->qkv_width;
        const int64_t cache_offset = ((r / p->tokens) * kv_heads + g) * p->capacity * head_dim;
        const float *v = row + (p->heads + kv_heads + g) * head_dim;
        rotate(row + (p->heads + g) * head_dim, p->cos + r * head_dim, p->sin + r * head_dim,
               head_dim, 1.0f, p->keys + cache_offset + column * head_dim);
        for (int64_t i = 0; i < head_dim; i++)
            p->values[cache_offset + column * head_dim + i] = v[i];
    }
}

/* Pairs [begin, end): the group's q heads rotated, then attention over the row's columns. */
static void attend_pairs(void *arg, int64_t begin, int64_t end) {
    const attention_job *p = arg;
    const int64_t kv_heads = p->kv_heads, head_dim = p->head_dim, group = p->group;
    for (int64_t pair = begin; pair < end; pair++) {
        const int64_t r = pair / kv_heads, g = pair % kv_heads, sequence = r / p->tokens;
        const int64_t column = p->first_column + r % p->tokens;
        const float *row = p->qkv + r * p->qkv_width;
        const int64_t cache_offset = (sequence * kv_heads + g) * p->capacity * head_dim;
        float q[MAX_GROUP * MAX_HEAD_DIM];
        for (int64_t h = 0; h < group; h++)
            rotate(row + (g * group + h) * head_dim, p->cos + r * head_dim,
                   p->sin + r * head_dim, head_dim, p->scale, q + h * head_dim);
        attend_group(q, (int)group, p->keys + cache_offset, p->values + cache_offset,
                     column + 1, p->mask + sequence * p->width, head_dim,
                     p->out + r * p->heads * head_dim + g * group * head_dim);
    }
}

/* Rotates each row's q and k, writes every row's k and v into its cache column, then attends
 * (each row sees the columns the rows before it wrote): out [rows, heads head_dim]. */
int decode_attention(const float *qkv, int64_t rows, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, float scale, const float *cos,
                     const float *sin, float *keys, float *values, int64_t capacity,
                     int64_t first_column, const int64_t *mask, float *out) {
    const int64_t group = heads / kv_heads, width = first_column + tokens;
    if (tokens < 1 || rows % tokens || heads % kv_heads || group > MAX_GROUP ||
        head_dim > MAX_HEAD_DIM || head_dim % 8 || width > capacity)
        return -1;
    attention_job job = {qkv, tokens, heads, kv_heads, head_dim, group, width,
                         (heads + 2 * kv_heads) * head_dim, scale, cos, sin, keys, values,
                         capacity, first_column, mask, out};
    const int64_t pairs = rows * kv_heads;
    write_new_columns(&job, 0, pairs); /* a copy per pair: not worth a loop of the pool */
    if (pairs * width < PARALLEL_WORK) attend_pairs(&job, 0, pairs); /* too little to share */
    else work_pool_for(pairs, work_pool_chunk(pairs, 2), attend_pairs, &job);
    return 0;
}

/* ---- One decoder layer on 4-bit weights ---- */

typedef struct {
    const uint8_t *nibbles; /* q4_kernel.c's layout: [out, in / 2] */
    const float *d, *m;     /* [out, in / 32] */
    int64_t out_features, in_features;
} q4_weight;

typedef struct {
    q4_weight qkv, o, gate_up, down; /* q, k, v and gate, up side by side */
    const float *input_norm, *post_norm;
    float input_eps, post_eps, scale;
    int64_t heads, kv_heads, head_dim;
} llama_layer;

static int project(const q4_weight *w, const float *x, int64_t rows, float *y) {
    return q4_matmul(x, rows, w->in_features, w->nibbles, w->d, w->m, w->out_features, y);
}

/* hidden [rows, dim] becomes the layer's output in place:
 *   h += o(attention(rope(qkv(norm(h)))));  h += down(silu(gate(norm(h))) * up(norm(h))) */
int llama_layer_decode(const llama_layer *layer, float *hidden, int64_t rows, int64_t tokens,
                       const float *cos, const float *sin, float *keys, float *values,
                       int64_t capacity, int64_t first_column, const int64_t *mask) {
    const int64_t dim = layer->qkv.in_features, inter = layer->down.in_features;
    const int64_t attended_width = layer->heads * layer->head_dim;
    const int64_t per_row = 2 * dim + layer->qkv.out_features + attended_width +
                            layer->gate_up.out_features + inter;
    float *scratch = malloc(sizeof(float) * (size_t)(rows * per_row));
    if (!scratch) return -1;
    float *normed = scratch, *delta = normed + rows * dim, *qkv = delta + rows * dim;
    float *attended = qkv + rows * layer->qkv.out_features;
    float *gate_up = attended + rows * attended_width, *act = gate_up + rows * layer->gate_up.out_features;
    int status = 0;
    add_rms_norm(hidden, NULL, rows, dim, layer->input_norm, layer->input_eps, normed);
    status |= project(&layer->qkv, normed, rows, qkv);
    status |= decode_attention(qkv, rows, tokens, layer->heads, layer->kv_heads,
                               layer->head_dim, layer->scale, cos, sin, keys, values, capacity,
                               first_column, mask, attended);
    status |= project(&layer->o, attended, rows, delta);
    add_rms_norm(hidden, delta, rows, dim, layer->post_norm, layer->post_eps, normed);
    status |= project(&layer->gate_up, normed, rows, gate_up);
    silu_mul(gate_up, rows, inter, act);
    status |= project(&layer->down, act, rows, delta);
    for (int64_t i = 0; i < rows * dim; i++) hidden[i] += delta[i];
    free(scratch);
    return status ? -1 : 0;
}
