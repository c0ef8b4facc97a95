// llama.cpp's CPU dot products for GGUF Q4_0 and Q4_1 weights (ggml-cpu's vec_dot_q4_0_q8_0 and
// vec_dot_q4_1_q8_1): the activations quantized to 8 bits per block of 32 with one scale
// (rounded to float16, as llama.cpp stores it), integer products summed per block, float32 across blocks.
// The weights are the GGUF blocks as they are. Built by cpu_q8dot.py: AVX2 intrinsics where the CPU runs
// AVX2, plain C elsewhere; OpenMP threads over output rows where the compiler has it (a row is computed by
// one thread in one order, so a row's result never depends on the other rows).
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0 && man == 0) {
        bits = sign;
    } else if (exp == 0) {  // subnormal: normalize
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static float round_to_f16(float x) {  // x as a float16 would hold it (round to nearest even)
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(x, 0));
#else
    float a = fabsf(x);
    if (a >= 65520.0f) return copysignf(INFINITY, x);
    if (a < 6.103515625e-05f) return x == 0.0f ? x : copysignf(nearbyintf(a * 16777216.0f) / 16777216.0f, x);
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x0fff + ((u >> 13) & 1)) & 0xffffe000u;
    memcpy(&x, &u, 4);
    return x;
#endif
}

// x [M, K] float32 -> q [M, K] int8 and, per block of 32, d [M, K/32] (the scale, float16-rounded) and
// s [M, K/32] = d * (sum of the block's q), float16-rounded (llama.cpp's block_q8_1 keeps both).
void q8dot_quantize(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t blocks = M * (K / 32);
    for (int64_t i = 0; i < blocks; i++) {
        const float *xb = x + i * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {  // a NaN is kept (fmaxf would drop it): the block's scale, then its sums, are NaN
            const float a = fabsf(xb[j]);
            amax = (a > amax || a != a) ? a : amax;
        }
        const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int v = (int)nearbyintf(xb[j] * id);
            q[i * 32 + j] = (int8_t)v;
            sum += v;
        }
        d[i] = round_to_f16(dd);
        s[i] = round_to_f16(dd * (float)sum);
    }
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i nibbles32(const uint8_t *qs) {  // 16 bytes -> 32 codes: the low nibbles, then the high
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

static inline __m256 dot_u8_s8(__m256i u, __m256i s) {  // 8 float sums of products of unsigned u, signed s
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

// One weight row (nb GGUF blocks of `kind`: 0 Q4_0, 1 Q4_1) . one quantized activation row.
static float row_dot(int kind, const uint8_t *w, int64_t nb, const int8_t *q, const float *d, const float *s) {
    float extra = 0.0f;  // Q4_1's offsets: m times the block's sum of x
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(q + b * 32));
        if (kind == 0) {  // codes - 8, signed x signed: |c| times x with c's sign
            const uint8_t *blk = w + b * 18;
            const __m256i c = _mm256_sub_epi8(nibbles32(blk + 2), _mm256_set1_epi8(8));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(*(const uint16_t *)blk) * d[b]),
                                  dot_u8_s8(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c)), acc);
        } else {  // codes unsigned, and m times the block's sum of x
            const uint8_t *blk = w + b * 20;
            const float dw = f16_to_f32(*(const uint16_t *)blk);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[b]), dot_u8_s8(nibbles32(blk + 4), x), acc);
            extra += f16_to_f32(*(const uint16_t *)(blk + 2)) * s[b];
        }
    }
    return hsum8(acc) + extra;
#else
    float total = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *x = q + b * 32;
        int isum = 0;
        const int off = kind == 0 ? 8 : 0;  // Q4_0: codes - 8; Q4_1: codes, and m times the block's sum
        const uint8_t *blk = w + b * (kind == 0 ? 18 : 20), *qs = blk + (kind == 0 ? 2 : 4);
        for (int j = 0; j < 16; j++) isum += ((qs[j] & 0x0F) - off) * x[j] + ((qs[j] >> 4) - off) * x[j + 16];
        total += f16_to_f32(*(const uint16_t *)blk) * d[b] * (float)isum;
        if (kind == 1) extra += f16_to_f32(*(const uint16_t *)(blk + 2)) * s[b];
    }
    return total + extra;
#endif
}

// y [M, N] = x . W^T for W [N, K] in GGUF blocks of `kind`, x as q8dot_quantize left it.
void q8dot_matmul(int kind, const uint8_t *w, int64_t N, int64_t K, const int8_t *q, const float *d,
                  const float *s, int64_t M, float *y, int threads) {
    const int64_t nb = K / 32, row_bytes = nb * (kind == 0 ? 18 : 20);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            y[m * N + n] = row_dot(kind, w + n * row_bytes, nb, q + m * K, d + m * nb, s + m * nb);
        }
    }
    (void)threads;
}

int q8dot_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
