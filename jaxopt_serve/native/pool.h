// Running a kernel's parts on XLA's intra-op thread pool (the FFI hands it to each handler), the one that
// runs XLA's own parallel loops: a second pool of our own would keep its idle workers spinning beside XLA's
// on the same cores between the model's operations (measured: MiniLM W8A8 7% slower with one).

#ifndef JAXOPT_SERVE_NATIVE_POOL_H_
#define JAXOPT_SERVE_NATIVE_POOL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace jxs {

inline void Relax(int64_t i) {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
  if (i % 64 == 63) std::this_thread::yield();
}

// Runs fn(i) for i in [0, parts): up to `threads` - 1 tasks on the pool and the caller claim indices from one
// counter until none is left, then the caller waits for the claimed ones. A task that starts late finds
// nothing to claim and returns; so the caller never waits for a thread to wake, and never deadlocks when
// every pool thread is busy (it runs whatever nobody took).
inline void RunParts(xla::ffi::ThreadPool* pool, int64_t parts, int64_t threads,
                     const std::function<void(int64_t)>& fn) {
  if (pool == nullptr || threads <= 1 || parts <= 1) {
    for (int64_t i = 0; i < parts; ++i) fn(i);
    return;
  }
  struct State {
    const std::function<void(int64_t)>* fn;
    int64_t parts;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();  // outlives this call in tasks that start after it returns
  state->fn = &fn;
  state->parts = parts;
  auto work = [](State& st) {
    for (int64_t i; (i = st.next.fetch_add(1, std::memory_order_relaxed)) < st.parts;) {
      (*st.fn)(i);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, parts); ++t) pool->Schedule([state, work] { work(*state); });
  work(*state);
  for (int64_t i = 0; state->done.load(std::memory_order_acquire) != parts; ++i) Relax(i);
}

}  // namespace jxs

#endif  // JAXOPT_SERVE_NATIVE_POOL_H_
