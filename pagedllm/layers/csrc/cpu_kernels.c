/* CPU kernels for pagedllm (x86-64 with AVX2, FMA and F16C; the products use VNNI where the CPU
 * has it), compiled at first use by layers/cpu_kernels.py and called through ctypes. Float32 arithmetic throughout, on float32 or
 * bfloat16 activations (see number formats, below). Matrices are row-major;
 * a row stride is given where the rows may be a view into a wider tensor (q, k and v are column
 * slices of one qkv projection); every K of a quantized product is a multiple of 32.
 *
 * Two kinds: the quantized matrix products, and the elementwise work between them (RMSNorm with
 * the residual add, rotary, gated activations, the paged KV cache write and decode attention),
 * each one call instead of a chain of torch ops -- on a CPU, a decode step of a small model is
 * mostly the fixed cost of those ops, not their arithmetic.
 *
 * Quantized matrix products, in the manner of GGUF's integer dot products: the activations are
 * quantized to int8 in blocks of 32 (x = d * q, per block), the weights stay in their 4- or
 * 8-bit blocks (laid out in tiles of 8 rows, below), and each block's dot product is an integer
 * one, scaled once:
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
#include <string.h>
#include <omp.h>
#include <sched.h>

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

/* ---------------------------------------------------------------- number formats
 *
 * Activations are float32 or bfloat16 (a bfloat16 model's), KV caches float32, float16 or
 * bfloat16. Every kernel computes in float32: it widens what it loads and rounds to nearest even
 * where it stores (as torch rounds). A bfloat16 is the upper half of a float32, so widening one is
 * a 16-bit shift, and AVX2 is enough for all of it. The type is a constant at each call of the
 * always-inline loops below, so the float32 loops compile to what they were before bfloat16. */
enum { F32 = 0, F16 = 1, BF16 = 2 };

static inline int64_t type_size(int t) { return t == F32 ? 4 : 2; }

/* Element i of an array of type t. */
static inline void *element(const void *p, int64_t i, int t) { return (char *)p + i * type_size(t); }

static inline __m256 bf16x8_to_f32(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Round to nearest even (torch's rule; NaN -> 0x7FC0): add 0x7FFF and the kept part's last bit. */
static inline __m128i f32x8_to_bf16(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    r = _mm256_srli_epi32(r, 16); /* < 2^16: the unsigned-saturating pack keeps it */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* 8 values at p of type t, as floats; one value, element i. */
static inline __m256 load8(const void *p, int t) {
    if (t == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (t == BF16) return bf16x8_to_f32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_ps((const float *)p);
}

static inline float load1(const void *p, int64_t i, int t) {
    if (t == F16) return _cvtsh_ss(((const uint16_t *)p)[i]);
    if (t == BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline void store8(void *p, __m256 v, int t) {
    if (t == F16) {
        _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else if (t == BF16) {
        _mm_storeu_si128((__m128i *)p, f32x8_to_bf16(v));
    } else {
        _mm256_storeu_ps((float *)p, v);
    }
}

static inline void store1(void *p, int64_t i, float v, int t) {
    if (t == F16) {
        ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else if (t == BF16) {
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    } else {
        ((float *)p)[i] = v;
    }
}

/* v rounded to type t (and widened back): where torch's code of a bfloat16 model stores an
 * intermediate result, the kernel rounds it too. */
static inline __m256 round8(__m256 v, int t) { return t == BF16 ? bf16x8_to_f32(f32x8_to_bf16(v)) : v; }

static inline float round1(float v, int t) { return t == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

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

/* ---------------------------------------------------------------- matrix products
 *
 * The weights are laid out for the products at load (layers/cpu_kernels.py, Tiles): rows in
 * groups of 8 (the last one zero-padded), and within a group each block's bytes interleaved four
 * at a time, so that one 32-byte vector holds four consecutive inputs' values of 8 rows:
 *
 *   q4  per group and block: 128 bytes, vector j (0..3) = each row's block bytes 4j..4j+3 (low
 *       nibbles: values 4j..4j+3, high nibbles: values 16+4j..16+4j+3); 16 fp16 scales: the 8
 *       rows' d, then their m
 *   q8  per group and block: 256 bytes, vector j (0..7) = each row's values 4j..4j+3; 8 fp16 d
 *
 * One vpmaddubsw of such a vector against a token's four int8 values (broadcast) gives the 8 rows'
 * partial dot products in the register's lanes, so a block's sums for 8 rows and a token stay in
 * one register, are converted and scaled once a block, and are stored 8 outputs at a time --
 * rather than a horizontal sum and a scalar scale per row, block and token. A tile is 16 rows (two
 * groups) by up to 4 tokens: each token's four values are broadcast once for both groups, and the
 * 8 integer sums stay in registers with the operands (16 x 4 measured 8-20% faster than 8 x 6 on a
 * 2-core Zen 3, 64 and 512 tokens). The 8 float accumulators live in memory (L1), loaded and
 * stored once a block: 16 of them in registers beside the sums spilled the sums instead, on every
 * product (llvm-mca, znver3: 106 -> 69 cycles a block of a 16 x 4 tile; 1.4-1.6x measured). The
 * sums are added in the source's order (an empty asm pins each): reassociated into a tree, all of
 * a block's products would be live at once. */

#define TILE_TOKENS 4
#define TILE_GROUPS 2

/* Where the CPU has VNNI (AVX512-VNNI with AVX512VL, or AVX-VNNI; layers/cpu_kernels.py picks the
 * flags), vpdpbusd adds each lane's four unsigned x signed byte products straight into an int32
 * sum: one instruction for vpmaddubsw and the additions after it. Q8 weights are signed, so the
 * activations come unsigned, as x + 128, and 128 times the weights' block sums (vpdpbusd on ones,
 * once for all tokens) is taken off: no sign trick per token (Q8 LM head 326 -> 477 GFLOP/s on a
 * 2-core Zen 4). The integer sums are the same (no int16 lane saturates either way), so the outputs
 * are the same bits. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
static inline __m256i dot_add(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(sum, u, s); }
#elif defined(__AVXVNNI__)
#define VNNI 1
static inline __m256i dot_add(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(sum, u, s); }
#else
#define VNNI 0
#endif
/* Tokens whose int8 activations (96 x K bytes) stay in L2 while every row group passes over them. */
#define TOKEN_CHUNK 96

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

/* Four int8 values of a token (bytes x[0..3]) in every 32-bit lane. */
static inline __m256i quad(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* acc (8 outputs of which `rows` are real) -> y. */
static inline void store_rows(float *y, __m256 acc, int rows) {
    if (rows == 8) {
        _mm256_storeu_ps(y, acc);
    } else {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_maskstore_ps(y, _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), lane), acc);
    }
}

/* Where a tile is: its first group's weights and scales, the strides to the next group, the
 * token it starts at and its outputs; rows: the real rows of its last group. */
typedef struct {
    const void *w;
    const uint16_t *scales;
    int64_t group_bytes, group_scales, m, nb, K, N;
    float *y;
    int rows;
} Tile;

/* y[T tokens, 8 G rows] of the tile, G groups of q4 weights. */
static inline __attribute__((always_inline)) void tile_q4(const int T, const int G, const Tile *tl, const Q8 *a) {
    const int64_t nb = tl->nb, K = tl->K;
    const int8_t *xq = a->q + tl->m * K;
    const float *xd = a->d + tl->m * nb, *xs = a->s + tl->m * nb;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    float acc[TILE_TOKENS][TILE_GROUPS][8] __attribute__((aligned(32)));  /* in memory (above) */
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) _mm256_store_ps(acc[t][g], _mm256_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {
        /* int16 lanes (int32 with VNNI): each sums 16 products of at most 15 * 127, so never overflows. */
        __m256i sum[TILE_TOKENS][TILE_GROUPS];
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) sum[t][g] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i lo[TILE_GROUPS], hi[TILE_GROUPS];
            for (int g = 0; g < G; g++) {
                const uint8_t *w = (const uint8_t *)tl->w + g * tl->group_bytes + b * 128 + 32 * j;
                const __m256i v = _mm256_loadu_si256((const __m256i *)w);
                lo[g] = _mm256_and_si256(v, low);
                hi[g] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            for (int t = 0; t < T; t++) {
                const int8_t *x = xq + t * K + b * QK + 4 * j;
                const __m256i x_lo = quad(x), x_hi = quad(x + 16);
                for (int g = 0; g < G; g++) {
#if VNNI
                    sum[t][g] = dot_add(dot_add(sum[t][g], lo[g], x_lo), hi[g], x_hi);
#else
                    sum[t][g] = _mm256_add_epi16(sum[t][g], _mm256_maddubs_epi16(lo[g], x_lo));
                    sum[t][g] = _mm256_add_epi16(sum[t][g], _mm256_maddubs_epi16(hi[g], x_hi));
#endif
                    __asm__("" : "+x"(sum[t][g]));  /* in this order (above) */
                }
            }
        }
        for (int g = 0; g < G; g++) {
            const uint16_t *dm = tl->scales + g * tl->group_scales + b * 16;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
            const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + 8)));
            for (int t = 0; t < T; t++) {
                const __m256 dot = _mm256_cvtepi32_ps(VNNI ? sum[t][g] : _mm256_madd_epi16(sum[t][g], ones));
                __m256 r = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_set1_ps(xd[t * nb + b])), d, _mm256_load_ps(acc[t][g]));
                _mm256_store_ps(acc[t][g], _mm256_fmadd_ps(mins, _mm256_set1_ps(xs[t * nb + b]), r));
            }
        }
        __asm__ volatile("" ::: "memory");  /* acc stays in memory (above) */
    }
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) store_rows(tl->y + t * tl->N + 8 * g, _mm256_load_ps(acc[t][g]), g == G - 1 ? tl->rows : 8);
}

static inline __attribute__((always_inline)) void tile_q8(const int T, const int G, const Tile *tl, const Q8 *a) {
    const int64_t nb = tl->nb, K = tl->K;
    const int8_t *xq = a->q + tl->m * K;
    const float *xd = a->d + tl->m * nb;
    float acc[TILE_TOKENS][TILE_GROUPS][8] __attribute__((aligned(32)));  /* in memory (above) */
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) _mm256_store_ps(acc[t][g], _mm256_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {
        __m256i sum[TILE_TOKENS][TILE_GROUPS];
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) sum[t][g] = _mm256_setzero_si256();
#if VNNI
        __m256i w_sum[TILE_GROUPS];
        for (int g = 0; g < G; g++) w_sum[g] = _mm256_setzero_si256();
#endif
        for (int j = 0; j < 8; j++) {
            __m256i v[TILE_GROUPS];
#if !VNNI
            __m256i v_abs[TILE_GROUPS];
#endif
            for (int g = 0; g < G; g++) {
                const int8_t *w = (const int8_t *)tl->w + g * tl->group_bytes + b * 256 + 32 * j;
                v[g] = _mm256_loadu_si256((const __m256i *)w);
#if VNNI
                w_sum[g] = dot_add(w_sum[g], _mm256_set1_epi8(1), v[g]);
#else
                v_abs[g] = _mm256_abs_epi8(v[g]);
#endif
            }
            for (int t = 0; t < T; t++) {
                const __m256i x = quad(xq + t * K + b * QK + 4 * j);
                for (int g = 0; g < G; g++) {
#if VNNI
                    /* x comes as x + 128, unsigned (matmul_tiles): sum (x + 128) w, less 128 sum w below */
                    sum[t][g] = dot_add(sum[t][g], x, v[g]);
#else
                    /* vpmaddubsw wants one unsigned operand: |w| * (x with w's sign). Two products
                     * of 127 * 127 fill an int16, so each pair is widened to int32 at once. */
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(v_abs[g], _mm256_sign_epi8(x, v[g])),
                                                        _mm256_set1_epi16(1));
                    sum[t][g] = _mm256_add_epi32(sum[t][g], p);
#endif
                    __asm__("" : "+x"(sum[t][g]));  /* in this order (above) */
                }
            }
        }
        for (int g = 0; g < G; g++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tl->scales + g * tl->group_scales + b * 8)));
            for (int t = 0; t < T; t++) {
#if VNNI
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[t][g], _mm256_slli_epi32(w_sum[g], 7)));
#else
                const __m256 dot = _mm256_cvtepi32_ps(sum[t][g]);
#endif
                _mm256_store_ps(acc[t][g], _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_set1_ps(xd[t * nb + b])), d, _mm256_load_ps(acc[t][g])));
            }
        }
        __asm__ volatile("" ::: "memory");  /* acc stays in memory (above) */
    }
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) store_rows(tl->y + t * tl->N + 8 * g, _mm256_load_ps(acc[t][g]), g == G - 1 ? tl->rows : 8);
}

/* bits, T and G are constants at each call: the compiler keeps one loop per kind and shape. */
static inline __attribute__((always_inline)) void tile(int bits, int T, int G, const Tile *tl, const Q8 *a) {
    if (bits == 4) {
        tile_q4(T, G, tl, a);
    } else {
        tile_q8(T, G, tl, a);
    }
}

/* Tokens [m, end) against G groups (1 or 2) starting at tl's. */
static inline __attribute__((always_inline)) void tiles_over_tokens(int bits, int G, Tile tl, int64_t end, const Q8 *a) {
    float *y = tl.y;
    for (; tl.m + TILE_TOKENS <= end; tl.m += TILE_TOKENS) {
        tl.y = y + tl.m * tl.N;
        tile(bits, TILE_TOKENS, G, &tl, a);
    }
    tl.y = y + tl.m * tl.N;
    switch (end - tl.m) {
    case 3: tile(bits, 3, G, &tl, a); break;
    case 2: tile(bits, 2, G, &tl, a); break;
    case 1: tile(bits, 1, G, &tl, a); break;
    }
}

/* Pair p of row groups (16 rows; 8 for a last odd group) of y (M, N) = x W^T, tokens [chunk, end). */
static inline __attribute__((always_inline)) void product_pair(int bits, const void *qs, const uint16_t *scales,
                                                               const Q8 *a, float *y, int64_t N, int64_t K,
                                                               int64_t chunk, int64_t end, int64_t p) {
    const int64_t nb = K / QK, groups = (N + 7) / 8, g = 2 * p;
    const int64_t group_bytes = nb * (bits == 4 ? 128 : 256), group_scales = nb * (bits == 4 ? 16 : 8);
    const int last = g + 1 < groups ? (int)g + 1 : (int)g;
    const Tile tl = {(const uint8_t *)qs + g * group_bytes, scales + g * group_scales, group_bytes, group_scales,
                     chunk, nb, K, N, y + 8 * g, N - 8 * last < 8 ? (int)(N - 8 * last) : 8};
    if (last > g) {
        tiles_over_tokens(bits, 2, tl, end, a);
    } else {
        tiles_over_tokens(bits, 1, tl, end, a);
    }
}

static inline int64_t pairs_of(int64_t N) { return ((N + 7) / 8 + 1) / 2; }

/* y (M, N) = x (M, K) W^T, W as q4 or q8 tiles; bits 4 or 8. Returns 0, or -1 if out of memory. */
static inline int matmul_tiles(int bits, const void *qs, const uint16_t *scales, const float *x, float *y, int64_t M,
                               int64_t N, int64_t K) {
    const int64_t pairs = pairs_of(N);
    Q8 a;
    if (quantize_rows(x, M, K, &a)) return -1;
    if (VNNI && bits == 8) /* vpdpbusd's unsigned operand: x + 128 (tile_q8) */
        for (int64_t i = 0; i < M * K; i += 32)
            _mm256_storeu_si256((__m256i *)(a.q + i), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a.q + i)), _mm256_set1_epi8((char)0x80)));
    /* Every thread meets the same chunks, and takes pairs of each as it comes (guided, no wait): a
     * worker woken late from its passive wait takes fewer, rather than the caller waiting for it at
     * the end. Each output is one tile's, so the results do not depend on who computed them. */
#pragma omp parallel if (M * N * (K / QK) >= PARALLEL_MIN_BLOCKS)
    for (int64_t chunk = 0; chunk < M; chunk += TOKEN_CHUNK) {
        const int64_t end = chunk + TOKEN_CHUNK < M ? chunk + TOKEN_CHUNK : M;
#pragma omp for schedule(guided) nowait
        for (int64_t p = 0; p < pairs; p++) product_pair(bits, qs, scales, &a, y, N, K, chunk, end, p);
    }
    free(a.q);
    return 0;
}

int matmul_q4(const uint8_t *qs, const uint16_t *dm, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    return matmul_tiles(4, qs, dm, x, y, M, N, K);
}

int matmul_q8(const int8_t *qs, const uint16_t *d, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    return matmul_tiles(8, qs, d, x, y, M, N, K);
}

/* ---------------------------------------------------------------- elementwise */

/* e^x for 8 floats, to ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_ROUND_NEAREST);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* out = x * rsqrt(mean(x^2) + eps) * w over rows of `hidden`; with a residual, x + residual
 * first, stored to res_out (which may be the residual itself). Everything of type t; in bfloat16
 * rounded where torch's code rounds: the sum, the normalized x, the product with w. */
static inline __attribute__((always_inline)) void rms_norm_t(const void *x, int64_t x_stride, const void *residual,
                                                             int64_t res_stride, const void *w, float eps, void *out,
                                                             void *res_out, int64_t rows, int64_t hidden, int t) {
    for (int64_t r = 0; r < rows; r++) {
        const void *xr = element(x, r * x_stride, t), *rr = residual ? element(residual, r * res_stride, t) : NULL;
        void *o = element(out, r * hidden, t), *s = residual ? element(res_out, r * hidden, t) : NULL;
        __m256 sq = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= hidden; i += 8) {
            __m256 v = load8(element(xr, i, t), t);
            if (residual) {
                v = round8(_mm256_add_ps(v, load8(element(rr, i, t), t)), t);
                store8(element(s, i, t), v, t);
            }
            sq = _mm256_fmadd_ps(v, v, sq);
        }
        float total = hsum(sq);
        for (; i < hidden; i++) {
            float v = load1(xr, i, t);
            if (residual) store1(s, i, v = round1(v + load1(rr, i, t), t), t);
            total += v * v;
        }
        const void *src = residual ? s : xr;
        const float inv = 1.0f / sqrtf(total / (float)hidden + eps);
        const __m256 scale = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= hidden; i += 8) {
            const __m256 v = round8(_mm256_mul_ps(load8(element(src, i, t), t), scale), t);
            store8(element(o, i, t), _mm256_mul_ps(v, load8(element(w, i, t), t)), t);
        }
        for (; i < hidden; i++) store1(o, i, round1(load1(src, i, t) * inv, t) * load1(w, i, t), t);
    }
}

void rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride, const void *w, float eps,
              void *out, void *res_out, int64_t rows, int64_t hidden, int type) {
    if (type == BF16) {
        rms_norm_t(x, x_stride, residual, res_stride, w, eps, out, res_out, rows, hidden, BF16);
    } else {
        rms_norm_t(x, x_stride, residual, res_stride, w, eps, out, res_out, rows, hidden, F32);
    }
}

/* act 0: silu(v) = v / (1 + e^-v); act 1: gelu, tanh approximation: v / 2 (1 + tanh(y)) =
 * v / (1 + e^-2y), y = sqrt(2 / pi) (v + 0.044715 v^3). */
static inline __m256 act8(__m256 v, int act) {
    __m256 e;
    if (act == 0) {
        e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
    } else {
        const __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), _mm256_mul_ps(_mm256_mul_ps(v, v), v), v);
        e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f * 0.7978845608f), y));
    }
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* x = [gate | up] (rows, 2 width), rows x_stride apart -> out (rows, width) = act(gate) * up, of
 * type t; in bfloat16 act(gate) is rounded before the product, as torch's code rounds it. */
static inline __attribute__((always_inline)) void act_and_mul_t(const void *x, int64_t x_stride, void *out, int64_t rows,
                                                                int64_t width, int act, int t) {
    for (int64_t r = 0; r < rows; r++) {
        const void *g = element(x, r * x_stride, t), *u = element(g, width, t);
        void *o = element(out, r * width, t);
        int64_t i = 0;
        for (; i + 8 <= width; i += 8) {
            const __m256 a = round8(act8(load8(element(g, i, t), t), act), t);
            store8(element(o, i, t), _mm256_mul_ps(a, load8(element(u, i, t), t)), t);
        }
        if (i < width) { /* the tail, through a zero-padded vector */
            float gt[8] = {0}, at[8];
            for (int64_t j = i; j < width; j++) gt[j - i] = load1(g, j, t);
            _mm256_storeu_ps(at, act8(_mm256_loadu_ps(gt), act));
            for (int64_t j = i; j < width; j++) store1(o, j, round1(at[j - i], t) * load1(u, j, t), t);
        }
    }
}

void act_and_mul(const void *x, int64_t x_stride, void *out, int64_t rows, int64_t width, int act, int type) {
    if (type == BF16) {
        act_and_mul_t(x, x_stride, out, rows, width, act, BF16);
    } else {
        act_and_mul_t(x, x_stride, out, rows, width, act, F32);
    }
}

/* Rotate x (tokens, heads, dim) of type t in place ("rotate half": [x1 | x2] -> [x1 c - x2 s |
 * x2 c + x1 s]), token t by row positions[t] of cos_sin (max_position, dim) = [cos | sin], float32;
 * in float32, rounded once to t. Heads are dim apart inside a token's row; rows are x_stride apart. */
static inline __attribute__((always_inline)) void rotary_t(void *x, int64_t x_stride, int64_t tokens, int64_t heads,
                                                           int64_t dim, const int64_t *positions, const float *cos_sin,
                                                           int t) {
    const int64_t half = dim / 2;
    for (int64_t tok = 0; tok < tokens; tok++) {
        const float *c = cos_sin + positions[tok] * dim, *sn = c + half;
        for (int64_t h = 0; h < heads; h++) {
            void *x1 = element(x, tok * x_stride + h * dim, t), *x2 = element(x1, half, t);
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                const __m256 a = load8(element(x1, i, t), t), b = load8(element(x2, i, t), t);
                const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(sn + i);
                store8(element(x1, i, t), _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)), t);
                store8(element(x2, i, t), _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)), t);
            }
            for (; i < half; i++) {
                const float a = load1(x1, i, t), b = load1(x2, i, t);
                store1(x1, i, a * c[i] - b * sn[i], t);
                store1(x2, i, b * c[i] + a * sn[i], t);
            }
        }
    }
}

void rotary(void *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t dim, const int64_t *positions,
            const float *cos_sin, int type) {
    if (type == BF16) {
        rotary_t(x, x_stride, tokens, heads, dim, positions, cos_sin, BF16);
    } else {
        rotary_t(x, x_stride, tokens, heads, dim, positions, cos_sin, F32);
    }
}

/* ---------------------------------------------------------------- paged KV cache */

/* n values of type a at src to dst as type c (rounded to it). */
static inline void store_row(void *dst, const void *src, int64_t n, int a, int c) {
    if (a == c) {
        memcpy(dst, src, n * type_size(c));
        return;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(element(dst, i, c), load8(element(src, i, a), a), c);
    for (; i < n; i++) store1(dst, i, load1(src, i, a), c);
}

/* Token t's key and value rows (row values each, of act_type; rows k_stride / v_stride apart) to
 * cache slot slots[t] of k_cache / v_cache (num_slots, row) of cache_type, rounded to it; a slot
 * of -1 (padding) is skipped. */
void write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
              const int64_t *slots, int64_t tokens, int64_t row, int act_type, int cache_type) {
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        store_row(element(k_cache, slots[t] * row, cache_type), element(k, t * k_stride, act_type), row, act_type, cache_type);
        store_row(element(v_cache, slots[t] * row, cache_type), element(v, t * v_stride, act_type), row, act_type, cache_type);
    }
}

/* ---------------------------------------------------------------- paged attention
 *
 * A query row attends over its context in pieces: the positions between consecutive multiples of
 * PIECE (a piece may span cache blocks), clipped to the row's own context. For each piece and kv
 * head, the query heads that share the kv head (up to three at a time) are scored, softmaxed and
 * accumulated together: each cached key or value vector is loaded and converted once for all of
 * them. A score is a chain of fused multiply-adds over the dimensions in eight lanes, reduced in a
 * fixed tree; an output column a chain over the piece's keys in order. The pieces are fixed by
 * position, so a row's result is the same float operations whatever rows it is computed with,
 * however its prompt was cut, and whatever the block size. */

#define PIECE 64
#define MAX_HEADS 3 /* query heads taken together (their accumulators fill the 16 vector registers) */

/* The positions [from, to) of the sequence (block table `table`) a thread will likely attend next:
 * its first piece is fetched during the last piece of the current one. */
typedef struct {
    const int32_t *table;
    int64_t from, to;
} Then;

/* The next piece's cache rows on their way to L2, `per` lines at a time between the current
 * piece's loads: a burst of hundreds of prefetches stalls the core until most have arrived. */
typedef struct {
    const char *rows[2 * PIECE]; /* K and V rows of the next piece's positions, all kv heads */
    int64_t n, bytes, j, b, per;   /* rows, bytes a row, cursor (row, byte), lines per call */
} Ahead;

static inline void ahead_step(Ahead *a) {
    for (int64_t k = 0; k < a->per && a->j < a->n; k++) {
        _mm_prefetch(a->rows[a->j] + a->b, _MM_HINT_T1);
        if ((a->b += 64) >= a->bytes) { a->b = 0; a->j++; }
    }
}

/* s[h * PIECE + i] = scale q_h . k_i for G query heads (q, dim apart) and n keys (pointers, of
 * cache type ct), four keys at a time. */
static inline __attribute__((always_inline)) void score_heads(const int G, const float *q, int64_t dim, const void *const *k,
                                                              int64_t n, float scale, float *s, int ct, Ahead *ahead) {
    for (int64_t i0 = 0; i0 < n; i0 += 4) {
        ahead_step(ahead);
        const void *kj[4];
        for (int j = 0; j < 4; j++) kj[j] = k[i0 + j < n ? i0 + j : n - 1];
        __m256 a[MAX_HEADS][4];
        for (int h = 0; h < G; h++)
            for (int j = 0; j < 4; j++) a[h][j] = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8) {
            __m256 qv[MAX_HEADS];
            for (int h = 0; h < G; h++) qv[h] = _mm256_loadu_ps(q + h * dim + d);
            for (int j = 0; j < 4; j++) {
                const __m256 kv = load8(element(kj[j], d, ct), ct);
                for (int h = 0; h < G; h++) a[h][j] = _mm256_fmadd_ps(qv[h], kv, a[h][j]);
            }
        }
        for (int h = 0; h < G; h++) {
            const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
            const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
            if (d == dim && i0 + 4 <= n) { /* the usual case: four whole scores */
                _mm_storeu_ps(s + h * PIECE + i0, _mm_mul_ps(s4, _mm_set1_ps(scale)));
                continue;
            }
            float f4[4];
            _mm_storeu_ps(f4, s4);
            for (int j = 0; j < 4 && i0 + j < n; j++) {
                for (int64_t e = d; e < dim; e++) f4[j] += q[h * dim + e] * load1(kj[j], e, ct);
                s[h * PIECE + i0 + j] = f4[j] * scale;
            }
        }
    }
}

/* Softmax step of the online softmax: p = exp(s - new max) in place over n scores; the running
 * maximum and sum are updated and the output rescaled to the new maximum. */
static void softmax_chunk(float *sc, int64_t n, float *top, float *total, float *o, int64_t dim) {
    int64_t i = 0;
    __m256 mv = _mm256_set1_ps(*top);
    for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sc + i));
    float lanes[8], m = *top;
    _mm256_storeu_ps(lanes, mv);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < n; i++) m = sc[i] > m ? sc[i] : m;
    const float c = expf(*top - m);
    __m256 sum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), _mm256_set1_ps(m)));
        _mm256_storeu_ps(sc + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    float s = hsum(sum);
    for (; i < n; i++) s += (sc[i] = expf(sc[i] - m));
    *total = *total * c + s;
    *top = m;
    if (c != 1.0f)
        for (int64_t d = 0; d < dim; d++) o[d] *= c;
}

/* o_h += sum_i p[h * PIECE + i] v_i for G heads (o, dim apart) over n value vectors (pointers, of
 * cache type ct), 32 columns at a time held in registers. */
static inline __attribute__((always_inline)) void accumulate_heads(const int G, const float *p, const void *const *v,
                                                                   int64_t n, float *o, int64_t dim, int ct) {
    int64_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        __m256 acc[MAX_HEADS][4];
        for (int h = 0; h < G; h++)
            for (int c = 0; c < 4; c++) acc[h][c] = _mm256_loadu_ps(o + h * dim + d + 8 * c);
        for (int64_t i = 0; i < n; i++) {
            __m256 pv[MAX_HEADS];
            for (int h = 0; h < G; h++) pv[h] = _mm256_set1_ps(p[h * PIECE + i]);
            for (int c = 0; c < 4; c++) {
                const __m256 vv = load8(element(v[i], d + 8 * c, ct), ct);
                for (int h = 0; h < G; h++) acc[h][c] = _mm256_fmadd_ps(pv[h], vv, acc[h][c]);
            }
        }
        for (int h = 0; h < G; h++)
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(o + h * dim + d + 8 * c, acc[h][c]);
    }
    for (; d + 8 <= dim; d += 8)
        for (int h = 0; h < G; h++) {
            __m256 acc = _mm256_loadu_ps(o + h * dim + d);
            for (int64_t i = 0; i < n; i++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p[h * PIECE + i]), load8(element(v[i], d, ct), ct), acc);
            _mm256_storeu_ps(o + h * dim + d, acc);
        }
    for (; d < dim; d++)
        for (int h = 0; h < G; h++)
            for (int64_t i = 0; i < n; i++) o[h * dim + d] += p[h * PIECE + i] * load1(v[i], d, ct);
}

/* G query heads of one row over n keys and values: score, online softmax, accumulate. */
static inline __attribute__((always_inline)) void attend_heads(const int G, const float *q, const void *const *k,
                                                               const void *const *v, int64_t n, int64_t dim, float scale,
                                                               float *top, float *total, float *o, float *scores, int ct,
                                                               Ahead *ahead) {
    score_heads(G, q, dim, k, n, scale, scores, ct, ahead);
    for (int h = 0; h < G; h++) softmax_chunk(scores + h * PIECE, n, top + h, total + h, o + h * dim, dim);
    accumulate_heads(G, scores, v, n, o, dim, ct);
}

#define ROW_TILE 16 /* query rows of one sequence that share each piece while it is in cache */

/* rows[i]: the cache row (of num_blocks * block_size) of position t0 + i, i < n, of a sequence
 * with block table `table` -- one division a piece, not two a position (block_size is not a
 * constant, and a 64-bit division costs tens of cycles). */
static inline void cache_rows(const int32_t *table, int64_t block_size, int64_t t0, int64_t n, int64_t *rows) {
    int64_t block = t0 / block_size, offset = t0 % block_size;
    for (int64_t i = 0; i < n; i++) {
        rows[i] = (int64_t)table[block] * block_size + offset;
        if (++offset == block_size) { offset = 0; block++; }
    }
}

/* Floats of attend's scratch for `heads` query heads. */
static inline int64_t attend_scratch(int64_t heads) { return MAX_HEADS * PIECE + 2 * ROW_TILE * heads; }

/* Query rows [0, rows) of one sequence, heads of kv heads [g0, g1): row r attends over the first
 * len0 + r cached tokens (the last `window` of them if window > 0). q rows q_stride apart, out
 * rows out_stride apart; scratch: attend_scratch floats. */
static inline __attribute__((always_inline)) void attend(const float *q, int64_t q_stride, int64_t rows, int64_t len0,
                                                         int64_t window, int64_t group, int64_t dim, const void *k_cache,
                                                         const void *v_cache, const int32_t *table, int64_t kv_heads,
                                                         int64_t g0, int64_t g1, int64_t block_size, float scale,
                                                         float *out, int64_t out_stride, float *scratch, const Then *then,
                                                         int ct) {
    const int64_t heads = (g1 - g0) * group, end = len0 + rows - 1;
    /* heads taken together: three, two or one at a time, whichever divides the group */
    const int64_t step = group % 3 == 0 ? 3 : group % 2 == 0 ? 2 : 1;
    float *scores = scratch, *top = scores + MAX_HEADS * PIECE, *total = top + rows * heads;
    int64_t slot[PIECE];
    const void *kp[PIECE], *vp[PIECE];
    for (int64_t i = 0; i < rows * heads; i++) { top[i] = -INFINITY; total[i] = 0.0f; }
    for (int64_t r = 0; r < rows; r++) memset(out + r * out_stride, 0, heads * dim * sizeof(float));
    for (int64_t t0 = window > 0 && len0 > window ? len0 - window : 0; t0 < end;) {
        const int64_t n = PIECE - t0 % PIECE < end - t0 ? PIECE - t0 % PIECE : end - t0;
        cache_rows(table, block_size, t0, n, slot);
        for (int64_t i = 0; i < n; i++) slot[i] *= kv_heads * dim;
        /* the next piece's keys and values (of kv heads [g0, g1)) on their way to L2 while this one
         * is computed, spread evenly over the score passes: (g1 - g0) of them, (n + 3) / 4 key
         * quads each. A share in one burst before each pass was 1.4x slower from memory, and
         * leaving each sequence's first piece to the hardware another 1.35x
         * (scripts/cpu_decode_attention_bench.py: 1.14 -> 0.81 -> 0.60 ms a layer). */
        Then after = {table, t0 + n, end}; /* after the last piece: the first of the next sequence */
        if (after.from == end && then != NULL) after = *then;
        const int64_t room = PIECE - after.from % PIECE, next = after.to - after.from < room ? after.to - after.from : room;
        int64_t at[PIECE];
        cache_rows(after.table, block_size, after.from, next, at);
        Ahead ahead = {.n = 2 * next, .bytes = (g1 - g0) * dim * type_size(ct)};
        for (int64_t i = 0; i < next; i++) {
            ahead.rows[2 * i] = element(k_cache, at[i] * kv_heads * dim + g0 * dim, ct);
            ahead.rows[2 * i + 1] = element(v_cache, at[i] * kv_heads * dim + g0 * dim, ct);
        }
        const int64_t lines = ahead.n * ((ahead.bytes + 63) / 64), calls = (g1 - g0) * ((n + 3) / 4);
        ahead.per = (lines + calls - 1) / calls;
        for (int64_t g = g0; g < g1; g++) {
            for (int64_t i = 0; i < n; i++) {
                kp[i] = element(k_cache, slot[i] + g * dim, ct);
                vp[i] = element(v_cache, slot[i] + g * dim, ct);
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t len = len0 + r, start = window > 0 && len > window ? len - window : 0;
                const int64_t from = t0 > start ? t0 : start, to = t0 + n < len ? t0 + n : len;
                if (from >= to) continue;
                for (int64_t h = (g - g0) * group; h < (g - g0 + 1) * group; h += step) {
                    const float *qh = q + r * q_stride + h * dim;
                    float *o = out + r * out_stride + h * dim, *tp = top + r * heads + h, *tt = total + r * heads + h;
                    const void *const *k = kp + (from - t0), *const *v = vp + (from - t0);
                    if (step == 3) {
                        attend_heads(3, qh, k, v, to - from, dim, scale, tp, tt, o, scores, ct, &ahead);
                    } else if (step == 2) {
                        attend_heads(2, qh, k, v, to - from, dim, scale, tp, tt, o, scores, ct, &ahead);
                    } else {
                        attend_heads(1, qh, k, v, to - from, dim, scale, tp, tt, o, scores, ct, &ahead);
                    }
                }
            }
        }
        t0 += n;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const float inv = 1.0f / total[r * heads + h];
            for (int64_t d = 0; d < dim; d++) out[r * out_stride + h * dim + d] *= inv;
        }
}

/* attend() with the cache type a constant in each of its loops. */
static void attend_ct(const float *q, int64_t q_stride, int64_t rows, int64_t len0, int64_t window, int64_t group,
                      int64_t dim, const void *k_cache, const void *v_cache, const int32_t *table, int64_t kv_heads,
                      int64_t g0, int64_t g1, int64_t block_size, float scale, float *out, int64_t out_stride,
                      float *scratch, const Then *then, int ct) {
    switch (ct) {
    case F16:
        attend(q, q_stride, rows, len0, window, group, dim, k_cache, v_cache, table, kv_heads, g0, g1, block_size, scale,
               out, out_stride, scratch, then, F16);
        break;
    case BF16:
        attend(q, q_stride, rows, len0, window, group, dim, k_cache, v_cache, table, kv_heads, g0, g1, block_size, scale,
               out, out_stride, scratch, then, BF16);
        break;
    default:
        attend(q, q_stride, rows, len0, window, group, dim, k_cache, v_cache, table, kv_heads, g0, g1, block_size, scale,
               out, out_stride, scratch, then, F32);
    }
}

/* Attention tasks are up to ROW_TILE rows of one sequence with all its kv heads (each block read
 * whole), or with one kv head each (split = kv_heads) when there are too few to keep every thread busy. */
static inline int64_t attention_split(int64_t tiles, int64_t kv_heads) {
    return tiles < 4 * omp_get_max_threads() ? kv_heads : 1;
}

/* paged_attention (below) of float32 queries and outputs. */
static int paged_attention_f32(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                               const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                               const int32_t *query_start, int64_t num_seqs, int64_t H, int64_t kv_heads, int64_t dim,
                               int64_t block_size, float scale, int64_t window, float *out, int ct) {
    const int64_t group = H / kv_heads;
    int64_t tiles = 0, work = 0;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t rows = query_start ? query_start[b + 1] - query_start[b] : 1;
        tiles += (rows + ROW_TILE - 1) / ROW_TILE;
        work += rows * seq_lens[b];
    }
    int64_t *tile_at = malloc(2 * (tiles + 1) * sizeof(int64_t)); /* (sequence, first row) of each tile */
    if (tile_at == NULL) return -1;
    for (int64_t b = 0, k = 0; b < num_seqs; b++) {
        const int64_t first = query_start ? query_start[b] : b, last = query_start ? query_start[b + 1] : b + 1;
        for (int64_t r = first; r < last; r += ROW_TILE, k++) { tile_at[2 * k] = b; tile_at[2 * k + 1] = r; }
    }
    const int64_t split = attention_split(tiles, kv_heads), per_task = kv_heads / split;
    int failed = 0;
#pragma omp parallel if (work * H * dim >= 1 << 18)
    {
        float *scratch = malloc(attend_scratch(per_task * group) * sizeof(float));
        if (scratch == NULL) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tiles * split; task++) {
            if (scratch == NULL) continue;
            const int64_t k = task / split, b = tile_at[2 * k], r0 = tile_at[2 * k + 1], g0 = task % split * per_task;
            const int64_t last = query_start ? query_start[b + 1] : b + 1;
            const int64_t rows = last - r0 < ROW_TILE ? last - r0 : ROW_TILE, len0 = seq_lens[b] - (last - 1 - r0);
            const float *qt = q + r0 * q_stride + g0 * group * dim;
            const int32_t *table = block_tables + b * table_stride;
            float *ot = out + (r0 * H + g0 * group) * dim;
            const int64_t k2 = (task + omp_get_num_threads()) / split; /* likely this thread's next */
            Then then = {NULL, 0, 0};
            if (k2 < tiles) {
                const int64_t b2 = tile_at[2 * k2], last2 = query_start ? query_start[b2 + 1] : b2 + 1;
                const int64_t len2 = seq_lens[b2] - (last2 - 1 - tile_at[2 * k2 + 1]);
                then = (Then){block_tables + b2 * table_stride, window > 0 && len2 > window ? len2 - window : 0, len2};
            }
            attend_ct(qt, q_stride, rows, len0, window, group, dim, k_cache, v_cache, table, kv_heads, g0, g0 + per_task,
                      block_size, scale, ot, H * dim, scratch, k2 < tiles ? &then : NULL, ct);
        }
        free(scratch);
    }
    free(tile_at);
    return failed ? -1 : 0;
}

/* Attention of every query token of a step on the paged cache: sequence b's queries are rows
 * [query_start[b], query_start[b + 1]) (one row, b, when query_start is NULL: a decode step), the
 * last of them at the sequence's last cached position, seq_lens[b] - 1, each over its context up to
 * itself (the last `window` tokens if window > 0), read in place from the blocks of
 * block_tables[b]. out[t, h] = softmax(scale q[t, h] . K) V. q (T, H, dim) rows q_stride apart;
 * caches (num_blocks, block_size, kv_heads, dim), of cache_type; out (T, H, dim) contiguous;
 * q and out of act_type (bfloat16 ones are widened to float32 copies first, and the result
 * rounded once at the end). Returns 0, or -1 if out of memory. */
int paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                    const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                    const int32_t *query_start, int64_t num_seqs, int64_t H, int64_t kv_heads, int64_t dim,
                    int64_t block_size, float scale, int64_t window, void *out, int act_type, int cache_type) {
    if (act_type == F32)
        return paged_attention_f32(q, q_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, query_start,
                                   num_seqs, H, kv_heads, dim, block_size, scale, window, out, cache_type);
    const int64_t tokens = query_start ? query_start[num_seqs] : num_seqs, width = H * dim;
    float *qf = malloc(2 * tokens * width * sizeof(float));
    if (qf == NULL) return -1;
    float *of = qf + tokens * width;
    for (int64_t t = 0; t < tokens; t++) store_row(qf + t * width, element(q, t * q_stride, act_type), width, act_type, F32);
    const int status = paged_attention_f32(qf, width, k_cache, v_cache, block_tables, table_stride, seq_lens, query_start,
                                           num_seqs, H, kv_heads, dim, block_size, scale, window, of, cache_type);
    store_row(out, of, tokens * width, F32, act_type);
    free(qf);
    return status;
}

/* ---------------------------------------------------------------- one team for a step
 *
 * A decode step is ~120 products and attentions of tens of microseconds each. As OpenMP regions
 * of their own, every one wakes the sleeping workers and puts them back to sleep (pagedllm sets
 * OMP_WAIT_POLICY=PASSIVE, so idle threads never spin: spinning starves the other processes on
 * the cores), ~20 us a region on a 2-core VM -- 30% of a single-stream step. So decode_layers
 * runs the whole step as one region: its phases are separated by the team's own barrier, whose
 * waiters spin while the wait is short and yield the core (sched_yield) while it is not, so a
 * waiting thread gives way to any other process that wants the core. Between steps the threads
 * sleep in OpenMP's passive wait as before. Work is claimed from one counter that only grows:
 * every thread makes exactly one failed claim per phase, so each phase's first claim number is
 * known to all. */

#define TEAM_SPINS 2000 /* pause loops (~10-40 us) before a waiter yields instead */

typedef struct {
    int threads, arrived, generation;
    int64_t claimed __attribute__((aligned(64))); /* claims so far, over all phases (apart from the
                                                   * line the barrier's waiters read) */
} Team;

static void team_barrier(Team *team) {
    const int generation = __atomic_load_n(&team->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&team->arrived, 1, __ATOMIC_ACQ_REL) == team->threads) {
        __atomic_store_n(&team->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&team->generation, generation + 1, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&team->generation, __ATOMIC_ACQUIRE) == generation; spins++) {
        if (spins < TEAM_SPINS) {
            _mm_pause();
        } else {
            sched_yield();
        }
    }
}

/* A phase of `tasks` tasks: each thread's next task, or -1 when the phase has none left. *base is
 * the phase's first claim number (the same on every thread); after its last (failed) claim it is
 * moved past the phase. */
static inline int64_t team_claim(Team *team, int64_t *base, int64_t tasks) {
    const int64_t task = __atomic_fetch_add(&team->claimed, 1, __ATOMIC_RELAXED) - *base;
    if (task < tasks) return task;
    *base += tasks + team->threads;
    return -1;
}

/* This thread's share [*r0, *r1) of n rows. */
static inline void team_rows(const Team *team, int tid, int64_t n, int64_t *r0, int64_t *r1) {
    *r0 = n * tid / team->threads;
    *r1 = n * (tid + 1) / team->threads;
}

/* y (M, N) = x (M, K) W^T on q4 tiles, by the team: the activations quantized by rows into a
 * (shared), then the pairs of row groups claimed in runs of an eighth of a thread's share (a claim
 * a pair would cost more than the pair's work at one token; fixed shares would wait for a core
 * that something else slowed); the results are matmul_q4's. Ends with a barrier. */
static void team_product(Team *team, int tid, int64_t *base, const uint8_t *qs, const uint16_t *dm, const float *x,
                         float *y, int64_t M, int64_t N, int64_t K, const Q8 *a) {
    const int64_t nb = K / QK, pairs = pairs_of(N);
    const int64_t run = pairs / (8 * team->threads) > 1 ? pairs / (8 * team->threads) : 1, runs = (pairs + run - 1) / run;
    int64_t r0, r1;
    team_rows(team, tid, M, &r0, &r1);
    quantize_q8(x + r0 * K, (r1 - r0) * nb, a->q + r0 * K, a->d + r0 * nb, a->s + r0 * nb);
    team_barrier(team);
    for (int64_t chunk = 0; chunk < M; chunk += TOKEN_CHUNK) {
        const int64_t end = chunk + TOKEN_CHUNK < M ? chunk + TOKEN_CHUNK : M;
        for (int64_t c; (c = team_claim(team, base, runs)) >= 0;)
            for (int64_t p = c * run; p < pairs && p < (c + 1) * run; p++) product_pair(4, qs, dm, a, y, N, K, chunk, end, p);
    }
    team_barrier(team);
}

/* ---------------------------------------------------------------- a Llama decode step */

/* One decoder layer's weights and cache: the four products as q4 blocks (qs, dm), the two norms. */
typedef struct {
    const float *input_norm, *post_norm;
    const uint8_t *qkv_qs, *o_qs, *gate_up_qs, *down_qs;
    const uint16_t *qkv_dm, *o_dm, *gate_up_dm, *down_dm;
    void *k_cache, *v_cache;
} DecoderLayer;

/* Every decoder layer of a Llama-shaped model (RMSNorm, q/k/v with rotary, GQA attention on the
 * paged cache, o; RMSNorm, SiLU-gated MLP) for a step of one new token per sequence, in one call
 * and one team of threads instead of a few hundred Python-level calls -- the same kernels in the
 * same order as the layers' own forward on this path, so the same numbers. x (B, hidden): the
 * embeddings in, the last layer's output out; residual (B, hidden): zeros in (the first layer's
 * residual is x), the running residual out; cache_type: the caches' (F32 or F16). Returns 0, or
 * -1 if out of memory. */
int decode_layers(const DecoderLayer *layers, int64_t num_layers, float *x, float *residual, int64_t B, int64_t hidden,
                  int64_t heads, int64_t kv_heads, int64_t dim, int64_t inter, float eps, const int64_t *positions,
                  const float *cos_sin, const int64_t *slots, const int32_t *block_tables, int64_t table_stride,
                  const int32_t *seq_lens, int64_t block_size, float scale, int cache_type) {
    const int64_t width = (heads + 2 * kv_heads) * dim, group = heads / kv_heads; /* a token's q | k | v */
    const int64_t widest = inter > hidden ? (inter > heads * dim ? inter : heads * dim) : (hidden > heads * dim ? hidden : heads * dim);
    const int max_threads = omp_get_max_threads();
    const int64_t split = attention_split(B, kv_heads), per_task = kv_heads / split; /* a task a row (B tiles) */
    const int64_t scratch = attend_scratch(per_task * group);
    float *h = malloc((B * (hidden + width + heads * dim + 3 * inter) + max_threads * scratch) * sizeof(float));
    int8_t *q8 = malloc(B * widest + 2 * (B * widest / QK) * sizeof(float));
    if (h == NULL || q8 == NULL) {
        free(h);
        free(q8);
        return -1;
    }
    float *qkv = h + B * hidden, *attn = qkv + B * width, *gate_up = attn + B * heads * dim, *act = gate_up + 2 * B * inter;
    float *scratches = act + B * inter;
    const Q8 a = {q8, (float *)(q8 + B * widest), (float *)(q8 + B * widest) + B * widest / QK};
    Team team = {0, 0, 0, 0};
#pragma omp parallel
    {
        const int tid = omp_get_thread_num();
#pragma omp single
        team.threads = omp_get_num_threads();  /* (single's barrier: every thread sees it) */
        int64_t base = 0, r0, r1;
        team_rows(&team, tid, B, &r0, &r1);
        const int64_t rows = r1 - r0;
        for (int64_t l = 0; l < num_layers; l++) {
            const DecoderLayer *L = layers + l;
            rms_norm(x + r0 * hidden, hidden, residual + r0 * hidden, hidden, L->input_norm, eps, h + r0 * hidden,
                     residual + r0 * hidden, rows, hidden, F32);
            team_barrier(&team);
            team_product(&team, tid, &base, L->qkv_qs, L->qkv_dm, h, qkv, B, width, hidden, &a);
            rotary(qkv + r0 * width, width, rows, heads + kv_heads, dim, positions + r0, cos_sin, F32);
            write_kv(qkv + r0 * width + heads * dim, width, qkv + r0 * width + (heads + kv_heads) * dim, width,
                     L->k_cache, L->v_cache, slots + r0, rows, kv_heads * dim, F32, cache_type);
            team_barrier(&team);
            for (int64_t task; (task = team_claim(&team, &base, B * split)) >= 0;) {
                const int64_t b = task / split, g0 = task % split * per_task;
                const float *qt = qkv + b * width + g0 * group * dim;
                float *ot = attn + (b * heads + g0 * group) * dim, *sc = scratches + tid * scratch;
                const int64_t b2 = (task + team.threads) / split; /* likely this thread's next */
                Then then = {NULL, 0, 0};
                if (b2 < B) then = (Then){block_tables + b2 * table_stride, 0, seq_lens[b2]};
                attend_ct(qt, width, 1, seq_lens[b], 0, group, dim, L->k_cache, L->v_cache, block_tables + b * table_stride,
                          kv_heads, g0, g0 + per_task, block_size, scale, ot, heads * dim, sc, b2 < B ? &then : NULL,
                          cache_type);
            }
            team_barrier(&team);
            team_product(&team, tid, &base, L->o_qs, L->o_dm, attn, x, B, hidden, heads * dim, &a);
            rms_norm(x + r0 * hidden, hidden, residual + r0 * hidden, hidden, L->post_norm, eps, h + r0 * hidden,
                     residual + r0 * hidden, rows, hidden, F32);
            team_barrier(&team);
            team_product(&team, tid, &base, L->gate_up_qs, L->gate_up_dm, h, gate_up, B, 2 * inter, hidden, &a);
            act_and_mul(gate_up + r0 * 2 * inter, 2 * inter, act + r0 * inter, rows, inter, 0, F32);
            team_barrier(&team);
            team_product(&team, tid, &base, L->down_qs, L->down_dm, act, x, B, hidden, inter, &a);
        }
    }
    free(h);
    free(q8);
    return 0;
}
