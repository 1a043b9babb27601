// Quantized matrix products for XLA:CPU, called from jit-compiled programs through the XLA FFI.
//
// Weights are packed once (see jaxopt_serve/native/__init__.py):
//   int8:  (P, Kp / 4 + 1, 16, 4) int8, panels of 16 output columns by quads of inputs, Kp = K rounded up to
//          a multiple of 32, zero padded; each panel's last quad holds its 16 column sums as int32 (the
//          correction for an activation zero point, and for the VNNI path's offset activations);
//   int4:  (P, Kp / 2, 8) uint8, panels of 8 output columns, two 4-bit codes per byte (inputs 2 kk and
//          2 kk + 1, low nibble first), with per-group float scales and zero points (P, Kp / group, 8).
// Targets:
//   jxs_int8_matmul   int8 (M, K) x packed -> int32 (M, N)              exact integer product
//   jxs_w8a8_matmul   f32 (M, K) x packed -> f32 (M, N)                 per-row int8 activations
//                     (dynamic absmax / 127, or a given static scale), int32 sums, then
//                     acc * x_scale * w_scale (+ bias); with `smooth` (1 / SmoothQuant factors, K) the rows
//                     are multiplied by it before they are quantized
//   jxs_int4_matmul   f32 (M, K) x packed int4 -> f32 (M, N)            weight-only, float sums
// `isa` (an attribute) picks the path: 0 portable, 1 AVX2, 2 AVX-512 VNNI (int8 products; the rest of the
// work takes the AVX2 code). On AVX2 the int8 products take the bounded microkernel (vpmaddubsw) when both
// operands are in [-127, 127], and the exact one (vpmaddwd) for any int8 otherwise; the VNNI microkernel
// (vpdpbusd) is exact for any int8. All give the exact int32 sums.
// Work is split over output columns (or rows) on XLA's intra-op thread pool (pool.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JXS_X86 1
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------------------- threads

// XLA's pool (pool.h), for the handler running on this thread (set by XlaPoolScope).
thread_local ffi::ThreadPool* tls_xla_pool = nullptr;

struct XlaPoolScope {
  explicit XlaPoolScope(ffi::ThreadPool& pool) : previous(tls_xla_pool) { tls_xla_pool = &pool; }
  ~XlaPoolScope() { tls_xla_pool = previous; }
  ffi::ThreadPool* previous;
};

// Splits [0, n) into column ranges aligned to `align` and calls fn(begin, end) for each, on the pool threads.
// Large work goes in several ranges per thread, claimed by whichever thread is free (jxs::RunParts), so a
// core that is slowed down (another process, a virtual machine's neighbour) holds back only a small range.
void ParallelColumns(int64_t n, int64_t work, int64_t align,
                     const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = tls_xla_pool ? tls_xla_pool->num_threads() : 1;
  const int64_t per_thread = work >= (int64_t{1} << 26) ? 4 : 1;  // not for a memory-bound GEMV
  int parts = static_cast<int>(std::min<int64_t>(threads * per_thread, (n + align - 1) / align));
  if (work < (1 << 16)) parts = 1;  // too small to be worth a task
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  int64_t chunk = ((n + parts - 1) / parts + align - 1) / align * align;
  parts = static_cast<int>((n + chunk - 1) / chunk);
  jxs::RunParts(tls_xla_pool, parts, threads, [&](int64_t i) {
    int64_t b = std::min<int64_t>(n, i * chunk), e = std::min<int64_t>(n, b + chunk);
    if (b < e) fn(b, e);
  });
}

// ------------------------------------------------------------------------------ activation quantization

inline float RowScale(const float* x, int64_t k) {
  float m = 0.f;
  for (int64_t i = 0; i < k; ++i) m = std::max(m, std::fabs(x[i]));
  return m > 0.f ? m / 127.f : 1.f;
}

// xq[i] = clip(round_half_even(x[i] / s), -127, 127) as T (int8 or int16), zero padded to kp.
template <typename T>
void QuantizeRowPortable(const float* x, int64_t k, int64_t kp, float s, T* out) {
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(x[i] / s);
    out[i] = static_cast<T>(std::min(127.f, std::max(-127.f, q)));
  }
  for (int64_t i = k; i < kp; ++i) out[i] = 0;
}

#ifdef JXS_X86
__attribute__((target("avx2,fma"))) float RowScaleAvx2(const float* x, int64_t k) {
  __m256 m = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = 0.f;
  for (float v : lanes) r = std::max(r, v);
  for (; i < k; ++i) r = std::max(r, std::fabs(x[i]));
  return r > 0.f ? r / 127.f : 1.f;
}

// 16 integral floats (two vectors, in range) stored as T (int8 or int16), in order.
template <typename T>
__attribute__((target("avx2,fma"))) inline void Store16(__m256 a, __m256 b, T* out) {
  __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
  p = _mm256_permute4x64_epi64(p, 0xD8);  // packs works per 128-bit lane: restore order
  if constexpr (sizeof(T) == 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), p);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void QuantizeRowAvx2(const float* x, int64_t k, int64_t kp, float s, T* out) {
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m256 a = _mm256_div_ps(_mm256_loadu_ps(x + i), vs);
    __m256 b = _mm256_div_ps(_mm256_loadu_ps(x + i + 8), vs);
    a = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    b = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    Store16(a, b, out + i);
  }
  QuantizeRowPortable(x + i, k - i, kp - i, s, out + i);
}
#endif

// ----------------------------------------------------------------------------------- int8 GEMM cores
//
// A packed weight is (P, Kp / 4 + 1, 16, 4): panel p (16 output columns), input quad q, column c, input
// 4 q + i. Per quad a panel holds 64 bytes: columns 0-7 (4 inputs each), then columns 8-15. After the Kp / 4
// quads of inputs comes one of column sums (16 int32).
// Two AVX2 microkernels read it:
//   bounded (activations and weights in [-127, 127], as symmetric quantization makes them): int8 rows,
//     vpmaddubsw(|x|, w * sign(x)) then vpmaddwd with ones; |x| * |w| <= 127 * 127, so the int16 pair
//     sums never saturate and the result is exact;
//   exact (any int8, including -128): int16 rows, vpmaddwd on 4 columns x 4 inputs at a time, the two
//     partial sums of each column added at the end.

// Bytes from one panel to the next, and the column sums of panel p.
constexpr int64_t PanelBytes(int64_t kp) { return (kp + 4) * 16; }
inline const int32_t* ColumnSums(const int8_t* w, int64_t kp, int64_t p) {
  return reinterpret_cast<const int32_t*>(w + p * PanelBytes(kp) + kp * 16);
}

#ifdef JXS_X86
template <int MR>
__attribute__((target("avx2,fma"))) void PanelBoundedAvx2(const int8_t* x, int64_t kp, const int8_t* panel,
                                                          int32_t out[][16]) {
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < kp / 4; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 64 + 32));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * kp + 4 * q, 4);
      const __m256i xb = _mm256_set1_epi32(quad);
      const __m256i ax = _mm256_abs_epi8(xb);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8), acc[r][1]);
  }
}

// unsigned (activations as codes in [0, 127], any int8 weights): vpmaddubsw(x, w) then vpmaddwd with ones;
// |pair sum| <= 2 * 127 * 128 < 2^15, so nothing saturates. Two multiplies per 32 products instead of the
// bounded path's three (no vpsignb).
template <int MR>
__attribute__((target("avx2,fma"))) void PanelUnsignedAvx2(const uint8_t* x, int64_t kp, const int8_t* panel,
                                                           int32_t out[][16]) {
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < kp / 4; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 64 + 32));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * kp + 4 * q, 4);
      const __m256i xb = _mm256_set1_epi32(quad);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8), acc[r][1]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void PanelExactAvx2(const int16_t* x, int64_t kp, const int8_t* panel,
                                                        int32_t out[][16]) {
  __m256i acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_si256();
  for (int64_t q = 0; q < kp / 4; ++q) {
    const __m128i* p = reinterpret_cast<const __m128i*>(panel + q * 64);
    __m256i w[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(p + j));  // 4 columns x 4 inputs
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int64_t quad;
      std::memcpy(&quad, x + r * kp + 4 * q, 8);
      const __m256i xb = _mm256_set1_epi64x(quad);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(xb, w[j]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {  // lanes (c0 a, c0 b, c1 a, ...): add the pairs, restore column order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]),
                        _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8),
                        _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2], acc[r][3]), 0xD8));
  }
}
#endif

template <typename T>
void PanelPortable(const T* x, int rows, int64_t kp, const int8_t* panel, int32_t out[][16]) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < 16; ++c) out[r][c] = 0;
    for (int64_t q = 0; q < kp / 4; ++q)
      for (int c = 0; c < 16; ++c)
        for (int i = 0; i < 4; ++i)
          out[r][c] += static_cast<int32_t>(x[r * kp + 4 * q + i]) * panel[q * 64 + c * 4 + i];
  }
}

// Rows per register block: unsigned 6 (12 accumulators, 2 weight vectors, 1 broadcast), bounded 4 (its |x|
// and sign need two more registers), exact 2 (8 accumulators + 4 widened weights).
template <typename T>
constexpr int BlockRows() { return std::is_same_v<T, uint8_t> ? 6 : sizeof(T) == 1 ? 4 : 2; }

#ifdef JXS_X86
template <typename T, int MR>
inline void PanelAvx2(const T* x, int64_t kp, const int8_t* panel, int32_t out[][16]) {
  if constexpr (std::is_same_v<T, uint8_t>) PanelUnsignedAvx2<MR>(x, kp, panel, out);
  else if constexpr (sizeof(T) == 1) PanelBoundedAvx2<MR>(x, kp, panel, out);
  else PanelExactAvx2<MR>(x, kp, panel, out);
}

// One block of `rows` (at most BlockRows<T>()) rows against one panel.
template <typename T>
inline void Block(int rows, const T* x, int64_t kp, const int8_t* panel, int32_t out[][16]) {  // rows >= 1
  if constexpr (BlockRows<T>() >= 4) {
    switch (rows) {
      case 6: if constexpr (BlockRows<T>() >= 6) PanelAvx2<T, 6>(x, kp, panel, out); break;
      case 5: if constexpr (BlockRows<T>() >= 5) PanelAvx2<T, 5>(x, kp, panel, out); break;
      case 4: PanelAvx2<T, 4>(x, kp, panel, out); break;
      case 3: PanelAvx2<T, 3>(x, kp, panel, out); break;
      case 2: PanelAvx2<T, 2>(x, kp, panel, out); break;
      default: PanelAvx2<T, 1>(x, kp, panel, out); break;
    }
  } else {
    if (rows == 2) PanelAvx2<T, 2>(x, kp, panel, out);
    else PanelAvx2<T, 1>(x, kp, panel, out);
  }
}
#endif

// The W8A8 epilogue, applied by the VNNI microkernel to its accumulators in registers (no int32 tile):
// out[r, c] = float(sum - zero[r] * colsum[c]) * sx[r] * sw[c] (+ bias[c]), the order EmitRow multiplies in.
struct FloatEpilogue {
  const float* sx;       // per activation row
  const int32_t* zeros;  // per row (an activation zero point), or null
  const float* sw;       // per output column
  const float* bias;     // per output column, or null
  float* out;            // rows of n
  int64_t n;
};

// ------------------------------------------------------------------------- int8 GEMM, AVX-512 VNNI
//
// vpdpbusd multiplies unsigned bytes by signed bytes and adds each group of four products into an int32
// lane, with no intermediate saturation. One quad of a panel is one zmm (16 columns x 4 inputs), so a row's
// quad, broadcast, meets a whole panel in one instruction. Signed activation rows are stored as x + 128
// (x ^ 0x80) and the sums corrected by 128 * (the weight's column sums): exact for any int8 operands,
// -128 included, so this path needs no bounded or int16 variant. Unsigned rows (codes in [0, 127]) need no
// correction. The microkernel runs MR rows against NR panels: MR * NR accumulators, NR weight vectors and
// one broadcast (6 x 4: 29 of the 32 registers).

#ifdef JXS_X86
#define JXS_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
constexpr int kVnniMR = 6, kVnniNR = 4;

// acc += per-lane sums of four u8 x s8 products. Through the intrinsic, GCC 12 copies every accumulator of
// the microkernel to the stack on each step (it does not tie the accumulator to one register); the asm does.
JXS_VNNI inline void Dpbusd(__m512i& acc, __m512i x, __m512i w) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
}

// MR rows of unsigned bytes (kp each) against NR consecutive panels. With kOffset (rows hold x + 128) the
// sums are corrected by 128 times the panels' column sums. Without an epilogue the sums go to out[r][16 j + c]
// for panel j; with one (`e`, rows row0 ..., panels from p0) the floats go straight to e->out.
template <int MR, int NR, bool kOffset>
JXS_VNNI void PanelsVnni(const uint8_t* x, int64_t kp, const int8_t* w, int32_t out[][kVnniNR * 16],
                         const FloatEpilogue* e, int64_t row0, int64_t p0) {
  const int64_t panel_bytes = PanelBytes(kp);
  __m512i acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kp / 4; ++q) {
    __m512i wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + j * panel_bytes + q * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * kp + 4 * q, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) Dpbusd(acc[r][j], xb, wv[j]);
    }
  }
  if (e == nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        __m512i v = acc[r][j];
        if constexpr (kOffset)
          v = _mm512_sub_epi32(v, _mm512_slli_epi32(_mm512_loadu_si512(ColumnSums(w, kp, j)), 7));
        _mm512_storeu_si512(out[r] + 16 * j, v);
      }
    return;
  }
  // One correction per row: (128 if offset) + the row's zero point, times the column sums (int32 arithmetic
  // wraps as the two separate subtractions would, so the sums are the same bits).
  __m512i colsum[NR];
  __m512 sw[NR], bias[NR];
  __mmask16 mask[NR];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
    const int64_t c0 = (p0 + j) * 16;
    const int64_t count = std::min<int64_t>(16, e->n - c0);
    mask[j] = static_cast<__mmask16>((1u << count) - 1);
    colsum[j] = _mm512_loadu_si512(ColumnSums(w, kp, j));
    sw[j] = _mm512_maskz_loadu_ps(mask[j], e->sw + c0);
    bias[j] = e->bias ? _mm512_maskz_loadu_ps(mask[j], e->bias + c0) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int32_t zero = (kOffset ? 128 : 0) + (e->zeros ? e->zeros[row0 + r] : 0);
    const __m512i vz = _mm512_set1_epi32(zero);
    const __m512 vsx = _mm512_set1_ps(e->sx[row0 + r]);
    float* o = e->out + (row0 + r) * e->n + p0 * 16;
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512i s = zero ? _mm512_sub_epi32(acc[r][j], _mm512_mullo_epi32(vz, colsum[j])) : acc[r][j];
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), vsx), sw[j]);
      if (e->bias) v = _mm512_add_ps(v, bias[j]);
      _mm512_mask_storeu_ps(o + 16 * j, mask[j], v);
    }
  }
}

template <int MR, bool kOffset>
void PanelsVnniNR(int np, const uint8_t* x, int64_t kp, const int8_t* w, int32_t out[][kVnniNR * 16],
                  const FloatEpilogue* e, int64_t row0, int64_t p0) {
  switch (np) {
    case 4: return PanelsVnni<MR, 4, kOffset>(x, kp, w, out, e, row0, p0);
    case 3: return PanelsVnni<MR, 3, kOffset>(x, kp, w, out, e, row0, p0);
    case 2: return PanelsVnni<MR, 2, kOffset>(x, kp, w, out, e, row0, p0);
    default: return PanelsVnni<MR, 1, kOffset>(x, kp, w, out, e, row0, p0);
  }
}

template <bool kOffset>
void BlockVnni(int rows, int np, const uint8_t* x, int64_t kp, const int8_t* w, int32_t out[][kVnniNR * 16],
               const FloatEpilogue* e, int64_t row0, int64_t p0) {
  switch (rows) {
    case 6: return PanelsVnniNR<6, kOffset>(np, x, kp, w, out, e, row0, p0);
    case 5: return PanelsVnniNR<5, kOffset>(np, x, kp, w, out, e, row0, p0);
    case 4: return PanelsVnniNR<4, kOffset>(np, x, kp, w, out, e, row0, p0);
    case 3: return PanelsVnniNR<3, kOffset>(np, x, kp, w, out, e, row0, p0);
    case 2: return PanelsVnniNR<2, kOffset>(np, x, kp, w, out, e, row0, p0);
    default: return PanelsVnniNR<1, kOffset>(np, x, kp, w, out, e, row0, p0);
  }
}

// Int8Core on the VNNI path. int8 rows (T = int8_t) hold x ^ 0x80 (see FlipRows); uint8 rows hold codes.
// With `fused` the microkernel writes floats itself (buffer row 0 is activation row `base`) and emit is unused.
template <typename T, typename Emit>
void Int8CoreVnni(const T* xr0, int64_t m, const int8_t* w, int64_t kp, int64_t n, int64_t p0, int64_t p1,
                  Emit emit, const FloatEpilogue* fused, int64_t base) {
  constexpr bool kOffset = std::is_same_v<T, int8_t>;
  const uint8_t* x = reinterpret_cast<const uint8_t*>(xr0);
  const int64_t panel_bytes = PanelBytes(kp);
  const int64_t group = std::max<int64_t>(kVnniNR, (int64_t{256} * 1024) / panel_bytes / kVnniNR * kVnniNR);
  int32_t tile[kVnniMR][kVnniNR * 16];
  const int64_t blocks = (m + kVnniMR - 1) / kVnniMR, divisor = std::max<int64_t>(blocks, 1);
  const int64_t rows_base = m / divisor, rem = m % divisor;
  for (int64_t g0 = p0; g0 < p1; g0 += group) {
    const int64_t g1 = std::min(p1, g0 + group);
    for (int64_t b = 0, r = 0; b < blocks; r += rows_base + (b < rem), ++b) {
      const int rows = static_cast<int>(rows_base + (b < rem));
      for (int64_t p = g0; p < g1; p += kVnniNR) {
        const int np = static_cast<int>(std::min<int64_t>(kVnniNR, g1 - p));
        BlockVnni<kOffset>(rows, np, x + r * kp, kp, w + p * panel_bytes, tile, fused, base + r, p);
        if (fused) continue;
        for (int j = 0; j < np; ++j) {
          const int64_t c0 = (p + j) * 16;
          const int cols = static_cast<int>(std::min<int64_t>(16, n - c0));
          for (int i = 0; i < rows; ++i) emit(r + i, c0, tile[i] + 16 * j, cols);
        }
      }
    }
  }
}
#endif

// The VNNI path's form of int8 rows: x + 128 as unsigned bytes.
template <typename T>
void FlipRows(T* rows, int64_t count) {
  if constexpr (std::is_same_v<T, int8_t>) {
    uint8_t* b = reinterpret_cast<uint8_t*>(rows);
    for (int64_t i = 0; i < count; ++i) b[i] ^= 0x80;
  }
}

// Sums for rows [0, m) and panels [p0, p1) (columns 16 p ...); emit(row, col0, sums, count) per row of a tile,
// with count = min(16, n - col0) int32 sums; on the VNNI path with `fused`, the microkernel writes the floats
// of that epilogue itself and emit is not called.
// Panels go in groups that fit L2 and every row block runs over a group before the next.
// `nonneg` (int8 rows only, may be null): per row, whether it holds no negative value; a block of such
// rows takes the unsigned microkernel (exact for any int8 weight), the others the bounded one.
template <typename T, typename Emit>
void Int8Core(int isa, const T* xr0, int64_t m, const int8_t* w, int64_t kp, int64_t n, int64_t p0,
              int64_t p1, const uint8_t* nonneg, Emit emit, const FloatEpilogue* fused = nullptr,
              int64_t row0 = 0) {
#ifdef JXS_X86
  if constexpr (!std::is_same_v<T, int16_t>) {
    if (isa == 2) return Int8CoreVnni(xr0, m, w, kp, n, p0, p1, emit, fused, row0);
  }
#endif
  constexpr int kMR = BlockRows<T>();
  const int64_t panel_bytes = PanelBytes(kp);
  const int64_t group = std::max<int64_t>(1, (int64_t{256} * 1024) / panel_bytes);
  int32_t tile[6][16];
  // Blocks of balanced sizes (17 rows: 6, 6, 5), so few passes go over each panel. Six-row blocks only pay
  // for a few rows (each pass streams the panel); with many rows four-row blocks run faster (measured).
  const int64_t mr = kMR == 6 && m > 25 ? 4 : kMR;
  const int64_t blocks = (m + mr - 1) / mr, divisor = std::max<int64_t>(blocks, 1);
  const int64_t base = m / divisor, rem = m % divisor;
  for (int64_t g0 = p0; g0 < p1; g0 += group) {
    const int64_t g1 = std::min(p1, g0 + group);
    for (int64_t b = 0, r = 0; b < blocks; r += base + (b < rem), ++b) {
      const int rows = static_cast<int>(base + (b < rem));
      bool unsigned_rows = false;
      if constexpr (std::is_same_v<T, int8_t>) {
        unsigned_rows = nonneg != nullptr;
        for (int i = 0; i < rows && unsigned_rows; ++i) unsigned_rows = nonneg[r + i] != 0;
      }
      for (int64_t p = g0; p < g1; ++p) {
        const int8_t* panel = w + p * panel_bytes;
        const T* xr = xr0 + r * kp;
#ifdef JXS_X86
        if (isa >= 1) {
          if constexpr (std::is_same_v<T, int8_t>) {
            if (unsigned_rows) {
              Block<uint8_t>(rows, reinterpret_cast<const uint8_t*>(xr), kp, panel, tile);
            } else {
              Block<int8_t>(rows, xr, kp, panel, tile);
            }
          } else {
            Block<T>(rows, xr, kp, panel, tile);
          }
        } else
#endif
          PanelPortable(xr, rows, kp, panel, tile);
        const int64_t cols = std::min<int64_t>(16, n - p * 16);
        for (int i = 0; i < rows; ++i)
          emit(r + i, p * 16, tile[i], static_cast<int>(cols));
      }
    }
  }
}

// Whether row `x` (kp values) holds no negative value.
template <typename T>
bool NonNegative(const T* x, int64_t kp) {
  T lo = 0;
  for (int64_t i = 0; i < kp; ++i) lo = std::min(lo, x[i]);
  return lo >= 0;
}

// Quantizes (or widens) the m rows of the activations into an int16 (m, kp) buffer, in parallel.
// Rows [r0, r1) of int8 activations copied (int8) or widened (int16) to rows of `out`, zero padded to kp.
template <typename T>
void WidenRowRange(const int8_t* x, int64_t r0, int64_t r1, int64_t k, int64_t kp, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    T* o = out + (r - r0) * kp;
    for (int64_t i = 0; i < k; ++i) o[i] = x[r * k + i];
    for (int64_t i = k; i < kp; ++i) o[i] = 0;
  }
}

// Asymmetric per-row quantization (the runtime's XLA formulation), with `bits` 8 or 7: the row's range
// [min(x, 0), max(x, 0)] in `steps` steps, q = clip(round(x / s) + zero, lo_code, hi_code) with
//   bits 8: 254 steps, codes [-127, 127], zero = round(-lo / s) - 127 (codes the bounded path takes);
//   bits 7: 127 steps, codes [0, 127], zero = round(-lo / s) (unsigned codes for vpmaddubsw).
struct AsymGrid {
  float steps, offset, lo_code, hi_code;
};
inline AsymGrid Grid(int bits) {
  return bits == 7 ? AsymGrid{127.f, 0.f, 0.f, 127.f} : AsymGrid{254.f, 127.f, -127.f, 127.f};
}

// Widens [lo, hi] by x[i0, k).
inline void ExtendRange(const float* x, int64_t i0, int64_t k, float& lo, float& hi) {
  for (int64_t i = i0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
}

// Codes of x[i0, k) for scale s and zero point z, then zeros up to kp (the padding multiplies zero weights).
template <typename T>
void AsymCodes(const float* x, int64_t i0, int64_t k, int64_t kp, float s, float z, const AsymGrid& g, T* out) {
  for (int64_t i = i0; i < k; ++i)
    out[i] = static_cast<T>(std::min(g.hi_code, std::max(g.lo_code, std::nearbyint(x[i] / s) + z)));
  for (int64_t i = std::max(i0, k); i < kp; ++i) out[i] = 0;
}

// The row's scale and zero point from its range [lo, hi] (lo <= 0 <= hi).
inline void AsymScaleZero(float lo, float hi, const AsymGrid& g, float* scale, int32_t* zero, float& z) {
  *scale = hi > lo ? (hi - lo) / g.steps : 1.f;
  z = std::nearbyint(-lo / *scale) - g.offset;
  *zero = static_cast<int32_t>(z);
}

// Ends a vectorized range pass: the lanes' extremes and the row's tail row[i0, k) give the scale and zero
// point (returned as a float, for the codes).
inline float CloseRange(const float* lanes_lo, const float* lanes_hi, int lanes, const float* row, int64_t i0,
                        int64_t k, const AsymGrid& g, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f, z;
  ExtendRange(lanes_lo, 0, lanes, lo, hi);
  ExtendRange(lanes_hi, 0, lanes, lo, hi);
  ExtendRange(row, i0, k, lo, hi);
  AsymScaleZero(lo, hi, g, scale, zero, z);
  return z;
}

template <typename T>
void QuantizeRowAsym(const float* x, int64_t k, int64_t kp, int bits, T* out, float* scale, int32_t* zero) {
  const AsymGrid g = Grid(bits);
  float lo = 0.f, hi = 0.f, z;
  ExtendRange(x, 0, k, lo, hi);
  AsymScaleZero(lo, hi, g, scale, zero, z);
  AsymCodes(x, 0, k, kp, *scale, z, g, out);
}

#ifdef JXS_X86
// clip(round(v / s) + z, lo_code, hi_code), lane-wise.
__attribute__((target("avx2,fma"))) inline __m256 AsymCode(__m256 v, __m256 vs, __m256 vz, __m256 vlo, __m256 vhi) {
  v = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
  return _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
}

// QuantizeRowAsym with AVX2: the same range, scale, zero point and rounding (division, half to even).
template <typename T>
__attribute__((target("avx2,fma"))) void QuantizeRowAsymAvx2(const float* x, int64_t k, int64_t kp, int bits,
                                                             T* out, float* scale, int32_t* zero) {
  const AsymGrid g = Grid(bits);
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(v, vlo);  // a NaN keeps the running value, as std::min(lo, x) does
    vhi = _mm256_max_ps(v, vhi);
  }
  alignas(32) float l8[8], h8[8];
  _mm256_store_ps(l8, vlo);
  _mm256_store_ps(h8, vhi);
  const float z = CloseRange(l8, h8, 8, x, i, k, g, scale, zero);
  const __m256 vs = _mm256_set1_ps(*scale), vz = _mm256_set1_ps(z);
  const __m256 clo = _mm256_set1_ps(g.lo_code), chi = _mm256_set1_ps(g.hi_code);
  for (i = 0; i + 16 <= k; i += 16)
    Store16(AsymCode(_mm256_loadu_ps(x + i), vs, vz, clo, chi),
            AsymCode(_mm256_loadu_ps(x + i + 8), vs, vz, clo, chi), out + i);
  AsymCodes(x, i, k, kp, *scale, z, g, out);
}
#endif

#ifdef JXS_X86
// QuantizeRowAsymAvx2 on 16 lanes, for the VNNI path's byte codes, with the SmoothQuant product folded into the
// range pass: with `u`, the row is x * u (stored in `smoothed`, k floats, for the code pass). The same
// products, range, scale, zero point and rounding as multiplying first and quantizing with AVX2; the codes
// are narrowed with one saturating vpmovsdb instead of AVX2's chain of packs and permutes.
template <typename T>
JXS_VNNI void QuantizeRowAsymAvx512(const float* x, const float* u, float* smoothed, int64_t k, int64_t kp, int bits,
                                    T* out, float* scale, int32_t* zero) {
  static_assert(sizeof(T) == 1, "byte codes");
  const AsymGrid g = Grid(bits);
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    if (u) {
      v = _mm512_mul_ps(v, _mm512_loadu_ps(u + i));
      _mm512_storeu_ps(smoothed + i, v);
    }
    vlo = _mm512_min_ps(v, vlo);  // a NaN keeps the running value, as std::min(lo, x) does
    vhi = _mm512_max_ps(v, vhi);
  }
  for (int64_t j = i; j < k && u; ++j) smoothed[j] = x[j] * u[j];
  const float* row = u ? smoothed : x;
  alignas(64) float l16[16], h16[16];
  _mm512_store_ps(l16, vlo);
  _mm512_store_ps(h16, vhi);
  const float z = CloseRange(l16, h16, 16, row, i, k, g, scale, zero);
  const __m512 vs = _mm512_set1_ps(*scale), vz = _mm512_set1_ps(z);
  const __m512 clo = _mm512_set1_ps(g.lo_code), chi = _mm512_set1_ps(g.hi_code);
  for (i = 0; i + 16 <= k; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(chi, _mm512_max_ps(clo, _mm512_add_ps(v, vz)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  AsymCodes(row, i, k, kp, *scale, z, g, out);
}
#endif

// d = x * u elementwise (one IEEE product, so every path gives the same bits), eight lanes at a time with AVX2.
#ifdef JXS_X86
__attribute__((target("avx2"))) void MultiplyRowAvx2(const float* x, const float* u, float* d, int64_t k) {
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(u + j)));
  for (; j < k; ++j) d[j] = x[j] * u[j];
}
#endif

void MultiplyRow(int isa, const float* x, const float* u, float* d, int64_t k) {
#ifdef JXS_X86
  if (isa >= 1) return MultiplyRowAvx2(x, u, d, k);
#endif
  for (int64_t j = 0; j < k; ++j) d[j] = x[j] * u[j];
}

// Rows [r0, r1) of float activations -> int16 rows of `out` (row r0 first); their scales into scales[r]
// (and, with `zeros`, asymmetric with zero points into zeros[r]).
template <typename T>
void QuantizeRowRange(int isa, const float* x, int64_t r0, int64_t r1, int64_t k, int64_t kp,
                      const float* static_scale, T* out, float* scales, int32_t* zeros = nullptr, int bits = 8,
                      const float* smooth = nullptr) {
  // SmoothQuant: each row is multiplied by the reciprocals of the per-input factors (`smooth`) here, in cache,
  // instead of by a separate pass.
  thread_local std::vector<float> smoothed;
  if (smooth && static_cast<int64_t>(smoothed.size()) < k) smoothed.resize(static_cast<size_t>(k));
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * k;
#ifdef JXS_X86
    if constexpr (sizeof(T) == 1) {
      if (zeros && isa == 2) {
        QuantizeRowAsymAvx512(xr, smooth, smoothed.data(), k, kp, bits, out + (r - r0) * kp, scales + r, zeros + r);
        continue;
      }
    }
#endif
    if (smooth) {
      MultiplyRow(isa, xr, smooth, smoothed.data(), k);
      xr = smoothed.data();
    }
    T* o = out + (r - r0) * kp;
    if (zeros) {
#ifdef JXS_X86
      if (isa >= 1) {
        QuantizeRowAsymAvx2(xr, k, kp, bits, o, scales + r, zeros + r);
        continue;
      }
#endif
      QuantizeRowAsym(xr, k, kp, bits, o, scales + r, zeros + r);
      continue;
    }
#ifdef JXS_X86
    if (isa >= 1) {
      float s = static_scale ? *static_scale : RowScaleAvx2(xr, k);
      scales[r] = s;
      QuantizeRowAvx2(xr, k, kp, s, o);
      continue;
    }
#endif
    float s = static_scale ? *static_scale : RowScale(xr, k);
    scales[r] = s;
    QuantizeRowPortable(xr, k, kp, s, o);
  }
}

// Kp of a packed int8 weight's dimensions (its last quad holds column sums).
int64_t PackedK(ffi::Span<const int64_t> wd) { return (wd[1] - 1) * 4; }

int64_t Rows(ffi::Span<const int64_t> d) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) m *= d[i];
  return m;
}

// A packed int8 weight is (P, Kp / 4 + 1, 16, 4): P panels of 16 output columns, then their column sums.
ffi::Error CheckPacked(ffi::Span<const int64_t> wd, int64_t k, int64_t n) {
  if (wd.size() != 4 || wd[2] != 16 || wd[3] != 4)
    return ffi::Error::InvalidArgument("packed int8 weight must have shape (panels, Kp / 4 + 1, 16, 4)");
  const int64_t kp = PackedK(wd);
  if (kp % 32 != 0 || kp < k || kp - k >= 32)
    return ffi::Error::InvalidArgument("packed int8 weight: padded input size must be K rounded up to 32");
  if (n <= (wd[0] - 1) * 16 || n > wd[0] * 16)
    return ffi::Error::InvalidArgument("packed int8 weight: panel count does not match the output features");
  return ffi::Error::Success();
}

// The W8A8 epilogue for `count` (<= 16) columns of one row: out = (sum - zero * colsum) * sx * sw (+ bias),
// in the order XLA's formulation multiplies. colsums may be null (no zero point).
inline void EmitRowPortable(const int32_t* sums, const int32_t* colsums, int32_t zero, float sx, const float* sw,
                            const float* bias, float* out, int count) {
  for (int c = 0; c < count; ++c) {
    const int32_t s = colsums ? sums[c] - zero * colsums[c] : sums[c];
    const float v = static_cast<float>(s) * sx * sw[c];
    out[c] = bias ? v + bias[c] : v;
  }
}

#ifdef JXS_X86
__attribute__((target("avx2,fma"))) void EmitRowAvx2(const int32_t* sums, const int32_t* colsums, int32_t zero,
                                                     float sx, const float* sw, const float* bias, float* out,
                                                     int count) {
  if (count != 16) return EmitRowPortable(sums, colsums, zero, sx, sw, bias, out, count);
  const __m256i vz = _mm256_set1_epi32(zero);
  const __m256 vsx = _mm256_set1_ps(sx);
  for (int h = 0; h < 16; h += 8) {
    __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + h));
    if (colsums)
      s = _mm256_sub_epi32(s, _mm256_mullo_epi32(vz, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsums + h))));
    // (float(s) * sx) * sw: the same two roundings as the scalar order
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), vsx), _mm256_loadu_ps(sw + h));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + h));
    _mm256_storeu_ps(out + h, v);
  }
}
#endif

inline void EmitRow(int64_t isa, const int32_t* sums, const int32_t* colsums, int32_t zero, float sx, const float* sw,
                    const float* bias, float* out, int count) {
#ifdef JXS_X86
  if (isa >= 1) return EmitRowAvx2(sums, colsums, zero, sx, sw, bias, out, count);
#endif
  EmitRowPortable(sums, colsums, zero, sx, sw, bias, out, count);
}

// The emit of the exact products: each row's int32 sums copied into out (rows of n).
inline auto Int32Rows(int32_t* out, int64_t n) {
  return [out, n](int64_t r, int64_t c0, const int32_t* sums, const int32_t*, int count) {
    std::memcpy(out + r * n + c0, sums, sizeof(int32_t) * count);
  };
}

// Runs the product for all m rows. prep(r0, r1, buf) writes rows [r0, r1) as T (int8: bounded or VNNI path,
// uint8: unsigned path, int16: exact path) into buf; emit(row, col0, sums, colsums, count) takes the int32
// sums of columns [col0, col0 + count) of a row, and with `colsums` (an activation zero point to correct)
// the weight's column sums of those columns, read from the packed panel (otherwise a null pointer). With
// `fused` the VNNI path applies that float epilogue in its microkernel and does not call emit (Int8Core).
// Small weights (convolutions, narrow layers): threads split the rows and each prepares and runs
// chunks of rows that stay in cache. Large weights: rows are prepared once, threads split the panels.
constexpr int64_t kRowChunk = 48;  // whole blocks of 4 (AVX2) and 6 (VNNI) rows

// `nonneg_input`: the caller knows no row holds a negative value (the flags need no scan).
template <typename T, typename Prep, typename Emit>
void RunInt8(int isa, int64_t m, const int8_t* w, int64_t kp, int64_t n, bool colsums, Prep prep, Emit emit,
             bool nonneg_input = false, const FloatEpilogue* fused = nullptr) {
  const int64_t panels = (n + 15) / 16;
  const int64_t weight_bytes = panels * PanelBytes(kp);
  // int8 rows: which are nonnegative (the AVX2 unsigned path); the VNNI path stores them flipped instead.
  const bool vnni = isa == 2, flags_wanted = std::is_same_v<T, int8_t> && !vnni;
  // Int8Core's emit for a buffer whose row 0 is activation row `base`.
  auto core_emit = [&](int64_t base) {
    return [&emit, base, colsums, w, kp](int64_t r, int64_t col0, const int32_t* sums, int count) {
      emit(base + r, col0, sums, colsums ? ColumnSums(w, kp, col0 / 16) : nullptr, count);
    };
  };
  // Prepares rows [r0, r1) into `rows` (row r0 first) and, for int8 rows, their flags.
  auto prepare = [&](int64_t r0, int64_t r1, T* rows, uint8_t* flags) {
    prep(r0, r1, rows);
    if (vnni) FlipRows(rows, (r1 - r0) * kp);
    if (flags_wanted)
      for (int64_t r = r0; r < r1; ++r) flags[r - r0] = nonneg_input || NonNegative(rows + (r - r0) * kp, kp);
  };
  if (weight_bytes <= (int64_t{1} << 20) && m > kRowChunk) {
    const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
    ParallelColumns(chunks, m * n * kp, 1, [&](int64_t c0, int64_t c1) {
      std::vector<T> buf(static_cast<size_t>(kRowChunk * kp));
      std::vector<uint8_t> flags(static_cast<size_t>(kRowChunk), 1);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * kRowChunk, r1 = std::min(m, r0 + kRowChunk);
        prepare(r0, r1, buf.data(), flags.data());
        Int8Core(isa, buf.data(), r1 - r0, w, kp, n, 0, panels, flags_wanted ? flags.data() : nullptr,
                 core_emit(r0), fused, r0);
      }
    });
    return;
  }
  std::vector<T> xq(static_cast<size_t>(m * kp));
  std::vector<uint8_t> flags(static_cast<size_t>(m), 1);
  ParallelColumns(m, m * kp * 8, 1, [&](int64_t r0, int64_t r1) {
    prepare(r0, r1, xq.data() + r0 * kp, flags.data() + r0);
  });
  // The VNNI microkernel takes panels four at a time: whole groups per range there.
  ParallelColumns(panels, m * n * kp, isa == 2 ? 4 : 1, [&](int64_t p0, int64_t p1) {
    Int8Core(isa, xq.data(), m, w, kp, n, p0, p1, flags_wanted ? flags.data() : nullptr, core_emit(0), fused, 0);
  });
}

// ------------------------------------------------------------------------------------------ handlers

// `bounded`: the caller guarantees activations and weights in [-127, 127] (the faster path).
ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y, int64_t isa, int64_t n, int64_t bounded) {
  XlaPoolScope scope(pool);
  auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t k = xd.back(), m = Rows(xd);
  if (auto e = CheckPacked(wd, k, n); e.failure()) return e;
  const int64_t kp = PackedK(wd);
  const int8_t* xs = x.typed_data();
  auto emit = Int32Rows(y->typed_data(), n);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    RunInt8<T>(static_cast<int>(isa), m, w.typed_data(), kp, n, false,
               [&](int64_t r0, int64_t r1, T* buf) { WidenRowRange(xs, r0, r1, k, kp, buf); }, emit);
  };
  // Bounded, or an input with no negative value (the unsigned path takes any weight), or VNNI: int8 rows.
  if (isa == 2 || bounded || NonNegative(xs, m * k)) run(int8_t{0});
  else run(int16_t{0});
  return ffi::Error::Success();
}

// A 2-D convolution, NHWC input already padded (B, Hp, Wp, C) int8, the kernel packed as a (kh * kw * C, N)
// weight in (window row, window column, channel) order; output rows (b, i, j) of N sums. The im2col rows are
// built per chunk of output pixels in cache (never as one array): row (b, i, j) holds, for each window
// offset (a, e), the C channels of pixel (i * sh + a * dh, j * sw + e * dw) of image b; with dw = 1 the kw
// pixels of one window row are adjacent in memory and go in one copy.
struct ConvShape {
  int64_t batch, hp, wp, c, oh, ow, kh, kw, sh, sw, dh, dw;
};

// Fills g's sizes from the input and output, and checks them and the packed weight against the window.
ffi::Error CheckConv(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd,
                     int64_t n, ConvShape& g) {
  if (xd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("conv2d: NHWC input and output");
  g.batch = xd[0], g.hp = xd[1], g.wp = xd[2], g.c = xd[3], g.oh = yd[1], g.ow = yd[2];
  if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || yd[0] != g.batch || yd[3] != n ||
      (g.oh - 1) * g.sh + (g.kh - 1) * g.dh >= g.hp || (g.ow - 1) * g.sw + (g.kw - 1) * g.dw >= g.wp)
    return ffi::Error::InvalidArgument("conv2d: window, strides and output size do not fit the input");
  return CheckPacked(wd, g.kh * g.kw * g.c, n);
}

template <typename Emit>
void RunConv2d(int isa, const ConvShape& g, const int8_t* xs, const int8_t* w, int64_t kp, int64_t n, bool bounded,
               Emit emit) {
  const int64_t k = g.kh * g.kw * g.c, m = g.batch * g.oh * g.ow;
  const bool nonneg = NonNegative(xs, g.batch * g.hp * g.wp * g.c);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    auto prep = [&](int64_t r0, int64_t r1, T* buf) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (g.oh * g.ow), i = (r / g.ow) % g.oh, j = r % g.ow;
        T* o = buf + (r - r0) * kp;
        for (int64_t a = 0; a < g.kh; ++a) {
          const int8_t* row = xs + ((b * g.hp + i * g.sh + a * g.dh) * g.wp + j * g.sw) * g.c;
          if constexpr (sizeof(T) == 1) {
            if (g.dw == 1) {
              std::memcpy(o, row, g.kw * g.c);
              o += g.kw * g.c;
              continue;
            }
          }
          for (int64_t e = 0; e < g.kw; ++e, o += g.c)
            for (int64_t q = 0; q < g.c; ++q) o[q] = row[e * g.dw * g.c + q];
        }
        for (int64_t q = k; q < kp; ++q) buf[(r - r0) * kp + q] = 0;
      }
    };
    RunInt8<T>(isa, m, w, kp, n, false, prep, emit, nonneg);
  };
  // Bounded, or an input with no negative value (the unsigned path takes any weight), or VNNI: int8 rows.
  if (isa == 2 || bounded || nonneg) run(int8_t{0});
  else run(int16_t{0});
}

// Exact int32 (B, OH, OW, N).
ffi::Error Int8Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y, int64_t isa, int64_t n, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t bounded) {
  XlaPoolScope scope(pool);
  ConvShape g{0, 0, 0, 0, 0, 0, kh, kw, sh, sw, dh, dw};
  if (auto e = CheckConv(x.dimensions(), w.dimensions(), y->dimensions(), n, g); e.failure()) return e;
  RunConv2d(static_cast<int>(isa), g, x.typed_data(), w.typed_data(), PackedK(w.dimensions()), n, bounded,
            Int32Rows(y->typed_data(), n));
  return ffi::Error::Success();
}

// Float (B, OH, OW, N): sums * x_scale[b] * w_scale[n], the W8A8 epilogue fused.
ffi::Error W8A8Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::F32> w_scale,
                          ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t n, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t bounded) {
  XlaPoolScope scope(pool);
  ConvShape g{0, 0, 0, 0, 0, 0, kh, kw, sh, sw, dh, dw};
  if (auto e = CheckConv(x.dimensions(), w.dimensions(), y->dimensions(), n, g); e.failure()) return e;
  if (static_cast<int64_t>(x_scale.element_count()) != g.batch || static_cast<int64_t>(w_scale.element_count()) != n)
    return ffi::Error::InvalidArgument("w8a8 conv2d: one x scale per image and one w scale per output channel");
  const float* sx = x_scale.typed_data();
  const float* sc = w_scale.typed_data();
  float* out = y->typed_data();
  const int64_t pixels = g.oh * g.ow;
  RunConv2d(static_cast<int>(isa), g, x.typed_data(), w.typed_data(), PackedK(w.dimensions()), n, bounded,
            [&](int64_t r, int64_t c0, const int32_t* sums, const int32_t*, int count) {
              EmitRow(isa, sums, nullptr, 0, sx[r / pixels], sc + c0, nullptr, out + r * n + c0, count);
            });
  return ffi::Error::Success();
}

// mode 0: dynamic per-row scale; 1: static scale from `act_scale` (shape (1,)); 2: dynamic asymmetric
// (per-row scale and zero point, codes in [-127, 127]); 3: dynamic asymmetric 7-bit (codes in [0, 127]).
// `bounded`: the weights are in [-127, 127]; then modes 0-2 (activation codes in [-127, 127]) take the
// bounded path, whose blocks of nonnegative rows take the unsigned one. Mode 3 takes the unsigned path with
// any int8 weights; otherwise the exact one runs.
ffi::Error W8A8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> act_scale,
                          ffi::Buffer<ffi::F32> smooth, ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t mode,
                          int64_t has_bias, int64_t bounded, int64_t has_smooth) {
  XlaPoolScope scope(pool);
  auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t k = xd.back(), m = Rows(xd), n = static_cast<int64_t>(w_scale.element_count());
  if (auto e = CheckPacked(wd, k, n); e.failure()) return e;
  if (has_bias && static_cast<int64_t>(bias.element_count()) != n)
    return ffi::Error::InvalidArgument("bias must have one entry per output feature");
  if (mode < 0 || mode > 3) return ffi::Error::InvalidArgument("w8a8: unknown activation mode");
  if (has_smooth && static_cast<int64_t>(smooth.element_count()) != k)
    return ffi::Error::InvalidArgument("w8a8: smoothing factors must have one entry per input feature");
  const float* multipliers = has_smooth ? smooth.typed_data() : nullptr;  // 1 / the SmoothQuant factors
  const int64_t kp = PackedK(wd);
  const bool asym = mode >= 2;
  std::vector<float> sx(static_cast<size_t>(m));
  std::vector<int32_t> zx(asym ? static_cast<size_t>(m) : 0);
  int32_t* zeros = asym ? zx.data() : nullptr;
  const int bits = mode == 3 ? 7 : 8;
  const float* xs = x.typed_data();
  const float* fixed = mode == 1 ? act_scale.typed_data() : nullptr;
  const float* sw = w_scale.typed_data();
  const float* b = has_bias ? bias.typed_data() : nullptr;
  float* out = y->typed_data();
  auto emit = [&](int64_t r, int64_t c0, const int32_t* sums, const int32_t* colsums, int count) {
    EmitRow(isa, sums, colsums, zeros ? zeros[r] : 0, sx[r], sw + c0, b ? b + c0 : nullptr, out + r * n + c0, count);
  };
  // The VNNI microkernel applies the same epilogue itself, in registers.
  const FloatEpilogue fused{sx.data(), zeros, sw, b, out, n};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    RunInt8<T>(static_cast<int>(isa), m, w.typed_data(), kp, n, asym,
               [&](int64_t r0, int64_t r1, T* buf) {
                 QuantizeRowRange(static_cast<int>(isa), xs, r0, r1, k, kp, fixed, buf, sx.data(), zeros, bits,
                                  multipliers);
               },
               emit, false, isa == 2 ? &fused : nullptr);
  };
  if (mode == 3) run(uint8_t{0});
  else if (bounded || isa == 2) run(int8_t{0});
  else run(int16_t{0});
  return ffi::Error::Success();
}

// int4 weight-only, in panels of 8 output columns: codes (P, Kp / 2, 8) uint8, byte (p, kk, c) holding the
// codes of inputs 2 kk (low nibble) and 2 kk + 1 (high nibble) for column 8 p + c; scale and zero (P, G, 8)
// with G = Kp / group. y[r, c] = sum_g scale[c, g] * (sum_{k in g} x[r, k] * code[k, c] - zero[c, g] * xsum[r, g]).
void Int4Portable(const float* x, int64_t m, const uint8_t* w, const float* sc, const float* zp, int64_t kp,
                  int64_t group, int64_t p0, int64_t p1, int64_t n, const float* xsum, float* out) {
  const int64_t g = kp / group, half = kp / 2;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * kp;
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* wp = w + p * half * 8;
      float total[8] = {0.f};
      for (int64_t j = 0; j < g; ++j) {
        float dot[8] = {0.f};
        for (int64_t kk = j * group / 2; kk < (j + 1) * group / 2; ++kk)
          for (int c = 0; c < 8; ++c) {
            const uint8_t byte = wp[kk * 8 + c];
            dot[c] += xr[2 * kk] * static_cast<float>(byte & 15) + xr[2 * kk + 1] * static_cast<float>(byte >> 4);
          }
        for (int c = 0; c < 8; ++c) total[c] += sc[(p * g + j) * 8 + c] * (dot[c] - zp[(p * g + j) * 8 + c] * xsum[r * g + j]);
      }
      for (int c = 0; c < 8 && p * 8 + c < n; ++c) out[r * n + p * 8 + c] = total[c];
    }
  }
}

#ifdef JXS_X86
// One row against NP panels (8 NP columns): per pair of inputs, each panel's 8 bytes widen to two vectors
// of 8 float codes, one FMA each; 2 NP independent accumulators hide the FMA latency.
template <int NP>
__attribute__((target("avx2,fma"))) void Int4RowAvx2(const float* xr, const float* xs, const uint8_t* w,
                                                     const float* sc, const float* zp, int64_t kp, int64_t group,
                                                     int64_t p, int64_t n, float* out_row) {
  const int64_t g = kp / group, half = kp / 2;
  const __m256i nibble = _mm256_set1_epi32(15);
  __m256 total[NP];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) total[q] = _mm256_setzero_ps();
  for (int64_t j = 0; j < g; ++j) {
    __m256 a0[NP], a1[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) a0[q] = a1[q] = _mm256_setzero_ps();
    for (int64_t kk = j * group / 2; kk < (j + 1) * group / 2; ++kk) {
      const __m256 x0 = _mm256_broadcast_ss(xr + 2 * kk), x1 = _mm256_broadcast_ss(xr + 2 * kk + 1);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) {
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + ((p + q) * half + kk) * 8)));
        a0[q] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_and_si256(v, nibble)), a0[q]);
        a1[q] = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a1[q]);
      }
    }
    const __m256 xsj = _mm256_set1_ps(xs[j]);
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int64_t o = ((p + q) * g + j) * 8;
      const __m256 d = _mm256_fnmadd_ps(_mm256_loadu_ps(zp + o), xsj, _mm256_add_ps(a0[q], a1[q]));
      total[q] = _mm256_fmadd_ps(_mm256_loadu_ps(sc + o), d, total[q]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    const int64_t c0 = (p + q) * 8;
    if (c0 + 8 <= n) {
      _mm256_storeu_ps(out_row + c0, total[q]);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, total[q]);
      for (int64_t c = c0; c < n; ++c) out_row[c] = tmp[c - c0];
    }
  }
}

__attribute__((target("avx2,fma"))) void Int4Avx2(const float* x, int64_t m, const uint8_t* w, const float* sc,
                                                  const float* zp, int64_t kp, int64_t group, int64_t p0,
                                                  int64_t p1, int64_t n, const float* xsum, float* out) {
  const int64_t g = kp / group;
  for (int64_t r = 0; r < m; ++r) {
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) Int4RowAvx2<4>(x + r * kp, xsum + r * g, w, sc, zp, kp, group, p, n, out + r * n);
    for (; p < p1; ++p) Int4RowAvx2<1>(x + r * kp, xsum + r * g, w, sc, zp, kp, group, p, n, out + r * n);
  }
}
#endif

ffi::Error Int4MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero, ffi::ResultBuffer<ffi::F32> y,
                          int64_t isa, int64_t group, int64_t n) {
  XlaPoolScope scope(pool);
  auto xd = x.dimensions(), wd = w.dimensions();
  if (wd.size() != 3 || wd[2] != 8)
    return ffi::Error::InvalidArgument("int4 weight must have shape (panels, Kp / 2, 8)");
  const int64_t k = xd.back(), m = Rows(xd), panels = wd[0], kp = wd[1] * 2;
  if (group <= 0 || group % 16 != 0 || kp % group != 0 || kp < k || kp - k >= group)
    return ffi::Error::InvalidArgument("int4 weight: group must be a multiple of 16 and K padded to a group");
  if (n <= (panels - 1) * 8 || n > panels * 8)
    return ffi::Error::InvalidArgument("int4 weight: panel count does not match the output features");
  const int64_t g = kp / group;
  if (scale.element_count() != panels * g * 8 || zero.element_count() != panels * g * 8)
    return ffi::Error::InvalidArgument("int4 weight: scale and zero need (panels, K / group, 8) entries");
  // Activations padded to kp, and their per-group sums for the zero-point term.
  std::vector<float> xp(static_cast<size_t>(m * kp), 0.f), xsum(static_cast<size_t>(m * g), 0.f);
  for (int64_t r = 0; r < m; ++r) {
    std::memcpy(xp.data() + r * kp, x.typed_data() + r * k, sizeof(float) * k);
    for (int64_t j = 0; j < g; ++j) {
      float s = 0.f;
      for (int64_t i = j * group; i < (j + 1) * group; ++i) s += xp[r * kp + i];
      xsum[r * g + j] = s;
    }
  }
  float* out = y->typed_data();
  ParallelColumns(panels, m * n * kp, 4, [&](int64_t p0, int64_t p1) {
#ifdef JXS_X86
    if (isa >= 1)
      return Int4Avx2(xp.data(), m, w.typed_data(), scale.typed_data(), zero.typed_data(), kp, group, p0, p1, n,
                      xsum.data(), out);
#endif
    Int4Portable(xp.data(), m, w.typed_data(), scale.typed_data(), zero.typed_data(), kp, group, p0, p1, n,
                 xsum.data(), out);
  });
  return ffi::Error::Success();
}

// The attributes both convolution targets take, after their buffers.
template <typename Binding>
auto ConvAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("isa")
      .template Attr<int64_t>("n")
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("dh")
      .template Attr<int64_t>("dw")
      .template Attr<int64_t>("bounded");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("bounded"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsInt8Conv2d, Int8Conv2dImpl,
                              ConvAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::Buffer<ffi::S8>>()
                                            .Arg<ffi::Buffer<ffi::S8>>()
                                            .Ret<ffi::Buffer<ffi::S32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsW8A8Conv2d, W8A8Conv2dImpl,
                              ConvAttrs(ffi::Ffi::Bind()
                                            .Ctx<ffi::ThreadPool>()
                                            .Arg<ffi::Buffer<ffi::S8>>()
                                            .Arg<ffi::Buffer<ffi::S8>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsW8A8Matmul, W8A8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("bounded")
                                  .Attr<int64_t>("has_smooth"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsInt4Matmul, Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("n"));

// Which instruction-set paths this build can run on this CPU: bit 0 portable, bit 1 AVX2, bit 2 AVX-512 VNNI.
extern "C" int jxs_supported_isas() {
  int bits = 1;
#ifdef JXS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= 2;
  if ((bits & 2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    bits |= 4;
#endif
  return bits;
}
