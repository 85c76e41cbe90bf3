// Causal, document-masked flash attention for XLA:CPU, forward and backward, as XLA FFI handlers
// (llmx/attention/cpu.py builds this file with the host's C++ compiler and registers the handlers).
//
// Why by hand: XLA:CPU runs attention as batched 256x256x64 dots (YNNPACK reaches ~140 GFLOP/s on
// them, against ~370 for the model's projections), materialises the T x T fp32 scores and probabilities,
// transposes q/k/v into head-major layouts and back, and upcasts three of the four backward dots to
// fp32 because their transposed operands are not in a layout its bf16 dot accepts. On the bench model
// that made attention ~36 % of a training step for ~10 % of its FLOPs. This kernel is FlashAttention-2
// (Dao 2023, Alg. 1 and 2) on 64 x 64 tiles held in fp32 in the cache: scores never leave a tile, q/k/v
// are read in the model's (B, T, heads, head_dim) layout, the row statistics are fp32, and the backward
// recomputes the probabilities from the saved log-sum-exp.
//
// Layouts: q (B, T, H, D), k and v (B, S = T, K, D) in f32 or bf16, segment ids (B, T) int32; H = K * G
// (grouped-query heads share their key/value head). Token t attends key s <= t with the same segment id.
// Work is split over (batch, key/value head) pairs on XLA's intra-op thread pool: a pair owns its dK/dV,
// so the backward needs no atomics.
//
// Arithmetic: sums and softmax statistics in fp32. f32 inputs, and bf16 inputs on a CPU without
// AVX512-BF16 (or built with -DLLMX_FLASH_NO_BF16_DOTS), are widened to fp32 and multiplied with FMAs in
// GCC vector extensions (compiled with -march=native, so the same source uses AVX-512 or AVX2); bf16
// inputs on a CPU with AVX512-BF16 are multiplied with vdpbf16ps (see "bf16 dot products" below).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../cpu_pool.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;
using llmx::parallel_for;

namespace {

constexpr int kBlock = 64;  // query and key tile rows
// Floats per vector, and rows of C per matmul tile: 4 rows x 4 vectors of accumulators plus B's row
// and a broadcast fit AVX-512's 32 registers; AVX2 has 16 registers of 8 floats, hence 2 rows.
#ifdef __AVX512F__
constexpr int kLanes = 16, kRows = 4;
#else
constexpr int kLanes = 8, kRows = 2;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

// Unaligned loads and stores by intrinsics: through memcpy, GCC's AVX2 tunings (haswell, znver3) copied the
// 32 bytes as two 16-byte halves through the stack, the reload of the whole vector stalled on store
// forwarding and the accumulators spilled: built with -march=znver3, forward + backward of the bench
// model's attention took 151 ms instead of 10 (same results to the bit; measured on a Zen 4).
inline vfloat load(const float* p) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_loadu_ps(p);
#elif defined(__AVX__)
  return (vfloat)_mm256_loadu_ps(p);
#else
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}
inline void store(float* p, vfloat v) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_storeu_ps(p, (__m256)v);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}
#ifdef __AVX512F__
inline vfloat splat(float x) { return vfloat{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
inline vfloat splat(float x) { return vfloat{x, x, x, x, x, x, x, x}; }
#endif

// ------------------------------------------------------------------ element types

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T>
T from_float(float x);
template <>
float from_float<float>(float x) {
  return x;
}
template <>
uint16_t from_float<uint16_t>(float x) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// exp of a vector: 2^n * p(r), r in [-ln2/2, ln2/2], degree-6 polynomial (relative error ~2e-7); inputs
// below -87 give 0 (masked scores are -inf).
typedef int vint __attribute__((vector_size(kLanes * sizeof(int))));

inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f);
  vfloat xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  vfloat t = xc * 1.44269504088896341f + 0.5f;
  vfloat n = __builtin_convertvector(__builtin_convertvector(t, vint), vfloat);
  n = n > t ? n - 1.0f : n;  // floor
  vfloat r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vfloat p = splat(1.0f / 720) * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? splat(0.0f) : p * scale;
}

// ------------------------------------------------------------------ the one matmul shape
//
// C (M x N) += A (M x K) * B (K x N): A read element by element at a[i * a_row + k * a_col] (so a
// transposed A costs nothing), B and C row-major with N contiguous. M is a multiple of 4 and N of 16.
// kRows rows x four vectors of C stay in registers while k runs.

template <int NV, bool kAccumulate>
inline void gemm_tile(int K, const float* a, long a_row, long a_col, const float* b, long b_row, float* c,
                      long c_row) {
  vfloat acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? load(c + r * c_row + v * kLanes) : vfloat{};
  for (int k = 0; k < K; ++k) {
    vfloat bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = load(b + k * b_row + v * kLanes);
      __asm__("" : "+v"(bv[v]));  // keep B's row in registers: GCC otherwise reloads it for every row of A
    }
    for (int r = 0; r < kRows; ++r) {
      vfloat av = splat(a[r * a_row + k * a_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * c_row + v * kLanes, acc[r][v]);
}

// Which part of a causal diagonal tile (query block == key block) a matmul computes: row i of a score
// tile needs keys j <= i only, and a matmul contracting over keys needs keys <= i only. kNone: all of
// it; kColumns: for rows i .. i + rows - 1 the columns up to i + rows - 1, rounded up to a vector (the
// others of C are zero, or left as they were with kAccumulate); kDepth: for those rows the contraction
// up to i + rows - 1. On the bench model (T = 256) 4 of each row's 10 score tiles are diagonal.
enum class Causal { kNone, kColumns, kDepth };

inline int columns_needed(Causal causal, int i, int rows, int N) {
  return causal == Causal::kColumns ? std::min(N, (i + rows + kLanes - 1) / kLanes * kLanes) : N;
}
inline int depth_needed(Causal causal, int i, int rows, int K) {
  return causal == Causal::kDepth ? std::min(K, i + rows) : K;
}

// The parts of score tile (q0, k0) its matmuls compute: the score-shaped ones (S, dP) and the ones contracting
// over its keys (P V, dS K).
struct TileParts {
  Causal scores, over_keys;
};
inline TileParts tile_parts(long q0, long k0) {
  return q0 == k0 ? TileParts{Causal::kColumns, Causal::kDepth} : TileParts{Causal::kNone, Causal::kNone};
}

// C (M x N) = A * B, or C += A * B with kAccumulate.
template <bool kAccumulate = true>
void gemm(int M, int N, int K, const float* a, long a_row, long a_col, const float* b, long b_row, float* c,
          long c_row, Causal causal = Causal::kNone) {
  for (int i = 0; i < M; i += kRows) {
    const float* ai = a + i * a_row;
    float* ci = c + i * c_row;
    const int n_end = columns_needed(causal, i, kRows, N), k_end = depth_needed(causal, i, kRows, K);
    int n = 0;
    for (; n + 4 * kLanes <= n_end; n += 4 * kLanes)
      gemm_tile<4, kAccumulate>(k_end, ai, a_row, a_col, b + n, b_row, ci + n, c_row);
    switch ((n_end - n) / kLanes) {
      case 3: gemm_tile<3, kAccumulate>(k_end, ai, a_row, a_col, b + n, b_row, ci + n, c_row); break;
      case 2: gemm_tile<2, kAccumulate>(k_end, ai, a_row, a_col, b + n, b_row, ci + n, c_row); break;
      case 1: gemm_tile<1, kAccumulate>(k_end, ai, a_row, a_col, b + n, b_row, ci + n, c_row); break;
      default: break;
    }
    if (!kAccumulate)
      for (int r = 0; r < kRows; ++r) std::fill(ci + r * c_row + n_end, ci + r * c_row + N, 0.0f);
  }
}

// ------------------------------------------------------------------ per (batch, kv head) buffers

#ifdef __AVX512F__
// 16 x 16 32-bit elements in registers, transposed: r[i] holds row i before and column i after (unpack
// pairs of rows, then 64-bit and 128-bit shuffles). Where the kernel transposes k, v and the dK, dV
// accumulators, a gather per column (16 loads) or a scalar loop took half the bf16 backward's time
// outside its matmuls and a tenth of the fp32 kernel's.
inline void transpose16(__m512 r[kLanes]) {
  __m512 t[kLanes];
  for (int i = 0; i < kLanes; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < kLanes; i += 4) {  // r[4g + c], lane k: column 4k + c of rows 4g .. 4g + 3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xDD);
    t[c + 8] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xDD);
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xDD);
  }
}
#endif

struct Dims {
  long B, T, H, K, D, G, Tp;  // Tp: T rounded up to the tile
  float scale;
};

template <typename T>
void widen_rows(const T* src, long row_stride, long rows, long D, float scale, float* dst) {
  for (long r = 0; r < rows; ++r)
    for (long d = 0; d < D; ++d) dst[r * D + d] = to_float(src[r * row_stride + d]) * scale;
}

// k or v of one (batch, kv head) as fp32 rows (Tp x D) and transposed (D x Tp); padding rows are zero.
template <typename T>
void load_kv(const Dims& s, const T* x, long b, long kvh, float* rows, float* cols) {
  std::fill(rows, rows + s.Tp * s.D, 0.0f);
  widen_rows(x + (b * s.T * s.K + kvh) * s.D, s.K * s.D, s.T, s.D, 1.0f, rows);
  if (!cols) return;
#ifdef __AVX512F__
  for (long t = 0; t < s.Tp; t += kLanes)  // rows past T are zero, Tp and D are multiples of 16
    for (long d = 0; d < s.D; d += kLanes) {
      __m512 r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = _mm512_loadu_ps(rows + (t + i) * s.D + d);
      transpose16(r);
      for (int c = 0; c < kLanes; ++c) _mm512_storeu_ps(cols + (d + c) * s.Tp + t, r[c]);
    }
#else
  for (long t = 0; t < s.Tp; ++t)
    for (long d = 0; d < s.D; ++d) cols[d * s.Tp + t] = rows[t * s.D + d];
#endif
}

// Per 64-token block of a row's segment ids: the id if the whole block has one (padding past T
// counts as a different document), else -1 (ids are >= 0).
std::vector<long> uniform_blocks(const Dims& s, const int32_t* seg) {
  std::vector<long> out(s.Tp / kBlock);
  for (long blk = 0; blk < s.Tp / kBlock; ++blk) {
    long first = seg[blk * kBlock], ok = blk * kBlock + kBlock <= s.T;
    for (long t = blk * kBlock; ok && t < blk * kBlock + kBlock; ++t) ok = seg[t] == first;
    out[blk] = ok ? first : -1;
  }
  return out;
}

// Masks a 64 x 64 score tile to -inf where the key is in the future or in another document (and for
// padding keys). A tile wholly in the past of one document needs no mask.
void mask_tile(const Dims& s, long q0, long k0, const int32_t* seg, const std::vector<long>& uniform, float* out) {
  const long uq = uniform[q0 / kBlock], uk = uniform[k0 / kBlock];
  if (k0 + kBlock <= q0 && uq >= 0 && uq == uk) return;
  vint key_seg[kBlock / kLanes], key_pos[kBlock / kLanes];
  for (int v = 0; v < kBlock / kLanes; ++v)
    for (int lane = 0; lane < kLanes; ++lane) {
      const long kj = k0 + v * kLanes + lane;
      key_seg[v][lane] = kj < s.T ? seg[kj] : -1;
      key_pos[v][lane] = static_cast<int>(kj);
    }
  const vfloat neg_inf = splat(-INFINITY);
  for (long i = 0; i < kBlock; ++i) {
    const int qs = q0 + i < s.T ? seg[q0 + i] : -2;
    const int qpos = static_cast<int>(q0 + i);
    float* row = out + i * kBlock;
    for (int v = 0; v < kBlock / kLanes; ++v) {
      const vint live = (key_seg[v] == qs) & (key_pos[v] <= qpos);
      store(row + v * kLanes, live ? load(row + v * kLanes) : neg_inf);
    }
  }
}

#ifdef __AVX512F__
inline float hmax(vfloat x) { return _mm512_reduce_max_ps((__m512)x); }
inline float hsum(vfloat x) { return _mm512_reduce_add_ps((__m512)x); }
#else
inline float hmax(vfloat x) {
  float m = x[0];
  for (int lane = 1; lane < kLanes; ++lane) m = std::max(m, x[lane]);
  return m;
}
inline float hsum(vfloat x) {
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) total += x[lane];
  return total;
}
#endif

// The online softmax of one masked score tile (FlashAttention-2 Alg. 1): running max m and sum l per
// row, the tile turned into exp(s - m) in place, the output accumulator acc (64 x D) rescaled.
void online_softmax(float* sc, float* m, float* l, float* acc, long D) {
  for (long i = 0; i < kBlock; ++i) {
    float* row = sc + i * kBlock;
    vfloat mv = load(row);
    for (long j = kLanes; j < kBlock; j += kLanes) mv = mv > load(row + j) ? mv : load(row + j);
    const float mx = std::max(m[i], hmax(mv));
    if (mx == -INFINITY) {  // no live key so far (a document that starts later, a padding row)
      std::fill(row, row + kBlock, 0.0f);
      continue;
    }
    const float alpha = std::exp(m[i] - mx);
    vfloat sum{};
    for (long j = 0; j < kBlock; j += kLanes) {
      vfloat p = vexp(load(row + j) - mx);
      store(row + j, p);
      sum += p;
    }
    l[i] = l[i] * alpha + hsum(sum);
    m[i] = mx;
    if (alpha != 1.0f) {
      float* a = acc + i * D;
      for (long d = 0; d < D; d += kLanes) store(a + d, load(a + d) * alpha);
    }
  }
}

// Probabilities of a masked score tile from the forward's log-sum-exp per row, in place.
void probabilities(float* p, const float* row_lse) {
  for (long i = 0; i < kBlock; ++i) {
    float* row = p + i * kBlock;
    for (long j = 0; j < kBlock; j += kLanes) store(row + j, vexp(load(row + j) - row_lse[i]));
  }
}

// dS = P * (dP - delta), into dp.
void score_grads(float* dp, const float* p, const float* delta) {
  for (long i = 0; i < kBlock; ++i) {
    const vfloat di = splat(delta[i]);
    for (long j = 0; j < kBlock; j += kLanes)
      store(dp + i * kBlock + j, load(p + i * kBlock + j) * (load(dp + i * kBlock + j) - di));
  }
}

template <typename T>
inline vfloat widen(const T* p) {  // kLanes elements as fp32
  vfloat v;
  for (int lane = 0; lane < kLanes; ++lane) v[lane] = to_float(p[lane]);
  return v;
}

// delta_i = sum_d dO_i,d O_i,d for the tile's rows (0 for padding rows), and their log-sum-exp (+inf for
// padding rows, so their probabilities are 0). The sums run in vectors: a scalar loop is one dependent
// add per element, 4 cycles each, and took a fifth of the bf16 backward's own time outside the matmuls.
template <typename T>
void row_stats(const Dims& s, const T* dout, const T* o, const float* lse, long offset, long stride, long rows,
               long lse_offset, float* delta, float* row_lse) {
  for (long i = 0; i < kBlock; ++i) {
    vfloat sum{};
    if (i < rows)
      for (long d = 0; d < s.D; d += kLanes)
        sum += widen(dout + offset + i * stride + d) * widen(o + offset + i * stride + d);
    delta[i] = hsum(sum);
    row_lse[i] = i < rows ? lse[lse_offset + i] : INFINITY;
  }
}

// ------------------------------------------------------------------ forward

template <typename T>
void forward_pair(const Dims& s, const T* q, const T* k, const T* v, const int32_t* segment_ids, T* o,
                  float* lse, long pair) {
  const long b = pair / s.K, kvh = pair % s.K, D = s.D;
  std::vector<float> kt(D * s.Tp), vr(s.Tp * D), qt(kBlock * D), sc(kBlock * kBlock), acc(kBlock * D);
  std::vector<float> m(kBlock), l(kBlock);
  load_kv(s, k, b, kvh, vr.data(), kt.data());  // k^T into kt (vr is scratch here)
  load_kv(s, v, b, kvh, vr.data(), nullptr);
  const int32_t* seg = segment_ids + b * s.T;
  const std::vector<long> uniform = uniform_blocks(s, seg);
  for (long g = 0; g < s.G; ++g) {
    const long h = kvh * s.G + g;
    for (long q0 = 0; q0 < s.T; q0 += kBlock) {
      const long rows = std::min<long>(kBlock, s.T - q0);
      std::fill(qt.begin(), qt.end(), 0.0f);
      widen_rows(q + ((b * s.T + q0) * s.H + h) * D, s.H * D, rows, D, s.scale, qt.data());
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (long k0 = 0; k0 < q0 + rows; k0 += kBlock) {
        const TileParts part = tile_parts(q0, k0);
        gemm<false>(kBlock, kBlock, D, qt.data(), D, 1, kt.data() + k0, s.Tp, sc.data(), kBlock, part.scores);  // S = Qs K^T
        mask_tile(s, q0, k0, seg, uniform, sc.data());
        online_softmax(sc.data(), m.data(), l.data(), acc.data(), D);
        gemm(kBlock, D, kBlock, sc.data(), kBlock, 1, vr.data() + k0 * D, D, acc.data(), D, part.over_keys);  // O += P V
      }
      for (long i = 0; i < rows; ++i) {
        const float inv = 1.0f / l[i];
        T* out = o + ((b * s.T + q0 + i) * s.H + h) * D;
        for (long d = 0; d < D; ++d) out[d] = from_float<T>(acc[i * D + d] * inv);
        lse[(b * s.H + h) * s.T + q0 + i] = m[i] + std::log(l[i]);
      }
    }
  }
}

// ------------------------------------------------------------------ backward

template <typename T>
void backward_pair(const Dims& s, const T* q, const T* k, const T* v, const int32_t* segment_ids, const T* o,
                   const float* lse, const T* dout, T* dq, T* dk, T* dv, long pair) {
  const long b = pair / s.K, kvh = pair % s.K, D = s.D;
  std::vector<float> kr(s.Tp * D), kt(D * s.Tp), vr(s.Tp * D), vt(D * s.Tp);
  std::vector<float> dk_acc(s.Tp * D, 0.0f), dv_acc(s.Tp * D, 0.0f);
  std::vector<float> qt(kBlock * D), dot(kBlock * D), dq_acc(kBlock * D), p(kBlock * kBlock),
      dp(kBlock * kBlock), delta(kBlock), row_lse(kBlock);
  load_kv(s, k, b, kvh, kr.data(), kt.data());
  load_kv(s, v, b, kvh, vr.data(), vt.data());
  const int32_t* seg = segment_ids + b * s.T;
  const std::vector<long> uniform = uniform_blocks(s, seg);
  for (long g = 0; g < s.G; ++g) {
    const long h = kvh * s.G + g;
    for (long q0 = 0; q0 < s.T; q0 += kBlock) {
      const long rows = std::min<long>(kBlock, s.T - q0);
      const long offset = ((b * s.T + q0) * s.H + h) * D, stride = s.H * D;
      std::fill(qt.begin(), qt.end(), 0.0f);
      std::fill(dot.begin(), dot.end(), 0.0f);
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      widen_rows(q + offset, stride, rows, D, s.scale, qt.data());
      widen_rows(dout + offset, stride, rows, D, 1.0f, dot.data());
      row_stats(s, dout, o, lse, offset, stride, rows, (b * s.H + h) * s.T + q0, delta.data(), row_lse.data());
      for (long k0 = 0; k0 < q0 + rows; k0 += kBlock) {
        const TileParts part = tile_parts(q0, k0);
        gemm<false>(kBlock, kBlock, D, qt.data(), D, 1, kt.data() + k0, s.Tp, p.data(), kBlock, part.scores);  // S = Qs K^T
        mask_tile(s, q0, k0, seg, uniform, p.data());
        probabilities(p.data(), row_lse.data());
        gemm(kBlock, D, kBlock, p.data(), 1, kBlock, dot.data(), D, dv_acc.data() + k0 * D, D);  // dV += P^T dO
        // dP = dO V^T
        gemm<false>(kBlock, kBlock, D, dot.data(), D, 1, vt.data() + k0, s.Tp, dp.data(), kBlock, part.scores);
        score_grads(dp.data(), p.data(), delta.data());
        gemm(kBlock, D, kBlock, dp.data(), 1, kBlock, qt.data(), D, dk_acc.data() + k0 * D, D);  // dK += dS^T Qs
        gemm(kBlock, D, kBlock, dp.data(), kBlock, 1, kr.data() + k0 * D, D, dq_acc.data(), D, part.over_keys);  // dQ += dS K
      }
      for (long i = 0; i < rows; ++i)
        for (long d = 0; d < D; ++d) dq[offset + i * stride + d] = from_float<T>(dq_acc[i * D + d] * s.scale);
    }
  }
  for (long t = 0; t < s.T; ++t) {
    const long offset = ((b * s.T + t) * s.K + kvh) * D;
    for (long d = 0; d < D; ++d) {
      dk[offset + d] = from_float<T>(dk_acc[t * D + d]);
      dv[offset + d] = from_float<T>(dv_acc[t * D + d]);
    }
  }
}

// ------------------------------------------------------------------ bf16 dot products (AVX512-BF16)
//
// On a CPU with AVX512-BF16 (this file is compiled for the host), bf16 inputs take the same loops with
// their matmuls as vdpbf16ps: bf16 x bf16 products summed in fp32, twice the FMA path's rate. The
// probabilities and score gradients are rounded to bf16 for those matmuls, as XLA's bf16 attention
// rounds them. An operand B is "paired" along the contraction: element (kk, n) is the 32-bit word
// (B[2kk][n], B[2kk+1][n]), so one vector holds 16 columns' pairs; A is bf16 rows, read a pair at a time.

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(LLMX_FLASH_NO_BF16_DOTS)
#define LLMX_BF16_DOTS 1
static_assert(kLanes == 16, "the bf16 path works in 512-bit vectors");

template <int NV, bool kAccumulate>
inline void bf16_tile(long pairs, const uint16_t* a, long a_row, const uint32_t* b, long b_row, float* c, long c_row) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? _mm512_loadu_ps(c + r * c_row + v * kLanes) : _mm512_setzero_ps();
  for (long kk = 0; kk < pairs; ++kk) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_loadu_si512(b + kk * b_row + v * kLanes);
      __asm__("" : "+v"(bv[v]));
    }
    for (int r = 0; r < 4; ++r) {
      uint32_t word;
      std::memcpy(&word, a + r * a_row + 2 * kk, sizeof(word));
      const __m512i av = _mm512_set1_epi32(static_cast<int>(word));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * c_row + v * kLanes, acc[r][v]);
}

// C (M x N) (+)= A (M x K bf16 rows) * B (K x N, paired: K/2 rows of N words). M % 4 == 0, N % 16 == 0, K even.
template <bool kAccumulate = true>
void gemm_bf16(int M, int N, int K, const uint16_t* a, long a_row, const uint32_t* b, long b_row, float* c,
               long c_row, Causal causal = Causal::kNone) {
  for (int i = 0; i < M; i += 4) {
    const int n_end = columns_needed(causal, i, 4, N), pairs = depth_needed(causal, i, 4, K) / 2;
    const uint16_t* ai = a + i * a_row;
    float* ci = c + i * c_row;
    int n = 0;
    for (; n + 4 * kLanes <= n_end; n += 4 * kLanes)
      bf16_tile<4, kAccumulate>(pairs, ai, a_row, b + n, b_row, ci + n, c_row);
    switch ((n_end - n) / kLanes) {
      case 3: bf16_tile<3, kAccumulate>(pairs, ai, a_row, b + n, b_row, ci + n, c_row); break;
      case 2: bf16_tile<2, kAccumulate>(pairs, ai, a_row, b + n, b_row, ci + n, c_row); break;
      case 1: bf16_tile<1, kAccumulate>(pairs, ai, a_row, b + n, b_row, ci + n, c_row); break;
      default: break;
    }
    if (!kAccumulate)
      for (int r = 0; r < 4; ++r) std::fill(ci + r * c_row + n_end, ci + r * c_row + N, 0.0f);
  }
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16; }

// Gather offsets 0, stride, ..., 15 * stride (in elements of the gathered base pointer's scale).
inline __m512i strided_index(long stride) {
  alignas(64) int offsets[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) offsets[lane] = static_cast<int>(lane * stride);
  return _mm512_load_si512(offsets);
}

// vpermw index pairing a vector's low 16 halves with its high 16: out word j = (in[j], in[16 + j]).
inline __m512i interleave_halves() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19,
                          3, 18, 2, 17, 1, 16, 0);
}

// n floats (n % 16 == 0) times scale, rounded to bf16 16 at a time. vcvtneps2bf16 rounds to nearest even
// like from_float; it reads fp32 denormals (< 1.2e-38) as zero.
inline void store_bf16(const float* x, float scale, long n, uint16_t* out) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (long i = 0; i < n; i += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + i), sc)));
}

// The same for 16 rows of 16 32-bit words read at src + i * stride (in 16-bit elements): out[c] is word
// column c of the 16 rows.
inline void transposed_words(const uint16_t* src, long stride, __m512 out[kLanes]) {
  for (int i = 0; i < kLanes; ++i) out[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(src + i * stride));
  transpose16(out);
}

// Rows t of a transposed accumulator (D x Tp, fp32, zero past T) as bf16 rows of out (row t at
// out + t * row_stride), 16 x 16 blocks at a time.
void store_transposed_bf16(const Dims& s, const float* xt, uint16_t* out, long row_stride) {
  for (long t = 0; t < s.T; t += kLanes)
    for (long d = 0; d < s.D; d += kLanes) {
      __m512 r[kLanes];
      for (int i = 0; i < kLanes; ++i) r[i] = _mm512_loadu_ps(xt + (d + i) * s.Tp + t);
      transpose16(r);
      for (int i = 0; i < kLanes && t + i < s.T; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (t + i) * row_stride + d),
                            (__m256i)_mm512_cvtneps_pbh(r[i]));
    }
}

// A 64 x 64 fp32 tile as bf16 rows (64 x 64).
void tile_rows_bf16(const float* x, uint16_t* out) {
  for (long i = 0; i < kBlock * kBlock; i += 2 * kLanes) {
    const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + kLanes), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, (__m512i)both);
  }
}

// A 64 x 64 fp32 tile paired along its rows: out[ii][j] = (x[2ii][j], x[2ii+1][j]) (32 x 64 words).
void tile_row_pairs(const float* x, uint32_t* out) {
  const __m512i interleave = interleave_halves();
  for (long ii = 0; ii < kBlock / 2; ++ii)
    for (long j = 0; j < kBlock; j += kLanes) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + (2 * ii + 1) * kBlock + j),
                                                _mm512_loadu_ps(x + 2 * ii * kBlock + j));
      _mm512_storeu_si512(out + ii * kBlock + j, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
}

// One (batch, kv head) pair's keys and values, paired for the four shapes that read them, zero past T.
struct PairedKV {
  std::vector<uint32_t> kt, v, vt, k;  // K^T and V^T paired along D ((D/2) x Tp); V and K paired along keys ((Tp/2) x D)
};

void paired_kv(const Dims& s, const uint16_t* k, const uint16_t* v, long b, long kvh, bool backward, PairedKV* out) {
  const long D = s.D, half = s.D / 2, stride = s.K * s.D;
  const uint16_t* k0 = k + (b * s.T * s.K + kvh) * D;
  const uint16_t* v0 = v + (b * s.T * s.K + kvh) * D;
  const __m512i rows_index = strided_index(stride);
  auto along_d = [&](const uint16_t* x, std::vector<uint32_t>& dst) {  // word (t, dd) = x[t][2dd], x[t][2dd + 1]
    dst.assign(half * s.Tp, 0u);
    const long full = s.T / kLanes * kLanes;
    const long blocked = half / kLanes * kLanes;  // word columns transposed 16 x 16 at a time
    for (long t = 0; t < full; t += kLanes) {
      for (long dd = 0; dd < blocked; dd += kLanes) {
        __m512 words[kLanes];
        transposed_words(x + t * stride + 2 * dd, stride, words);
        for (int c = 0; c < kLanes; ++c)
          _mm512_storeu_ps(reinterpret_cast<float*>(dst.data() + (dd + c) * s.Tp + t), words[c]);
      }
      for (long dd = blocked; dd < half; ++dd)  // 16 rows' words of one column pair, gathered
        _mm512_storeu_si512(dst.data() + dd * s.Tp + t, _mm512_i32gather_epi32(rows_index, x + t * stride + 2 * dd, 2));
    }
    for (long t = full; t < s.T; ++t)
      for (long dd = 0; dd < half; ++dd) dst[dd * s.Tp + t] = pair(x[t * stride + 2 * dd], x[t * stride + 2 * dd + 1]);
  };
  const __m512i interleave = interleave_halves();
  auto along_keys = [&](const uint16_t* x, std::vector<uint32_t>& dst) {  // rows t and t + 1 interleaved
    dst.assign(s.Tp / 2 * D, 0u);
    for (long t = 0; t < s.T; t += 2)
      for (long d = 0; d < D; d += kLanes) {
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * stride + d));
        const __m256i odd = t + 1 < s.T ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (t + 1) * stride + d))
                                        : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
        _mm512_storeu_si512(dst.data() + t / 2 * D + d, _mm512_permutexvar_epi16(interleave, both));
      }
  };
  along_d(k0, out->kt);
  along_keys(v0, out->v);
  if (backward) {
    along_d(v0, out->vt);
    along_keys(k0, out->k);
  }
}

// A query tile's rows as bf16 (64 x D, zero past the last row), optionally scaled, and transposed (D x 64).
void query_tile(const Dims& s, const uint16_t* src, long stride, long rows, float scale, uint16_t* out, uint16_t* out_t) {
  const long D = s.D;
  std::fill(out, out + kBlock * D, uint16_t{0});
  const __m512 sc = _mm512_set1_ps(scale);
  for (long i = 0; i < rows; ++i) {
    if (scale == 1.0f) {
      std::memcpy(out + i * D, src + i * stride, D * sizeof(uint16_t));
      continue;
    }
    for (long d = 0; d < D; d += kLanes) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * stride + d));
      const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * D + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(x, sc)));
    }
  }
  if (!out_t) return;
  // Transposed 16 rows x 2 columns at a time: a gather of the 32-bit words (row i: columns d, d + 1), whose
  // even halves are column d's 16 entries and odd halves column d + 1's.
  const __m512i rows_index = strided_index(D);
  const __m512i separate = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22,
                                            20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const long blocked = D / (2 * kLanes) * (2 * kLanes);  // 16 rows x 32 columns by a register transpose
  for (long i0 = 0; i0 < kBlock; i0 += kLanes) {
    for (long d0 = 0; d0 < blocked; d0 += 2 * kLanes) {
      __m512 words[kLanes];
      transposed_words(out + i0 * D + d0, D, words);
      for (int c = 0; c < kLanes; ++c) {
        const long d = d0 + 2 * c;
        const __m512i halves = _mm512_permutexvar_epi16(separate, _mm512_castps_si512(words[c]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_t + d * kBlock + i0), _mm512_castsi512_si256(halves));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_t + (d + 1) * kBlock + i0),
                            _mm512_extracti64x4_epi64(halves, 1));
      }
    }
    for (long d = blocked; d < D; d += 2) {
      const __m512i words = _mm512_i32gather_epi32(rows_index, out + i0 * D + d, 2);
      const __m512i halves = _mm512_permutexvar_epi16(separate, words);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_t + d * kBlock + i0), _mm512_castsi512_si256(halves));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_t + (d + 1) * kBlock + i0), _mm512_extracti64x4_epi64(halves, 1));
    }
  }
}

void forward_pair_bf16(const Dims& s, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                       const int32_t* segment_ids, uint16_t* o, float* lse, long pair_index) {
  const long b = pair_index / s.K, kvh = pair_index % s.K, D = s.D;
  PairedKV kv;
  paired_kv(s, k, v, b, kvh, false, &kv);
  std::vector<uint16_t> qt(kBlock * D), pt(kBlock * kBlock);
  std::vector<float> sc(kBlock * kBlock), acc(kBlock * D), m(kBlock), l(kBlock);
  const int32_t* seg = segment_ids + b * s.T;
  const std::vector<long> uniform = uniform_blocks(s, seg);
  for (long g = 0; g < s.G; ++g) {
    const long h = kvh * s.G + g;
    for (long q0 = 0; q0 < s.T; q0 += kBlock) {
      const long rows = std::min<long>(kBlock, s.T - q0);
      query_tile(s, q + ((b * s.T + q0) * s.H + h) * D, s.H * D, rows, s.scale, qt.data(), nullptr);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (long k0 = 0; k0 < q0 + rows; k0 += kBlock) {
        const TileParts part = tile_parts(q0, k0);
        // S = Qs K^T
        gemm_bf16<false>(kBlock, kBlock, D, qt.data(), D, kv.kt.data() + k0, s.Tp, sc.data(), kBlock, part.scores);
        mask_tile(s, q0, k0, seg, uniform, sc.data());
        online_softmax(sc.data(), m.data(), l.data(), acc.data(), D);
        tile_rows_bf16(sc.data(), pt.data());
        // O += P V
        gemm_bf16(kBlock, D, kBlock, pt.data(), kBlock, kv.v.data() + k0 / 2 * D, D, acc.data(), D, part.over_keys);
      }
      for (long i = 0; i < rows; ++i) {
        store_bf16(acc.data() + i * D, 1.0f / l[i], D, o + ((b * s.T + q0 + i) * s.H + h) * D);
        lse[(b * s.H + h) * s.T + q0 + i] = m[i] + std::log(l[i]);
      }
    }
  }
}

void backward_pair_bf16(const Dims& s, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                        const int32_t* segment_ids, const uint16_t* o, const float* lse, const uint16_t* dout,
                        uint16_t* dq, uint16_t* dk, uint16_t* dv, long pair_index) {
  const long b = pair_index / s.K, kvh = pair_index % s.K, D = s.D;
  PairedKV kv;
  paired_kv(s, k, v, b, kvh, true, &kv);
  // dK and dV are accumulated transposed (D x Tp): dV^T += dO^T P and dK^T += Qs^T dS read P and dS
  // paired along queries, which two rows of the tile give without a transpose.
  std::vector<float> dkt(D * s.Tp, 0.0f), dvt(D * s.Tp, 0.0f);
  std::vector<uint16_t> qt(kBlock * D), qt_t(D * kBlock), dot(kBlock * D), dot_t(D * kBlock), ds_rows(kBlock * kBlock);
  std::vector<uint32_t> p_pairs(kBlock / 2 * kBlock), ds_pairs(kBlock / 2 * kBlock);
  std::vector<float> p(kBlock * kBlock), dp(kBlock * kBlock), dq_acc(kBlock * D), delta(kBlock), row_lse(kBlock);
  const int32_t* seg = segment_ids + b * s.T;
  const std::vector<long> uniform = uniform_blocks(s, seg);
  for (long g = 0; g < s.G; ++g) {
    const long h = kvh * s.G + g;
    for (long q0 = 0; q0 < s.T; q0 += kBlock) {
      const long rows = std::min<long>(kBlock, s.T - q0);
      const long offset = ((b * s.T + q0) * s.H + h) * D, stride = s.H * D;
      query_tile(s, q + offset, stride, rows, s.scale, qt.data(), qt_t.data());
      query_tile(s, dout + offset, stride, rows, 1.0f, dot.data(), dot_t.data());
      row_stats(s, dout, o, lse, offset, stride, rows, (b * s.H + h) * s.T + q0, delta.data(), row_lse.data());
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      for (long k0 = 0; k0 < q0 + rows; k0 += kBlock) {
        const TileParts part = tile_parts(q0, k0);
        // S = Qs K^T
        gemm_bf16<false>(kBlock, kBlock, D, qt.data(), D, kv.kt.data() + k0, s.Tp, p.data(), kBlock, part.scores);
        mask_tile(s, q0, k0, seg, uniform, p.data());
        probabilities(p.data(), row_lse.data());
        tile_row_pairs(p.data(), p_pairs.data());
        gemm_bf16(D, kBlock, kBlock, dot_t.data(), kBlock, p_pairs.data(), kBlock, dvt.data() + k0, s.Tp);  // dV^T += dO^T P
        // dP = dO V^T
        gemm_bf16<false>(kBlock, kBlock, D, dot.data(), D, kv.vt.data() + k0, s.Tp, dp.data(), kBlock, part.scores);
        score_grads(dp.data(), p.data(), delta.data());
        tile_row_pairs(dp.data(), ds_pairs.data());
        gemm_bf16(D, kBlock, kBlock, qt_t.data(), kBlock, ds_pairs.data(), kBlock, dkt.data() + k0, s.Tp);  // dK^T += Qs^T dS
        tile_rows_bf16(dp.data(), ds_rows.data());
        // dQ += dS K
        gemm_bf16(kBlock, D, kBlock, ds_rows.data(), kBlock, kv.k.data() + k0 / 2 * D, D, dq_acc.data(), D, part.over_keys);
      }
      for (long i = 0; i < rows; ++i) store_bf16(dq_acc.data() + i * D, s.scale, D, dq + offset + i * stride);
    }
  }
  const long first = (b * s.T * s.K + kvh) * D;
  store_transposed_bf16(s, dkt.data(), dk + first, s.K * D);
  store_transposed_bf16(s, dvt.data(), dv + first, s.K * D);
}
#endif  // AVX512-BF16

// The bf16 path this build runs: bf16 dot instructions, or the widening loops.
#ifdef LLMX_BF16_DOTS
constexpr auto forward_bf16 = forward_pair_bf16;
constexpr auto backward_bf16 = backward_pair_bf16;
#else
constexpr auto forward_bf16 = forward_pair<uint16_t>;
constexpr auto backward_bf16 = backward_pair<uint16_t>;
#endif

// ------------------------------------------------------------------ FFI entry points

ffi::Error dims_of(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, Dims* s) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be (B, T, heads, head_dim)");
  s->B = qd[0], s->T = qd[1], s->H = qd[2], s->D = qd[3], s->K = kd[2];
  if (kd[0] != s->B || kd[1] != s->T || kd[3] != s->D || s->K == 0 || s->H % s->K)
    return ffi::Error::InvalidArgument("k, v must be (B, T, kv_heads, head_dim) with kv_heads dividing heads");
  if (s->D % 16) return ffi::Error::InvalidArgument("head_dim must be a multiple of 16");
  s->G = s->H / s->K;
  s->Tp = (s->T + kBlock - 1) / kBlock * kBlock;
  s->scale = 1.0f / std::sqrt(static_cast<float>(s->D));
  return ffi::Error::Success();
}

template <typename T>
T* data(ffi::AnyBuffer& x) {
  return static_cast<T*>(x.untyped_data());
}
template <typename T>
const T* data(const ffi::AnyBuffer& x) {
  return static_cast<const T*>(x.untyped_data());
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> segment_ids, ffi::Result<ffi::AnyBuffer> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  Dims s;
  if (auto err = dims_of(q, k, &s); err.failure()) return err;
  const int32_t* seg = segment_ids.typed_data();
  float* lse_out = lse->typed_data();
  if (q.element_type() == ffi::F32) {
    parallel_for(pool, s.B * s.K, [&](long pair) {
      forward_pair<float>(s, data<float>(q), data<float>(k), data<float>(v), seg, data<float>(*o), lse_out, pair);
    });
  } else if (q.element_type() == ffi::BF16) {
    parallel_for(pool, s.B * s.K, [&](long pair) {
      forward_bf16(s, data<uint16_t>(q), data<uint16_t>(k), data<uint16_t>(v), seg, data<uint16_t>(*o), lse_out, pair);
    });
  } else {
    return ffi::Error::InvalidArgument("flash_cpu takes f32 or bf16");
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::S32> segment_ids, ffi::AnyBuffer o, ffi::Buffer<ffi::F32> lse,
                    ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv) {
  Dims s;
  if (auto err = dims_of(q, k, &s); err.failure()) return err;
  const int32_t* seg = segment_ids.typed_data();
  const float* lse_in = lse.typed_data();
  if (q.element_type() == ffi::F32) {
    parallel_for(pool, s.B * s.K, [&](long pair) {
      backward_pair<float>(s, data<float>(q), data<float>(k), data<float>(v), seg, data<float>(o), lse_in,
                           data<float>(dout), data<float>(*dq), data<float>(*dk), data<float>(*dv), pair);
    });
  } else if (q.element_type() == ffi::BF16) {
    parallel_for(pool, s.B * s.K, [&](long pair) {
      backward_bf16(s, data<uint16_t>(q), data<uint16_t>(k), data<uint16_t>(v), seg, data<uint16_t>(o), lse_in,
                    data<uint16_t>(dout), data<uint16_t>(*dq), data<uint16_t>(*dk), data<uint16_t>(*dv), pair);
    });
  } else {
    return ffi::Error::InvalidArgument("flash_cpu takes f32 or bf16");
  }
  return ffi::Error::Success();
}

}  // namespace

// Whether this build runs bf16 inputs through vdpbf16ps (1) or widens them to fp32 (0).
extern "C" int LlmxFlashBf16Dots() {
#ifdef LLMX_BF16_DOTS
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmxFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmxFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
