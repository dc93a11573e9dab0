// qkv's native matrix-vector products for decoding, registered with PyTorch as the operators qkv::q4_mv and
// qkv::q8_mv, so that the compiled decode step (AOTInductor) calls them as it calls ATen's own kernels.
//
// Why: PyTorch's int4 and int8 CPU kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) run about half
// as fast with their AVX2 code as with their AVX-512 code, and on AVX2-only CPUs they bound decoding (~13 and
// ~4 ms of a ~18 ms SmolLM2 token). These kernels do what llama.cpp does there: the activations are rounded
// to int8, one scale per block of 32 (d_x = max|x| / 127, xq = round-to-nearest-even(x / d_x)), and each
// block's dot product with the weights' codes is exact integer arithmetic (AVX2 maddubs); then
//     q4_mv, Q4_1 blocks (w = d q + m):   y += d d_x sum(q xq) + m d_x sum(xq)     per block
//     q4_mv, Q4_0 blocks (w = d (q - 8)): y += d d_x sum(q xq) - 8 d d_x sum(xq)   per block
//     q8_mv, int8 rows (w = s q, one bfloat16 s a row):  y = s sum over blocks of d_x sum(q xq)
// The weights are what the model holds (q4: the GGUF file's own blocks); the int8 activations are these
// paths' only approximation (~5e-3 of a row's largest output; bounded in tests/weights/test_matvec.py).
//
// Built for this CPU by `qkv compile` (qkv/weights/matvec.py) against the installed torch's headers.
// A Q4 block: float16 d (Q4_1: then float16 m), then 16 bytes of nibbles, weight j in the low nibble of byte j
// and weight j + 16 in the high nibble. Rows of W are (K / 32) consecutive blocks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
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

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {  // the 8 lanes' sum
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

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
        float db = amax / 127.f, inv = db != 0.f ? 1.f / db : 0.f;
        if (!std::isfinite(inv)) db = inv = 0.f;  // a block below ~1e-36: zero (1 / d would overflow)
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            // to nearest even (the default rounding mode); at most 127 in size but for a last ulp, held there
            const int v = std::max(-127, std::min(127, static_cast<int>(std::nearbyint(xb[j] * inv))));
            q[32 * b + j] = static_cast<int8_t>(v);
            sum += v;
        }
        d[b] = db;
        s[b] = db * static_cast<float>(sum);
    }
}

// y[t * n] = x[t] . W[r] for kT consecutive quantised rows t of x and one row of W (``row``), its blocks read
// and unpacked once for all kT rows. Each output is the same arithmetic in the same order whatever kT is, so a
// row of x gets the same bits alone as in a batch (a prompt's rows and its decode steps agree).
template <bool kQ41, int kT>
inline void tile(const uint8_t *row, int64_t nb, const int8_t *xq, const float *xd, const float *xs, float *y,
                 int64_t n) {
    constexpr int64_t bytes = kQ41 ? 20 : 18, codes = kQ41 ? 4 : 2;
    float tail[kT] = {};  // the minimums' (Q4_0: the -8's) share
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[kT];
    for (int t = 0; t < kT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = row + b * bytes;
        _mm_prefetch(reinterpret_cast<const char *>(blk + kPrefetchBytes), _MM_HINT_T0);
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + codes));
        const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(c, 4), low), _mm_and_si128(c, low));
        const float dw = half_at(blk), mw = kQ41 ? half_at(blk + 2) : -8.f * dw;
        for (int t = 0; t < kT; ++t) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + (t * nb + b) * 32));
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);  // 8 exact int32 sums
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[t * nb + b]), _mm256_cvtepi32_ps(dot), acc[t]);
            tail[t] = std::fma(mw, xs[t * nb + b], tail[t]);
        }
    }
    for (int t = 0; t < kT; ++t) y[t * n] = hsum(acc[t]) + tail[t];
#else
    float total[kT] = {};
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = row + b * bytes;
        const float dw = half_at(blk), mw = kQ41 ? half_at(blk + 2) : -8.f * dw;
        for (int t = 0; t < kT; ++t) {
            const int8_t *xb = xq + (t * nb + b) * 32;
            int dot = 0;
            for (int j = 0; j < 16; ++j) dot += (blk[codes + j] & 0x0f) * xb[j] + (blk[codes + j] >> 4) * xb[j + 16];
            total[t] += dw * xd[t * nb + b] * static_cast<float>(dot);
            tail[t] += mw * xs[t * nb + b];
        }
    }
    for (int t = 0; t < kT; ++t) y[t * n] = total[t] + tail[t];
#endif
}

// y[i, r] = x[i] . W[r] for rows [r0, r1) of W and every quantised row i of x (M of them, ``n`` apart in y):
// one row of W at a time, read from memory once for all M rows of x, unpacked once for each 4 of them.
template <bool kQ41>
void rows(const uint8_t *w, int64_t nb, int64_t m, int64_t n, const int8_t *xqs, const float *xds, const float *xss,
          float *y, int64_t r0, int64_t r1) {
    constexpr int64_t bytes = kQ41 ? 20 : 18;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = w + r * nb * bytes;
        int64_t i = 0;
        for (; i + 4 <= m; i += 4)
            tile<kQ41, 4>(row, nb, xqs + i * nb * 32, xds + i * nb, xss + i * nb, y + i * n + r, n);
        const int8_t *xq = xqs + i * nb * 32;
        const float *xd = xds + i * nb, *xs = xss + i * nb;
        switch (m - i) {
            case 3: tile<kQ41, 3>(row, nb, xq, xd, xs, y + i * n + r, n); break;
            case 2: tile<kQ41, 2>(row, nb, xq, xd, xs, y + i * n + r, n); break;
            case 1: tile<kQ41, 1>(row, nb, xq, xd, xs, y + i * n + r, n); break;
            default: break;
        }
    }
}

// x (M, K) float32 rounded to int8 per block of 32: codes, scales d_x and d_x * sum(codes), row after row.
struct Quantised {
    std::vector<int8_t> q;
    std::vector<float> d, s;
};

Quantised quantize(const at::Tensor &x) {
    const at::Tensor xc = x.contiguous();
    const int64_t m = xc.size(0), k = xc.size(1), nb = k / 32;
    Quantised out{std::vector<int8_t>(static_cast<size_t>(m * k)), std::vector<float>(static_cast<size_t>(m * nb)),
                  std::vector<float>(static_cast<size_t>(m * nb))};
    for (int64_t i = 0; i < m; ++i)
        quantize_row(xc.data_ptr<float>() + i * k, k, out.q.data() + i * k, out.d.data() + i * nb,
                     out.s.data() + i * nb);
    return out;
}

// The operands' checks, shared by the CPU kernels and the Meta ones (what torch.export traces with).
void check_x(const at::Tensor &x, const char *op) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qkv::", op, ": x must be a 2-d float32 tensor (M, K)");
    TORCH_CHECK(x.size(1) > 0 && x.size(1) % 32 == 0, "qkv::", op, ": x has K = ", x.size(1),
                ", not a positive multiple of 32");
}

int64_t check_q4(const at::Tensor &x, const at::Tensor &blocks, int64_t kind) {
    TORCH_CHECK(kind == 0 || kind == 1, "qkv::q4_mv: kind must be 0 (Q4_0) or 1 (Q4_1), got ", kind);
    check_x(x, "q4_mv");
    TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
                "qkv::q4_mv: blocks must be a contiguous 2-d uint8 tensor (N, K / 32 * block bytes)");
    const int64_t bytes = kind == 1 ? 20 : 18;
    TORCH_CHECK(blocks.size(1) == x.size(1) / 32 * bytes, "qkv::q4_mv: x has K = ", x.size(1),
                " but blocks has rows of ", blocks.size(1), " bytes (K / 32 blocks of ", bytes, ")");
    return blocks.size(0);
}

int64_t check_q8(const at::Tensor &x, const at::Tensor &w8, const at::Tensor &scales) {
    check_x(x, "q8_mv");
    TORCH_CHECK(w8.dim() == 2 && w8.scalar_type() == at::kChar && w8.is_contiguous(),
                "qkv::q8_mv: w8 must be a contiguous 2-d int8 tensor (N, K)");
    TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                    scales.size(0) == w8.size(0),
                "qkv::q8_mv: scales must be a contiguous bfloat16 tensor of one scale a row of w8 (N,)");
    TORCH_CHECK(w8.size(1) == x.size(1), "qkv::q8_mv: x has K = ", x.size(1), " but w8 has rows of ", w8.size(1));
    return w8.size(0);
}

void check_cpu(std::initializer_list<const at::Tensor *> ts, const char *op) {
    for (const at::Tensor *t : ts)
        TORCH_CHECK(t->device().is_cpu(), "qkv::", op, ": every operand must be on the CPU, got ", t->device());
}

at::Tensor q4_mv(const at::Tensor &x, const at::Tensor &blocks, int64_t kind) {
    const int64_t n = check_q4(x, blocks, kind), m = x.size(0), k = x.size(1);
    check_cpu({&x, &blocks}, "q4_mv");
    at::Tensor y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const Quantised xq = quantize(x);
    const uint8_t *w = blocks.data_ptr<uint8_t>();
    float *out = y.data_ptr<float>();
    const int64_t nb = k / 32;
    // rows of W split among torch's threads (its OpenMP pool): at least ~16k weights a task
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
        if (kind == 1)
            rows<true>(w, nb, m, n, xq.q.data(), xq.d.data(), xq.s.data(), out, r0, r1);
        else
            rows<false>(w, nb, m, n, xq.q.data(), xq.d.data(), xq.s.data(), out, r0, r1);
    });
    return y;
}

// y[i, r] = s_r sum_b d_x[i, b] sum_j q[r, j] xq[i, j] for rows [r0, r1) of the int8 matrix W (N, K).
void rows8(const int8_t *w, const uint16_t *scales, int64_t k, int64_t m, int64_t n, const int8_t *xqs,
           const float *xds, float *y, int64_t r0, int64_t r1) {
    const int64_t nb = k / 32;
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t *row = w + r * k;
        const uint32_t bits = static_cast<uint32_t>(scales[r]) << 16;  // bfloat16 -> float32, exact
        float scale;
        std::memcpy(&scale, &bits, 4);
        for (int64_t i = 0; i < m; ++i) {
            const int8_t *xq = xqs + i * k;
            const float *xd = xds + i * nb;
#if defined(__AVX2__) && defined(__FMA__)
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; ++b) {
                _mm_prefetch(reinterpret_cast<const char *>(row + 32 * b + kPrefetchBytes), _MM_HINT_T0);
                const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 32 * b));
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + 32 * b));
                // signed x signed through maddubs (unsigned x signed): |w| times x with w's sign (|w|, |x| <= 127)
                const __m256i dot = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[b]), _mm256_cvtepi32_ps(dot), acc);
            }
            y[i * n + r] = scale * hsum(acc);
#else
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                int dot = 0;
                for (int j = 0; j < 32; ++j) dot += row[32 * b + j] * xq[32 * b + j];
                total += xd[b] * static_cast<float>(dot);
            }
            y[i * n + r] = scale * total;
#endif
        }
    }
}

at::Tensor q8_mv(const at::Tensor &x, const at::Tensor &w8, const at::Tensor &scales) {
    const int64_t n = check_q8(x, w8, scales), m = x.size(0), k = x.size(1);
    check_cpu({&x, &w8, &scales}, "q8_mv");
    at::Tensor y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const Quantised xq = quantize(x);
    const int8_t *w = w8.data_ptr<int8_t>();
    const uint16_t *sc = reinterpret_cast<const uint16_t *>(scales.data_ptr<at::BFloat16>());
    float *out = y.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
        rows8(w, sc, k, m, n, xq.q.data(), xq.d.data(), out, r0, r1);
    });
    return y;
}

at::Tensor q4_mv_meta(const at::Tensor &x, const at::Tensor &blocks, int64_t kind) {
    return at::empty({x.size(0), check_q4(x, blocks, kind)}, x.options().device(at::kMeta));
}

at::Tensor q8_mv_meta(const at::Tensor &x, const at::Tensor &w8, const at::Tensor &scales) {
    return at::empty({x.size(0), check_q8(x, w8, scales)}, x.options().device(at::kMeta));
}

}  // namespace

TORCH_LIBRARY(qkv, m) {
    m.def("q4_mv(Tensor x, Tensor blocks, int kind) -> Tensor");
    m.def("q8_mv(Tensor x, Tensor w8, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
    m.impl("q4_mv", &q4_mv);
    m.impl("q8_mv", &q8_mv);
}

TORCH_LIBRARY_IMPL(qkv, Meta, m) {
    m.impl("q4_mv", &q4_mv_meta);
    m.impl("q8_mv", &q8_mv_meta);
}
