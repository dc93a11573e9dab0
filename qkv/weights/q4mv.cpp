// qkv's native 4-bit matrix-vector product: y = x W^T straight from GGUF Q4_0 / Q4_1 blocks, registered with
// PyTorch as the operator qkv::q4_mv, so that the compiled decode step (AOTInductor) calls it as it calls
// ATen's own kernels.
//
// Why: PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) is about twice as slow with its AVX2 code as
// with its AVX-512 code, and on AVX2-only CPUs it bounds decoding (~13 of ~18 ms a SmolLM2 token). This
// kernel does what llama.cpp does there: the activations are rounded to int8, one scale per block of 32
// (d_x = max|x| / 127, xq = round-to-nearest-even(x / d_x)), and each block's dot product of 4-bit codes
// and int8 activations is exact integer arithmetic (AVX2 maddubs); then per block
//     Q4_1 (w = d q + m):      y += d d_x sum(q xq) + m d_x sum(xq)
//     Q4_0 (w = d (q - 8)):    y += d d_x sum(q xq) - 8 d d_x sum(xq)
// The weights are the file's own blocks (nothing re-rounded); the int8 activations are this path's only
// approximation (relative error ~5e-3 of a row's result, measured in tests/weights/test_q4mv.py).
//
// Built for this CPU by `qkv compile` (qkv/weights/native.py) against the installed torch's headers.
// A block: float16 d (Q4_1: then float16 m), then 16 bytes of nibbles, weight j in the low nibble of byte j
// and weight j + 16 in the high nibble. Rows of W are (K / 32) consecutive blocks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// How far ahead of the block being read the next bytes of W are asked for (a decode step streams ~66 MB of
// SmolLM2's blocks from memory; without it the loop waits on memory: 17 against 8 ms a token's matrices).
constexpr int64_t kPrefetchBytes = 1280;

inline float half_at(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// One row of x (K floats) -> int8 codes, per-block scales d_x and d_x * sum(codes). A block holding a NaN or an
// infinity gets the scale NaN (codes 0), so that every output it reaches is NaN, never a finite guess.
void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / 32; ++b) {
        const float *xb = x + 32 * b;
        float amax = 0.f;
        bool finite = true;
        for (int j = 0; j < 32; ++j) {
            finite = finite && std::isfinite(xb[j]);
            amax = std::fmax(amax, std::fabs(xb[j]));
        }
        if (!finite) {
            std::memset(q + 32 * b, 0, 32);
            d[b] = s[b] = std::numeric_limits<float>::quiet_NaN();
            continue;
        }
        const float db = amax / 127.f, inv = db != 0.f ? 1.f / db : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            const int v = static_cast<int>(std::nearbyint(xb[j] * inv));  // to nearest even (default mode)
            q[32 * b + j] = static_cast<int8_t>(v);
            sum += v;
        }
        d[b] = db;
        s[b] = db * static_cast<float>(sum);
    }
}

// y[i, r] = x[i] . W[r] for rows [r0, r1) of W and every quantised row i of x (M of them, ``n`` apart in y):
// one row of W at a time, its blocks in order, read from memory once for all M rows of x.
template <bool kQ41>
void rows(const uint8_t *w, int64_t nb, int64_t m, int64_t n, const int8_t *xqs, const float *xds, const float *xss,
          float *y, int64_t r0, int64_t r1) {
    constexpr int64_t bytes = kQ41 ? 20 : 18, codes = kQ41 ? 4 : 2;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = w + r * nb * bytes;
        for (int64_t i = 0; i < m; ++i) {
            const int8_t *xq = xqs + i * nb * 32;
            const float *xd = xds + i * nb, *xs = xss + i * nb;
            float tail = 0.f;  // the minimums' (Q4_0: the -8's) share
#if defined(__AVX2__)
            const __m128i low = _mm_set1_epi8(0x0f);
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t *blk = row + b * bytes;
                _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchBytes), _MM_HINT_T0);
                const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + codes));
                const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(c, 4), low), _mm_and_si128(c, low));
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + 32 * b));
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);  // 8 exact int32 sums
                const float dw = half_at(blk);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[b]), _mm256_cvtepi32_ps(dot), acc);
                tail += (kQ41 ? half_at(blk + 2) : -8.f * dw) * xs[b];
            }
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[i * n + r] = _mm_cvtss_f32(h) + tail;
#else
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t *blk = row + b * bytes;
                int dot = 0;
                for (int j = 0; j < 16; ++j)
                    dot += (blk[codes + j] & 0x0f) * xq[32 * b + j] + (blk[codes + j] >> 4) * xq[32 * b + j + 16];
                const float dw = half_at(blk);
                total += dw * xd[b] * static_cast<float>(dot);
                tail += (kQ41 ? half_at(blk + 2) : -8.f * dw) * xs[b];
            }
            y[i * n + r] = total + tail;
#endif
        }
    }
}

at::Tensor q4_mv(const at::Tensor &x, const at::Tensor &blocks, int64_t kind) {
    TORCH_CHECK(kind == 0 || kind == 1, "qkv::q4_mv: kind must be 0 (Q4_0) or 1 (Q4_1), got ", kind);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "qkv::q4_mv: x must be a 2-d float32 CPU tensor (M, K)");
    TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.device().is_cpu() &&
                    blocks.is_contiguous(),
                "qkv::q4_mv: blocks must be a contiguous 2-d uint8 CPU tensor (N, K / 32 * block bytes)");
    const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0), bytes = kind == 1 ? 20 : 18;
    TORCH_CHECK(k % 32 == 0 && blocks.size(1) == k / 32 * bytes, "qkv::q4_mv: x has K = ", k,
                " but blocks has rows of ", blocks.size(1), " bytes (K / 32 blocks of ", bytes, ")");
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const int64_t nb = k / 32;
    std::vector<int8_t> xq(static_cast<size_t>(m * k));
    std::vector<float> xd(static_cast<size_t>(m * nb)), xs(static_cast<size_t>(m * nb));
    for (int64_t i = 0; i < m; ++i)
        quantize_row(xc.data_ptr<float>() + i * k, k, xq.data() + i * k, xd.data() + i * nb, xs.data() + i * nb);
    const uint8_t *w = blocks.data_ptr<uint8_t>();
    float *out = y.data_ptr<float>();
    // rows of W split among torch's threads (its OpenMP pool): at least ~16k weights a task
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
        if (kind == 1)
            rows<true>(w, nb, m, n, xq.data(), xd.data(), xs.data(), out, r0, r1);
        else
            rows<false>(w, nb, m, n, xq.data(), xd.data(), xs.data(), out, r0, r1);
    });
    return y;
}

at::Tensor q4_mv_meta(const at::Tensor &x, const at::Tensor &blocks, int64_t kind) {
    return at::empty({x.size(0), blocks.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY(qkv, m) {
    m.def("q4_mv(Tensor x, Tensor blocks, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(qkv, CPU, m) { m.impl("q4_mv", &q4_mv); }

TORCH_LIBRARY_IMPL(qkv, Meta, m) { m.impl("q4_mv", &q4_mv_meta); }

extern "C" int qkv_q4mv_avx2() {  // whether this build has the AVX2 loop (else the portable one)
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
