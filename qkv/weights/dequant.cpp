// qkv's native dequantiser: GGUF Q4_0 / Q4_1 / Q8_0 blocks -> float32 or bfloat16, one pass, on every core.
//
// Built for this CPU by `qkv compile` (qkv/weights/native.py: g++ -O3 -march=native -fopenmp -ffp-contract=off)
// and called through ctypes on a prompt's matrices. It computes what qkv.weights.int4.dequantize_into
// computes, with the same IEEE float32 operations in the same order -- (q - 8) * d, q * d + m, q * d; a
// multiply then an add, never fused -- and rounds to bfloat16 to nearest-even as torch's cast does, so
// the numbers are the same bit for bit (a NaN's payload aside: torch's casts differ among themselves there);
// native.py checks that before a process uses the library.
//
// Why not the compiler torch already has (inductor): its loop loads 8 code bytes at a time, a partial load
// that AVX2's at::vec does through a zeroed buffer and a memcpy -- 1.2 ms a 576 x 1536 matrix against
// 0.1 ms here. A block: 2-byte float16 d (Q4_1: then float16 m), then the codes -- 16 bytes of nibbles
// (weight j low in byte j, weight j + 16 high) or 32 signed bytes (Q8_0).

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum Kind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int64_t kBlockBytes[] = {18, 20, 34};
constexpr int64_t kParallelFrom = 1024;  // blocks; fewer are not worth waking the other threads

// float16 -> float32 is exact; subnormals as m * 2^-24 (exact: m < 2^10)
inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        const float f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// round to nearest even, as c10::BFloat16; a NaN becomes the quiet NaN 0x7fc0
inline uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

#if defined(__AVX2__)
// the 32 values of one block as four vectors of 8 floats, in weight order
template <Kind K>
inline void block_values(const uint8_t *blk, __m256 v[4]) {
    const __m256 d = _mm256_set1_ps(half_to_float(blk));
    if (K == Q8_0) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
        for (int p = 0; p < 4; p++) {
            const __m128i part = (p & 1) ? _mm_srli_si128(halves[p >> 1], 8) : halves[p >> 1];
            v[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
        }
        return;
    }
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(blk + (K == Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    const __m256 m = _mm256_set1_ps(K == Q4_1 ? half_to_float(blk + 2) : 0.0f), eight = _mm256_set1_ps(8.0f);
    for (int p = 0; p < 4; p++) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
        v[p] = K == Q4_1 ? _mm256_add_ps(_mm256_mul_ps(q, d), m) : _mm256_mul_ps(_mm256_sub_ps(q, eight), d);
    }
}

inline __m128i to_bf16x8(__m256 x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <Kind K, bool BF16>
inline void block(const uint8_t *blk, void *out) {
    __m256 v[4];
    block_values<K>(blk, v);
    for (int p = 0; p < 4; p++) {
        if (BF16)
            _mm_storeu_si128((__m128i *)((uint16_t *)out + 8 * p), to_bf16x8(v[p]));
        else
            _mm256_storeu_ps((float *)out + 8 * p, v[p]);
    }
}
#else
template <Kind K, bool BF16>
inline void block(const uint8_t *blk, void *out) {
    const float d = half_to_float(blk), m = K == Q4_1 ? half_to_float(blk + 2) : 0.0f;
    const uint8_t *q = blk + (K == Q4_1 ? 4 : 2);
    float v[32];
    for (int i = 0; i < 32; i++) {
        if (K == Q8_0) {
            v[i] = (float)(int8_t)q[i] * d;
        } else {
            const float c = (float)(i < 16 ? q[i] & 15 : q[i - 16] >> 4);
            v[i] = K == Q4_1 ? c * d + m : (c - 8.0f) * d;
        }
    }
    for (int i = 0; i < 32; i++) {
        if (BF16)
            ((uint16_t *)out)[i] = to_bf16(v[i]);
        else
            ((float *)out)[i] = v[i];
    }
}
#endif

template <Kind K, bool BF16>
void run(const uint8_t *blocks, void *out, int64_t n, int threads) {
    const int64_t out_bytes = BF16 ? 64 : 128;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= kParallelFrom && threads > 1)
    for (int64_t j = 0; j < n; j++)
        block<K, BF16>(blocks + j * kBlockBytes[K], (char *)out + j * out_bytes);
}

}  // namespace

extern "C" {

// n blocks of `kind` (0 Q4_0, 1 Q4_1, 2 Q8_0) -> n * 32 values at `out`, float32 (bf16 = 0) or bfloat16, on
// `threads` threads (the caller's torch.get_num_threads(): OpenMP's own count is per calling thread).
// Returns 0, or 1 for a kind it does not know (nothing written).
int qkv_dequant(int kind, int bf16, const uint8_t *blocks, void *out, int64_t n, int threads) {
    switch (kind * 2 + (bf16 != 0)) {
        case 0: run<Q4_0, false>(blocks, out, n, threads); return 0;
        case 1: run<Q4_0, true>(blocks, out, n, threads); return 0;
        case 2: run<Q4_1, false>(blocks, out, n, threads); return 0;
        case 3: run<Q4_1, true>(blocks, out, n, threads); return 0;
        case 4: run<Q8_0, false>(blocks, out, n, threads); return 0;
        case 5: run<Q8_0, true>(blocks, out, n, threads); return 0;
        default: return 1;
    }
}

// the C float16 decoder alone (tests compare it with torch's over all 65,536 values)
float qkv_half_to_float(uint16_t h) {
    uint8_t b[2];
    memcpy(b, &h, 2);
    return half_to_float(b);
}

}  // extern "C"
