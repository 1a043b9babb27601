// Quantized matrix products for XLA:CPU, called from jit-compiled programs through the XLA FFI.
//
// Weights are packed once (see jaxopt_serve/native/__init__.py) as rows of output features:
//   int8:  (N, Kp) int8, Kp = K rounded up to a multiple of 32, zero padded;
//   int4:  (N, Kp / 2) uint8, two 4-bit codes per byte (low nibble first), with per-group
//          float scales and zero points (N, Kp / group).
// Targets:
//   jxs_int8_matmul   int8 (M, K) x packed -> int32 (M, N)              exact integer product
//   jxs_w8a8_matmul   f32 (M, K) x packed -> f32 (M, N)                 per-row int8 activations
//                     (dynamic absmax / 127, or a given static scale), int32 sums, then
//                     acc * x_scale * w_scale (+ bias)
//   jxs_int4_matmul   f32 (M, K) x packed int4 -> f32 (M, N)            weight-only, float sums
// Each has an AVX2 path and a portable path; `isa` (an attribute) picks one: 0 portable, 1 AVX2.
// Work is split over output columns across a persistent thread pool (no thread start per call).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JXS_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------------------- threads

class Pool {
 public:
  explicit Pool(int threads) : size_(std::max(1, threads)) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this, i] { Loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // Runs fn(i) for i in [0, parts) on the pool; the caller runs part 0. Concurrent callers
  // (several XLA devices at once) do not queue: the one that finds the pool busy runs inline.
  void Run(int parts, const std::function<void(int)>& fn) {
    parts = std::min(parts, size_);
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (parts <= 1 || !busy.owns_lock()) {
      for (int i = 0; i < parts; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void Loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= parts_) continue;
        job = job_;
      }
      (*job)(index);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int ThreadCount() {
  if (const char* env = std::getenv("JAXOPT_SERVE_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

Pool& GetPool() {
  static Pool* pool = new Pool(ThreadCount());  // never destroyed: workers may outlive static teardown
  return *pool;
}

// Splits [0, n) into `parts` column ranges aligned to `align`; calls fn(begin, end) on the pool.
void ParallelColumns(int64_t n, int64_t work, int64_t align,
                     const std::function<void(int64_t, int64_t)>& fn) {
  Pool& pool = GetPool();
  int parts = static_cast<int>(std::min<int64_t>(pool.size(), (n + align - 1) / align));
  if (work < (1 << 16)) parts = 1;  // too small to be worth a wake-up
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  int64_t chunk = ((n + parts - 1) / parts + align - 1) / align * align;
  pool.Run(parts, [&](int i) {
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

// xq[i] = clip(round_half_even(x[i] / s), -127, 127) as int16, zero padded to kp.
void QuantizeRowPortable(const float* x, int64_t k, int64_t kp, float s, int16_t* out) {
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(x[i] / s);
    out[i] = static_cast<int16_t>(std::min(127.f, std::max(-127.f, q)));
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

__attribute__((target("avx2,fma"))) void QuantizeRowAvx2(const float* x, int64_t k, int64_t kp, float s,
                                                          int16_t* out) {
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m256 a = _mm256_div_ps(_mm256_loadu_ps(x + i), vs);
    __m256 b = _mm256_div_ps(_mm256_loadu_ps(x + i + 8), vs);
    a = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    b = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
    p = _mm256_permute4x64_epi64(p, 0xD8);  // packs works per 128-bit lane: restore order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), p);
  }
  QuantizeRowPortable(x + i, k - i, kp - i, s, out + i);
}
#endif

// ----------------------------------------------------------------------------------- int8 GEMM cores

#ifdef JXS_X86
// One panel of 16 output columns, MR rows. The panel holds, per pair of k, 32 int8: (col 0 k, col 0 k+1,
// col 1 k, ...); widened to int16 it is two vectors of 8 columns, and vpmaddwd with the row's
// (x_k, x_k+1) pair broadcast gives 8 exact int32 partial sums. No horizontal sums are needed.
template <int MR>
__attribute__((target("avx2,fma"))) void PanelAvx2(const int16_t* x, int64_t kp, const int8_t* panel,
                                                           int32_t out[][16]) {
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int32_t* xr = reinterpret_cast<const int32_t*>(x);
  const int64_t stride = kp / 2;  // int32 (pairs of int16) per row
  for (int64_t kk = 0; kk < kp / 2; ++kk) {
    const __m128i* p = reinterpret_cast<const __m128i*>(panel + kk * 32);
    __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(p));
    __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(p + 1));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m256i xb = _mm256_set1_epi32(xr[r * stride + kk]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, lo));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, hi));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8), acc[r][1]);
  }
}
#endif

void PanelPortable(const int16_t* x, int rows, int64_t kp, const int8_t* panel, int32_t out[][16]) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < 16; ++c) out[r][c] = 0;
    for (int64_t kk = 0; kk < kp / 2; ++kk)
      for (int c = 0; c < 16; ++c)
        out[r][c] += static_cast<int32_t>(x[r * kp + 2 * kk]) * panel[kk * 32 + 2 * c] +
                     static_cast<int32_t>(x[r * kp + 2 * kk + 1]) * panel[kk * 32 + 2 * c + 1];
  }
}

constexpr int kMR = 6;  // rows per register block (12 accumulators + 2 weight vectors + 1 broadcast)

// Sums for rows [0, m) and panels [p0, p1) (columns 16 p ...); emit(row, col, int32) for col < n.
// Panels go in groups that fit L2 and every row block runs over a group before the next.
template <typename Emit>
void Int8Core(int isa, const int16_t* x16, int64_t m, const int8_t* w, int64_t kp, int64_t n, int64_t p0,
              int64_t p1, Emit emit) {
  const int64_t panel_bytes = kp * 16;
  const int64_t group = std::max<int64_t>(1, (int64_t{256} * 1024) / panel_bytes);
  int32_t tile[kMR][16];
  for (int64_t g0 = p0; g0 < p1; g0 += group) {
    const int64_t g1 = std::min(p1, g0 + group);
    for (int64_t r = 0; r < m; r += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, m - r));
      for (int64_t p = g0; p < g1; ++p) {
        const int8_t* panel = w + p * panel_bytes;
        const int16_t* xr = x16 + r * kp;
#ifdef JXS_X86
        if (isa == 1) {
          switch (rows) {
            case 6: PanelAvx2<6>(xr, kp, panel, tile); break;
            case 5: PanelAvx2<5>(xr, kp, panel, tile); break;
            case 4: PanelAvx2<4>(xr, kp, panel, tile); break;
            case 3: PanelAvx2<3>(xr, kp, panel, tile); break;
            case 2: PanelAvx2<2>(xr, kp, panel, tile); break;
            default: PanelAvx2<1>(xr, kp, panel, tile); break;
          }
        } else
#endif
          PanelPortable(xr, rows, kp, panel, tile);
        const int64_t cols = std::min<int64_t>(16, n - p * 16);
        for (int i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) emit(r + i, p * 16 + c, tile[i][c]);
      }
    }
  }
}

// Quantizes (or widens) the m rows of the activations into an int16 (m, kp) buffer, in parallel.
// Rows [r0, r1) of int8 activations widened to int16 rows of `out`, zero padded to kp.
void WidenRowRange(const int8_t* x, int64_t r0, int64_t r1, int64_t k, int64_t kp, int16_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    int16_t* o = out + (r - r0) * kp;
    for (int64_t i = 0; i < k; ++i) o[i] = x[r * k + i];
    for (int64_t i = k; i < kp; ++i) o[i] = 0;
  }
}

// Asymmetric per-row quantization (the runtime's XLA formulation): the row's range [min(x, 0), max(x, 0)]
// over 255 steps, zero = round(-lo / s) - 128, q = clip(round(x / s) + zero, -128, 127).
void QuantizeRowAsym(const float* x, int64_t k, int64_t kp, int16_t* out, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float s = hi > lo ? (hi - lo) / 255.f : 1.f;
  const float z = std::nearbyint(-lo / s) - 128.f;
  for (int64_t i = 0; i < k; ++i)
    out[i] = static_cast<int16_t>(std::min(127.f, std::max(-128.f, std::nearbyint(x[i] / s) + z)));
  for (int64_t i = k; i < kp; ++i) out[i] = 0;
  *scale = s;
  *zero = static_cast<int32_t>(z);
}

// Rows [r0, r1) of float activations -> int16 rows of `out` (row r0 first); their scales into scales[r]
// (and, with `zeros`, asymmetric with zero points into zeros[r]).
void QuantizeRowRange(int isa, const float* x, int64_t r0, int64_t r1, int64_t k, int64_t kp,
                      const float* static_scale, int16_t* out, float* scales, int32_t* zeros = nullptr) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * k;
    int16_t* o = out + (r - r0) * kp;
    if (zeros) {
      QuantizeRowAsym(xr, k, kp, o, scales + r, zeros + r);
      continue;
    }
#ifdef JXS_X86
    if (isa == 1) {
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

int64_t Rows(ffi::Span<const int64_t> d) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) m *= d[i];
  return m;
}

// A packed int8 weight is (P, Kp / 2, 16, 2): P panels of 16 output columns.
ffi::Error CheckPacked(ffi::Span<const int64_t> wd, int64_t k, int64_t n) {
  if (wd.size() != 4 || wd[2] != 16 || wd[3] != 2)
    return ffi::Error::InvalidArgument("packed int8 weight must have shape (panels, Kp / 2, 16, 2)");
  const int64_t kp = wd[1] * 2;
  if (kp % 32 != 0 || kp < k || kp - k >= 32)
    return ffi::Error::InvalidArgument("packed int8 weight: padded input size must be K rounded up to 32");
  if (n <= (wd[0] - 1) * 16 || n > wd[0] * 16)
    return ffi::Error::InvalidArgument("packed int8 weight: panel count does not match the output features");
  return ffi::Error::Success();
}

// Runs the product for all m rows. prep(r0, r1, buf) writes rows [r0, r1) as int16 into buf.
// Small weights (convolutions, narrow layers): threads split the rows and each prepares and runs
// chunks of rows that stay in cache. Large weights: rows are prepared once, threads split the panels.
constexpr int64_t kRowChunk = 8 * kMR;

template <typename Prep, typename Emit>
void RunInt8(int isa, int64_t m, const int8_t* w, int64_t kp, int64_t n, Prep prep, Emit emit) {
  const int64_t panels = (n + 15) / 16;
  const int64_t weight_bytes = panels * 16 * kp;
  if (weight_bytes <= (int64_t{1} << 20) && m > kRowChunk) {
    const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
    ParallelColumns(chunks, m * n * kp, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int16_t> buf(static_cast<size_t>(kRowChunk * kp));
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * kRowChunk, r1 = std::min(m, r0 + kRowChunk);
        prep(r0, r1, buf.data());
        Int8Core(isa, buf.data(), r1 - r0, w, kp, n, 0, panels,
                 [&](int64_t r, int64_t col, int32_t s) { emit(r0 + r, col, s); });
      }
    });
    return;
  }
  std::vector<int16_t> x16(static_cast<size_t>(m * kp));
  ParallelColumns(m, m * kp * 8, 1, [&](int64_t r0, int64_t r1) { prep(r0, r1, x16.data() + r0 * kp); });
  ParallelColumns(panels, m * n * kp, 1, [&](int64_t p0, int64_t p1) {
    Int8Core(isa, x16.data(), m, w, kp, n, p0, p1, emit);
  });
}

// ------------------------------------------------------------------------------------------ handlers

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> y,
                          int64_t isa, int64_t n) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t k = xd.back(), m = Rows(xd);
  if (auto e = CheckPacked(wd, k, n); e.failure()) return e;
  const int64_t kp = wd[1] * 2;
  const int8_t* xs = x.typed_data();
  int32_t* out = y->typed_data();
  RunInt8(
      static_cast<int>(isa), m, w.typed_data(), kp, n,
      [&](int64_t r0, int64_t r1, int16_t* buf) { WidenRowRange(xs, r0, r1, k, kp, buf); },
      [&](int64_t r, int64_t c, int32_t s) { out[r * n + c] = s; });
  return ffi::Error::Success();
}

// Sum over k of each output column of a packed weight, for the activation zero-point correction.
std::vector<int32_t> ColumnSums(const int8_t* w, int64_t kp, int64_t n) {
  const int64_t panels = (n + 15) / 16;
  std::vector<int32_t> sums(static_cast<size_t>(panels * 16), 0);
  ParallelColumns(panels, panels * 16 * kp, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* panel = w + p * 16 * kp;
      for (int64_t kk = 0; kk < kp / 2; ++kk)
        for (int c = 0; c < 16; ++c) sums[p * 16 + c] += panel[kk * 32 + 2 * c] + panel[kk * 32 + 2 * c + 1];
    }
  });
  return sums;
}

// mode 0: dynamic per-row scale; 1: static scale from `act_scale` (shape (1,)); 2: dynamic asymmetric
// (per-row scale and zero point).
ffi::Error W8A8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> w_scale,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> act_scale,
                          ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t mode, int64_t has_bias) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t k = xd.back(), m = Rows(xd), n = static_cast<int64_t>(w_scale.element_count());
  if (auto e = CheckPacked(wd, k, n); e.failure()) return e;
  if (has_bias && static_cast<int64_t>(bias.element_count()) != n)
    return ffi::Error::InvalidArgument("bias must have one entry per output feature");
  const int64_t kp = wd[1] * 2;
  std::vector<float> sx(static_cast<size_t>(m));
  std::vector<int32_t> zx(mode == 2 ? static_cast<size_t>(m) : 0);
  std::vector<int32_t> colsum = mode == 2 ? ColumnSums(w.typed_data(), kp, n) : std::vector<int32_t>();
  int32_t* zeros = mode == 2 ? zx.data() : nullptr;
  const float* xs = x.typed_data();
  const float* fixed = mode == 1 ? act_scale.typed_data() : nullptr;
  const float* sw = w_scale.typed_data();
  const float* b = has_bias ? bias.typed_data() : nullptr;
  float* out = y->typed_data();
  RunInt8(
      static_cast<int>(isa), m, w.typed_data(), kp, n,
      [&](int64_t r0, int64_t r1, int16_t* buf) {
        QuantizeRowRange(static_cast<int>(isa), xs, r0, r1, k, kp, fixed, buf, sx.data(), zeros);
      },
      [&](int64_t r, int64_t c, int32_t s) {
        if (zeros) s -= zeros[r] * colsum[c];
        float v = static_cast<float>(s) * sx[r] * sw[c];  // the order XLA's path uses
        out[r * n + c] = b ? v + b[c] : v;
      });
  return ffi::Error::Success();
}

// int4 weight-only: w (N, Kp/2) codes, scale and zero (N, G) with G = Kp / group.
// y[r, c] = sum_g scale[c, g] * (sum_{k in g} x[r, k] * code[c, k] - zero[c, g] * sum_{k in g} x[r, k]).
void Int4Portable(const float* x, int64_t m, const uint8_t* w, const float* sc, const float* zp,
                  int64_t kp, int64_t group, int64_t n0, int64_t n1, int64_t n, const float* xsum, float* out) {
  const int64_t g = kp / group;
  for (int64_t c = n0; c < n1; ++c) {
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * kp;
      float total = 0.f;
      for (int64_t j = 0; j < g; ++j) {
        float dot = 0.f;
        for (int64_t i = j * group; i < (j + 1) * group; ++i) {
          uint8_t byte = w[c * (kp / 2) + i / 2];
          float code = static_cast<float>((i & 1) ? (byte >> 4) : (byte & 15));
          dot += xr[i] * code;
        }
        total += sc[c * g + j] * (dot - zp[c * g + j] * xsum[r * g + j]);
      }
      out[r * n + c] = total;
    }
  }
}

#ifdef JXS_X86
// 16 codes (8 bytes) -> two vectors of 8 floats, in k order.
__attribute__((target("avx2,fma"))) inline void Codes16(const uint8_t* p, __m256& lo, __m256& hi) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
  __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
  __m128i inter = _mm_unpacklo_epi8(low, high);  // k order: low nibble first
  lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(inter));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(inter, 8)));
}

__attribute__((target("avx2,fma"))) inline float HSumPs(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// group must be a multiple of 16. Two columns per pass share the activation loads.
__attribute__((target("avx2,fma"))) void Int4Avx2(const float* x, int64_t m, const uint8_t* w, const float* sc,
                                                  const float* zp, int64_t kp, int64_t group, int64_t n0,
                                                  int64_t n1, int64_t n, const float* xsum, float* out) {
  const int64_t g = kp / group, row_bytes = kp / 2;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * kp;
    const float* xs = xsum + r * g;
    for (int64_t c = n0; c < n1; ++c) {
      const uint8_t* wc = w + c * row_bytes;
      __m256 total = _mm256_setzero_ps();
      for (int64_t j = 0; j < g; ++j) {
        __m256 dot = _mm256_setzero_ps();
        for (int64_t i = j * group; i < (j + 1) * group; i += 16) {
          __m256 lo, hi;
          Codes16(wc + i / 2, lo, hi);
          dot = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), lo, dot);
          dot = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 8), hi, dot);
        }
        // sc * (dot - zp * xs), summed lane-wise; the zero-point term goes into lane 0.
        __m256 corr = _mm256_setr_ps(-zp[c * g + j] * xs[j], 0, 0, 0, 0, 0, 0, 0);
        total = _mm256_fmadd_ps(_mm256_set1_ps(sc[c * g + j]), _mm256_add_ps(dot, corr), total);
      }
      out[r * n + c] = HSumPs(total);
    }
  }
}
#endif

ffi::Error Int4MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> zero, ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t group) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t k = xd.back(), m = Rows(xd), n = wd[0], kp = wd[1] * 2;
  if (group <= 0 || group % 16 != 0 || kp % group != 0 || kp < k || kp - k >= group)
    return ffi::Error::InvalidArgument("int4 weight: group must be a multiple of 16 and K padded to a group");
  const int64_t g = kp / group;
  if (scale.element_count() != n * g || zero.element_count() != n * g)
    return ffi::Error::InvalidArgument("int4 weight: scale and zero need (N, K / group) entries");
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
  ParallelColumns(n, m * n * kp, 4, [&](int64_t n0, int64_t n1) {
#ifdef JXS_X86
    if (isa == 1)
      return Int4Avx2(xp.data(), m, w.typed_data(), scale.typed_data(), zero.typed_data(), kp, group, n0, n1, n,
                      xsum.data(), out);
#endif
    Int4Portable(xp.data(), m, w.typed_data(), scale.typed_data(), zero.typed_data(), kp, group, n0, n1, n,
                 xsum.data(), out);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsW8A8Matmul, W8A8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsInt4Matmul, Int4MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("group"));

// Which instruction-set paths this build can run on this CPU: bit 0 portable, bit 1 AVX2.
extern "C" int jxs_supported_isas() {
  int bits = 1;
#ifdef JXS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= 2;
#endif
  return bits;
}
