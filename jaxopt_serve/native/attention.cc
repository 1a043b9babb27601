// Fused multi-head attention for XLA:CPU, called from jit-compiled programs through the XLA FFI.
//
//   jxs_attention   q, k, v f32 (B, T, H, D), keys kept s32 (B, T) -> f32 (B, T, H, D)
//     out[b, i, h] = sum_j p_j v[b, j, h],  p = softmax over the kept keys j of scale * q[b, i, h] . k[b, j, h]
//
// The layout is the one a model's projections produce, (batch, length, heads, dim): no transpose runs before
// or after. Each (batch, head) pair is one task on XLA's intra-op pool (pool.h): its kept keys (transposed)
// and values are gathered into a buffer that stays in cache, and blocks of query rows go through scores,
// softmax and the weighted sum of values there. Masked keys are left out: in the usual formulation,
// where(mask, logits, finfo.min) before softmax, their weight is exactly 0. With no key kept, every weight
// is equal (all logits finfo.min), so each query gets the mean of all values; so here too.
// The code is written once on GCC vector types of W floats and compiled for AVX-512 (W = 16), AVX2 + FMA
// (W = 8) and any CPU (W = 4); `isa` picks one, with the int8 kernels' codes (2 and 1 x86 paths, 0 portable).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JXS_X86 1
#endif

#include "pool.h"
#include "xla/ffi/api/ffi.h"

// Multiply-adds on the vector types below become FMA instructions where the target has them (the build
// passes -ffp-contract=off for the int8 epilogues).
#if defined(__clang__)
#pragma clang fp contract(fast)
#else
#pragma GCC optimize("fp-contract=fast")
#endif

namespace ffi = xla::ffi;

namespace {

template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(W * 4)));
  typedef int32_t I __attribute__((vector_size(W * 4)));
};

template <int W>
using VF = typename Lanes<W>::F;

template <int W>
[[gnu::always_inline]] inline VF<W> Load(const float* p) {
  VF<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
[[gnu::always_inline]] inline void Store(float* p, VF<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

#ifdef JXS_X86
// Exp<16> with AVX-512's own rounding (vrndscaleps) and scaling by 2^n (vscalefps): the same reduction and
// polynomial in about half the instructions.
__attribute__((target("avx512f,avx512bw,fma"))) inline __m512 ExpAvx512(__m512 x) {
  // live: not x <= -87 (a NaN is live and stays NaN, as in the generic version: max returns its second operand)
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLE_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500e-4f), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, p, n);
}
#endif

// exp(x) for x <= 0: x = n ln2 + r (Cephes' two-part ln2), a degree-6 polynomial for exp(r), 2^n through the
// exponent bits; relative error about 2e-7. 0 below -87.
template <int W>
[[gnu::always_inline]] inline VF<W> Exp(VF<W> x) {
#ifdef JXS_X86
  if constexpr (W == 16) {  // only the AVX-512 path instantiates 16 lanes
    __m512 v;
    std::memcpy(&v, &x, sizeof(v));
    v = ExpAvx512(v);
    std::memcpy(&x, &v, sizeof(v));
    return x;
  }
#endif
  using I = typename Lanes<W>::I;
  x = x < -87.f ? VF<W>{} - 87.f : x;
  const VF<W> t = x * 1.44269504088896341f + 0.5f;
  VF<W> n = __builtin_convertvector(__builtin_convertvector(t, I), VF<W>);  // toward zero
  n = n > t ? n - 1.f : n;                                                  // floor
  const VF<W> r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF<W> p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  VF<W> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.f ? VF<W>{} : p * scale;
}

template <int W>
[[gnu::always_inline]] inline float HorizontalMax(VF<W> v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

template <int W>
[[gnu::always_inline]] inline float HorizontalSum(VF<W> v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

struct Shape {
  int64_t batch, length, heads, dim;
  float scale;
};

constexpr int kRows = 8;  // query rows per block
constexpr float kMasked = -3.0e38f;

// One (batch, head) pair. `keys`: the kept key positions (all of them, with `uniform`, when none is kept).
// Scratch: kt (dp x np) holds the keys transposed, vt (nk x dp) the values, both padded with zeros to
// multiples of W (np: keys, dp: dim); s (kRows x np) the scores.
template <int W>
[[gnu::always_inline]] inline void AttendPair(const Shape& g, const float* q, const float* k, const float* v,
                                              float* out, int64_t b, int64_t h, const std::vector<int32_t>& keys,
                                              bool uniform, float* kt, float* vt, float* s) {
  const int64_t nk = static_cast<int64_t>(keys.size()), np = (nk + W - 1) / W * W, dp = (g.dim + W - 1) / W * W;
  const int64_t row = g.heads * g.dim;  // floats from one position to the next
  const float* qb = q + (b * g.length * g.heads + h) * g.dim;
  const float* kb = k + (b * g.length * g.heads + h) * g.dim;
  const float* vb = v + (b * g.length * g.heads + h) * g.dim;
  float* ob = out + (b * g.length * g.heads + h) * g.dim;
  std::fill(kt, kt + g.dim * np, 0.f);
  std::fill(vt, vt + nk * dp, 0.f);
  for (int64_t j = 0; j < nk; ++j) std::memcpy(vt + j * dp, vb + keys[j] * row, sizeof(float) * g.dim);
  // Keys transposed one dimension at a time: contiguous stores (key by key, the stores stride a power of two
  // and stall on false 4K aliasing with the loads)
  for (int64_t d = 0; d < g.dim; ++d) {
    float* ktd = kt + d * np;
    for (int64_t j = 0; j < nk; ++j) ktd[j] = kb[keys[j] * row + d];
  }
  for (int64_t i0 = 0; i0 < g.length; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, g.length - i0));
    const float* qi[kRows];  // rows past the end repeat the last one (computed, never stored)
    for (int r = 0; r < kRows; ++r) qi[r] = qb + (i0 + std::min(r, rows - 1)) * row;
    // scores: s[r][j] = scale * q[i0 + r] . k[j], two key vectors at a time
    for (int64_t c0 = 0; c0 < np; c0 += 2 * W) {
      const bool two = c0 + W < np;
      VF<W> acc[kRows][2] = {};
      for (int64_t d = 0; d < g.dim; ++d) {
        const VF<W> k0 = Load<W>(kt + d * np + c0), k1 = two ? Load<W>(kt + d * np + c0 + W) : VF<W>{};
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          acc[r][0] += qi[r][d] * k0;
          acc[r][1] += qi[r][d] * k1;
        }
      }
      for (int r = 0; r < kRows; ++r) {
        Store<W>(s + r * np + c0, acc[r][0] * g.scale);
        if (two) Store<W>(s + r * np + c0 + W, acc[r][1] * g.scale);
      }
    }
    // softmax numerators in place; the division by each row's total is left to the output
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) {
      float* sr = s + r * np;
      if (uniform) std::fill(sr, sr + nk, 0.f);
      for (int64_t j = nk; j < np; ++j) sr[j] = kMasked;
      VF<W> m = Load<W>(sr);
      for (int64_t j = W; j < np; j += W) m = m > Load<W>(sr + j) ? m : Load<W>(sr + j);
      const float mx = HorizontalMax<W>(m);
      VF<W> total = {};
      for (int64_t j = 0; j < np; j += W) {
        const VF<W> e = Exp<W>(Load<W>(sr + j) - mx);
        Store<W>(sr + j, e);
        total += e;
      }
      inv[r] = 1.f / HorizontalSum<W>(total);
    }
    // out[i0 + r] = sum_j p[r][j] v[j] / total[r], two vectors of the dim at a time
    for (int64_t d0 = 0; d0 < dp; d0 += 2 * W) {
      const bool two = d0 + W < dp;
      VF<W> acc[kRows][2] = {};
      for (int64_t j = 0; j < nk; ++j) {
        const VF<W> v0 = Load<W>(vt + j * dp + d0), v1 = two ? Load<W>(vt + j * dp + d0 + W) : VF<W>{};
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          acc[r][0] += s[r * np + j] * v0;
          acc[r][1] += s[r * np + j] * v1;
        }
      }
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < (two ? 2 : 1); ++c) {
          const int64_t at = d0 + c * W;
          const VF<W> o = acc[r][c] * inv[r];
          float* dst = ob + (i0 + r) * row + at;
          if (at + W <= g.dim) {
            Store<W>(dst, o);
          } else {
            for (int64_t d = at; d < g.dim; ++d) dst[d - at] = o[d - at];
          }
        }
      }
    }
  }
}

// Asks for the q, k and v rows of pair (b, h) in cache, so the pair before it hides their latency: each
// pair reads `dim` floats at every position, one row of heads * dim apart, a stride the hardware prefetchers
// do not follow far enough ahead.
inline void PrefetchPair(const Shape& g, const float* q, const float* k, const float* v, int64_t b, int64_t h) {
  const int64_t row = g.heads * g.dim, first = (b * g.length * g.heads + h) * g.dim;
  for (int64_t j = 0; j < g.length; ++j) {
    const int64_t at = first + j * row;
    for (int64_t d = 0; d < g.dim; d += 16) {
      __builtin_prefetch(q + at + d);
      __builtin_prefetch(k + at + d);
      __builtin_prefetch(v + at + d);
    }
    __builtin_prefetch(q + at + g.dim - 1);
    __builtin_prefetch(k + at + g.dim - 1);
    __builtin_prefetch(v + at + g.dim - 1);
  }
}

template <int W>
[[gnu::always_inline]] inline void AttendAll(ffi::ThreadPool* pool, const Shape& g, const float* q, const float* k,
                                             const float* v, const int32_t* kept, float* out,
                                             void (*pair)(const Shape&, const float*, const float*, const float*,
                                                          float*, int64_t, int64_t, const std::vector<int32_t>&,
                                                          bool, float*, float*, float*)) {
  std::vector<std::vector<int32_t>> keys(static_cast<size_t>(g.batch));
  std::vector<char> uniform(static_cast<size_t>(g.batch), 0);
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t j = 0; j < g.length; ++j)
      if (kept[b * g.length + j]) keys[b].push_back(static_cast<int32_t>(j));
    if (keys[b].empty()) {
      uniform[b] = 1;
      for (int64_t j = 0; j < g.length; ++j) keys[b].push_back(static_cast<int32_t>(j));
    }
  }
  const int64_t np = (g.length + W - 1) / W * W, dp = (g.dim + W - 1) / W * W;
  const int64_t scratch = g.dim * np + g.length * dp + kRows * np;
  const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  const int64_t pairs = g.batch * g.heads;
  // Parts of a few pairs each, claimed by whichever thread is free; a thread runs one part at a time, so
  // its scratch is a buffer of its own, kept between calls.
  const int64_t chunk = std::max<int64_t>(1, pairs / (threads * 8));
  // Prefetching a whole next pair pays while it is small beside the cache (measured at 128 x 32: 48 KB);
  // a long one would evict the current pair's gathered keys and values.
  const bool prefetch = 3 * g.length * g.dim * int64_t{4} <= int64_t{256} * 1024;
  const int64_t parts = (pairs + chunk - 1) / chunk;
  jxs::RunParts(pool, parts, threads, [&](int64_t part) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < static_cast<size_t>(scratch)) buffer.resize(static_cast<size_t>(scratch));
    float* kt = buffer.data();
    const int64_t end = std::min(pairs, (part + 1) * chunk);
    for (int64_t p = part * chunk; p < end; ++p) {
      const int64_t b = p / g.heads, h = p % g.heads;
      if (p + 1 < end && prefetch) PrefetchPair(g, q, k, v, (p + 1) / g.heads, (p + 1) % g.heads);
      pair(g, q, k, v, out, b, h, keys[b], uniform[b] != 0, kt, kt + g.dim * np, kt + g.dim * np + g.length * dp);
    }
  });
}

#define JXS_PAIR(NAME, W, TARGET)                                                                           \
  TARGET void NAME(const Shape& g, const float* q, const float* k, const float* v, float* out, int64_t b,  \
                   int64_t h, const std::vector<int32_t>& keys, bool uniform, float* kt, float* vt, float* s) { \
    AttendPair<W>(g, q, k, v, out, b, h, keys, uniform, kt, vt, s);                                         \
  }

#if defined(__x86_64__) || defined(_M_X64)
JXS_PAIR(PairAvx512, 16, __attribute__((target("avx512f,avx512bw,fma"))))
JXS_PAIR(PairAvx2, 8, __attribute__((target("avx2,fma"))))
#endif
JXS_PAIR(PairPortable, 4, )

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> kept, ffi::ResultBuffer<ffi::F32> y,
                         int64_t isa, float scale) {
  auto d = q.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("attention: q, k and v must be (batch, length, heads, dim)");
  auto same = [&d](ffi::Span<const int64_t> e) { return std::equal(d.begin(), d.end(), e.begin(), e.end()); };
  if (!same(k.dimensions()) || !same(v.dimensions()) || !same(y->dimensions()))
    return ffi::Error::InvalidArgument("attention: q, k, v and the output must have the same shape");
  const Shape g{d[0], d[1], d[2], d[3], scale};
  if (kept.element_count() != static_cast<size_t>(g.batch * g.length))
    return ffi::Error::InvalidArgument("attention: the key mask must be (batch, length)");
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const int32_t* m = kept.typed_data();
  float* out = y->typed_data();
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == 2) {
    AttendAll<16>(&pool, g, qs, ks, vs, m, out, PairAvx512);
    return ffi::Error::Success();
  }
  if (isa == 1) {
    AttendAll<8>(&pool, g, qs, ks, vs, m, out, PairAvx2);
    return ffi::Error::Success();
  }
#endif
  AttendAll<4>(&pool, g, qs, ks, vs, m, out, PairPortable);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JxsAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<float>("scale"));
