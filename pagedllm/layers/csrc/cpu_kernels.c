/* CPU kernels for pagedllm (x86-64 with AVX2, FMA and F16C), compiled at first use by
 * layers/cpu_kernels.py and called through ctypes. Matrices are row-major and contiguous;
 * every K is a multiple of 32.
 *
 * Quantized matrix products, in the manner of GGUF's integer dot products: the activations are
 * quantized to int8 in blocks of 32 (x = d * q, per block), the weights stay in their 4- or
 * 8-bit blocks, and each block's dot product is an integer one, scaled once:
 *
 *   q4 weights  w = d * q + m,  q in [0, 15]  (GGUF Q4_1; Q4_0 is m = -8 d)
 *               sum_j w_j x_j = d_w d_x sum_j q_j qx_j + m_w (d_x sum_j qx_j)
 *   q8 weights  w = d * q,      q in [-127, 127]  (GGUF Q8_0)
 *
 * Threads: OpenMP, the runtime torch's own kernels use (the library is loaded after torch,
 * so libgomp.so.1 resolves to torch's copy and torch.set_num_threads applies here too).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32

/* Work below this many block products runs on the calling thread: waking a sleeping OpenMP
 * thread costs more than it saves (pagedllm sets OMP_WAIT_POLICY=PASSIVE). */
#define PARALLEL_MIN_BLOCKS 8192

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

/* ---------------------------------------------------------------- activations -> int8 blocks */

/* x (n_blocks * 32 floats) -> q (int8), d (scale of each block), s (d * sum of the block's q). */
static void quantize_q8(const float *x, int64_t n_blocks, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + b * QK;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float max_abs = _mm_cvtss_f32(m);
        const float scale = max_abs / 127.0f;
        const __m256 inv = _mm256_set1_ps(max_abs != 0.0f ? 127.0f / max_abs : 0.0f);
        __m256i i32[4];
        __m256i total = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_ROUND_NEAREST));
            total = _mm256_add_epi32(total, i32[i]);
        }
        /* int32 -> int8 packs interleave the 128-bit lanes; the permutation restores the order. */
        __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]);
        __m256i i16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i i8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i16a, i16b), order);
        _mm256_storeu_si256((__m256i *)(q + b * QK), i8);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        d[b] = scale;
        s[b] = scale * (float)_mm_cvtsi128_si32(t);
    }
}

/* ---------------------------------------------------------------- block dot products */

/* 32 unsigned 4-bit values: byte j holds value j (low nibble) and j + 16 (high nibble). */
static inline __m256i nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* 8 int32 partial sums of u8 * s8 over 32 pairs, as floats. */
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* One output: the row's blocks against one token's blocks. */
static inline float row_q4(const uint8_t *qs, const uint16_t *dm, const int8_t *xq, const float *xd,
                           const float *xs, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const __m256 p = dot_u8s8(nibbles(qs + b * 16), _mm256_loadu_si256((const __m256i *)(xq + b * QK)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16(dm[2 * b]) * xd[b]), p, acc);
        mins += fp16(dm[2 * b + 1]) * xs[b];
    }
    return hsum(acc) + mins;
}

static inline float row_q8(const int8_t *qs, const uint16_t *dw, const int8_t *xq, const float *xd, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + b * QK));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        /* maddubs wants one unsigned operand: |w| * (x with w's sign). */
        const __m256 p = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16(dw[b]) * xd[b]), p, acc);
    }
    return hsum(acc);
}

/* Four tokens against one row: each weight block is unpacked once for all four. */
static inline void row_q4_x4(const uint8_t *qs, const uint16_t *dm, const int8_t *xq, const float *xd,
                             const float *xs, int64_t nb, int64_t K, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float mins[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = nibbles(qs + b * 16);
        const float d = fp16(dm[2 * b]), m = fp16(dm[2 * b + 1]);
        for (int i = 0; i < 4; i++) {
            const __m256 p = dot_u8s8(w, _mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK)));
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i * nb + b]), p, acc[i]);
            mins[i] += m * xs[i * nb + b];
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(acc[i]) + mins[i];
}

static inline void row_q8_x4(const int8_t *qs, const uint16_t *dw, const int8_t *xq, const float *xd,
                             int64_t nb, int64_t K, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + b * QK));
        const __m256i w_abs = _mm256_sign_epi8(w, w);
        const float d = fp16(dw[b]);
        for (int i = 0; i < 4; i++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * K + b * QK));
            const __m256 p = dot_u8s8(w_abs, _mm256_sign_epi8(x, w));
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i * nb + b]), p, acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(acc[i]);
}

/* ---------------------------------------------------------------- matrix products */

/* Rows are taken in tiles small enough to stay in cache while every token passes over them. */
#define ROW_TILE 16

/* The activations as int8 blocks: q (M * K), then d and s (M * K / 32 each). */
typedef struct {
    int8_t *q;
    float *d, *s;
} Q8;

static int quantize_rows(const float *x, int64_t M, int64_t K, Q8 *out) {
    const int64_t blocks = M * K / QK;
    out->q = malloc(M * K + 2 * blocks * sizeof(float));
    if (out->q == NULL) return -1;
    out->d = (float *)(out->q + M * K);
    out->s = out->d + blocks;
    quantize_q8(x, blocks, out->q, out->d, out->s);
    return 0;
}

/* y (M, N) = x (M, K) W^T with W (N, K) as q4 blocks: qs (N, K/32, 16) bytes, dm (N, K/32, 2)
 * fp16 [d, m]. Returns 0, or -1 if out of memory. */
int matmul_q4(const uint8_t *qs, const uint16_t *dm, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / QK;
    const int64_t tiles = (N + ROW_TILE - 1) / ROW_TILE;
    Q8 a;
    if (quantize_rows(x, M, K, &a)) return -1;
#pragma omp parallel for schedule(static) if (M * N * nb >= PARALLEL_MIN_BLOCKS)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t end = (t + 1) * ROW_TILE < N ? (t + 1) * ROW_TILE : N;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            for (int64_t n = t * ROW_TILE; n < end; n++) {
                float out[4];
                row_q4_x4(qs + n * nb * 16, dm + n * nb * 2, a.q + m * K, a.d + m * nb, a.s + m * nb, nb, K, out);
                for (int i = 0; i < 4; i++) y[(m + i) * N + n] = out[i];
            }
        }
        for (; m < M; m++) {
            for (int64_t n = t * ROW_TILE; n < end; n++) {
                y[m * N + n] = row_q4(qs + n * nb * 16, dm + n * nb * 2, a.q + m * K, a.d + m * nb, a.s + m * nb, nb);
            }
        }
    }
    free(a.q);
    return 0;
}

/* y (M, N) = x (M, K) W^T with W (N, K) as q8 blocks: qs (N, K) int8, d (N, K/32) fp16. */
int matmul_q8(const int8_t *qs, const uint16_t *d, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / QK;
    const int64_t tiles = (N + ROW_TILE - 1) / ROW_TILE;
    Q8 a;
    if (quantize_rows(x, M, K, &a)) return -1;
#pragma omp parallel for schedule(static) if (M * N * nb >= PARALLEL_MIN_BLOCKS)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t end = (t + 1) * ROW_TILE < N ? (t + 1) * ROW_TILE : N;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            for (int64_t n = t * ROW_TILE; n < end; n++) {
                float out[4];
                row_q8_x4(qs + n * K, d + n * nb, a.q + m * K, a.d + m * nb, nb, K, out);
                for (int i = 0; i < 4; i++) y[(m + i) * N + n] = out[i];
            }
        }
        for (; m < M; m++) {
            for (int64_t n = t * ROW_TILE; n < end; n++) {
                y[m * N + n] = row_q8(qs + n * K, d + n * nb, a.q + m * K, a.d + m * nb, nb);
            }
        }
    }
    free(a.q);
    return 0;
}
