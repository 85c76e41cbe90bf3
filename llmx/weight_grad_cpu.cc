// The weight gradient of a projection, dW = X^T G, for XLA:CPU as an XLA FFI handler (llmx/weight_grad.py
// builds this file with the host's C++ compiler and registers it).
//
// Why by hand: X (R, M) holds one row per token and G (R, N) the output gradient's rows, so dW contracts
// over the rows, the major dimension of both. XLA:CPU's bf16 dot (YNNPACK) takes its left operand with
// the contraction minor only, so XLA first transposes X into an (M, R) copy in a loop fusion and then
// runs a dot whose long contraction and small output YNNPACK does at ~280 GFLOP/s, against ~370 for the
// same FLOPs in the forward projections (Zen 4, 2 cores, 2026-12-05; PyTorch's oneDNN does dW at ~410).
// vdpbf16ps multiplies pairs of bf16 along the contraction, and here the pairs are two consecutive rows:
// packing (X[2k][i], X[2k+1][i]) and (G[2k][j], G[2k+1][j]) into 32-bit words is a streaming pass over
// both inputs, with no transpose, and the product then runs from those words at ~360 GFLOP/s.
//
// Layouts: x (..., M) and g (..., N) bf16, both with R rows (the leading dimensions); out (M, N) f32.
// N must be a multiple of 16. The rows are taken a chunk of pairs at a time (the packing buffers stay
// within 4 MiB per thread whatever R, M and N are), the chunks' products summed in fp32 in the output.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_pool.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LLMX_BF16_DOTS 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;
using llmx::parallel_for;

namespace {

#ifdef LLMX_BF16_DOTS

constexpr long kLanes = 16;        // fp32 lanes of a 512-bit vector
constexpr long kPanel = 4 * kLanes;  // columns of dW per unit of work
constexpr long kRowBlock = 48;     // rows of dW per unit of work (8 tiles of 6 rows)
constexpr long kChunk = 512;       // row pairs packed at a time, at most
constexpr long kBufferWords = 1 << 20;  // and at most 4 MiB of packed words per calling thread

// out[k][j] = (src[2k][j], src[2k + 1][j]) for pairs k in [k0, k1) of rows; a missing last row is zero.
void pair_rows(const uint16_t* src, long rows, long cols, long k0, long k1, uint32_t* out) {
  const __m256i zero = _mm256_setzero_si256();
  for (long k = k0; k < k1; ++k) {
    const uint16_t* lo = src + 2 * k * cols;
    const uint16_t* hi = 2 * k + 1 < rows ? lo + cols : nullptr;
    uint32_t* o = out + (k - k0) * cols;
    long j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + j)));
      const __m512i b = _mm512_cvtepu16_epi32(hi ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + j)) : zero);
      _mm512_storeu_si512(o + j, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
    for (; j < cols; ++j) o[j] = static_cast<uint32_t>(lo[j]) | static_cast<uint32_t>(hi ? hi[j] : 0) << 16;
  }
}

// C[r][v * 16 ..] (+)= sum over `pairs` of a[k][r] . b[k][v * 16 ..] for RR rows and NV vectors of C: the
// accumulators (RR x NV <= 24), B's NV vectors and one broadcast fit the 32 registers.
template <int RR, int NV>
inline void tile(long pairs, const uint32_t* a, long a_k, const uint32_t* b, long b_k, float* c, long c_row,
                 bool accumulate) {
  __m512 acc[RR][NV];
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * c_row + v * kLanes) : _mm512_setzero_ps();
  for (long k = 0; k < pairs; ++k) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_loadu_si512(b + k * b_k + v * kLanes);
      __asm__("" : "+v"(bv[v]));  // keep B's vectors in registers: GCC otherwise reloads them for every row
    }
    for (int r = 0; r < RR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[k * a_k + r]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * c_row + v * kLanes, acc[r][v]);
}

// Rows [i, i1) of C for NV vectors of columns: tiles of 6 rows (4 x 6 accumulators measured fastest
// of 4, 5 and 6 rows on a Zen 4), then 4, 2 and 1 for the rest.
template <int NV>
void rows(long i, long i1, long pairs, const uint32_t* a, long m, const uint32_t* b, long n, float* c, bool accumulate) {
  for (; i + 6 <= i1; i += 6) tile<6, NV>(pairs, a + i, m, b, n, c + i * n, n, accumulate);
  for (; i + 4 <= i1; i += 4) tile<4, NV>(pairs, a + i, m, b, n, c + i * n, n, accumulate);
  for (; i + 2 <= i1; i += 2) tile<2, NV>(pairs, a + i, m, b, n, c + i * n, n, accumulate);
  for (; i < i1; ++i) tile<1, NV>(pairs, a + i, m, b, n, c + i * n, n, accumulate);
}

// Packing buffers of the calling thread, kept between calls (a fresh allocation would fault its pages in
// every step): chunk * (M + N) words, at most kBufferWords unless M + N alone exceeds it / 16.
thread_local std::vector<uint32_t> packed;

void weight_grad(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* g, long R, long M, long N, float* out) {
  const long pairs = (R + 1) / 2;
  const long chunk = std::min({pairs, kChunk, std::max(16L, kBufferWords / (M + N))});
  packed.resize(chunk * (M + N));
  uint32_t* xp = packed.data();
  uint32_t* gp = xp + chunk * M;
  const long row_blocks = (M + kRowBlock - 1) / kRowBlock, panels = (N + kPanel - 1) / kPanel;
  for (long k0 = 0; k0 < pairs; k0 += chunk) {
    const long k1 = std::min(pairs, k0 + chunk), pieces = 16, per_piece = (k1 - k0 + pieces - 1) / pieces;
    parallel_for(pool, pieces, [&](long p) {
      const long a = k0 + p * per_piece, b = std::min(k1, a + per_piece);
      if (a >= b) return;
      pair_rows(x, R, M, a, b, xp + (a - k0) * M);
      pair_rows(g, R, N, a, b, gp + (a - k0) * N);
    });
    const bool accumulate = k0 > 0;
    parallel_for(pool, row_blocks * panels, [&](long unit) {
      const long i0 = unit / panels * kRowBlock, i1 = std::min(M, i0 + kRowBlock), j = unit % panels * kPanel;
      const uint32_t* b = gp + j;
      float* c = out + j;
      switch (std::min(kPanel, N - j) / kLanes) {
        case 4: rows<4>(i0, i1, k1 - k0, xp, M, b, N, c, accumulate); break;
        case 3: rows<3>(i0, i1, k1 - k0, xp, M, b, N, c, accumulate); break;
        case 2: rows<2>(i0, i1, k1 - k0, xp, M, b, N, c, accumulate); break;
        case 1: rows<1>(i0, i1, k1 - k0, xp, M, b, N, c, accumulate); break;
        default: break;
      }
    });
  }
}

#endif  // LLMX_BF16_DOTS

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> g,
                      ffi::Result<ffi::Buffer<ffi::F32>> out) {
#ifdef LLMX_BF16_DOTS
  const auto xd = x.dimensions(), gd = g.dimensions(), od = out->dimensions();
  if (xd.size() < 2 || gd.size() < 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("weight_grad_cpu takes x (..., M), g (..., N) and returns (M, N)");
  const long M = xd.back(), N = gd.back(), R = M ? static_cast<long>(x.element_count()) / M : 0;
  if (M == 0 || N == 0 || R * N != static_cast<long>(g.element_count()) || od[0] != M || od[1] != N || N % kLanes)
    return ffi::Error::InvalidArgument("weight_grad_cpu: x (R, M) and g (R, N) with N a multiple of 16 give (M, N)");
  weight_grad(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), reinterpret_cast<const uint16_t*>(g.typed_data()),
              R, M, N, out->typed_data());
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "weight_grad_cpu was built without AVX512-BF16");
#endif
}

}  // namespace

// Whether this build has the kernel (1: the CPU has AVX512-BF16) or only the handler that refuses (0).
extern "C" int LlmxWeightGradAvailable() {
#ifdef LLMX_BF16_DOTS
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmxWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
