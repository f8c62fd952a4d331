// The work split shared by the CPU kernels (qmatmul.cc, fmatmul.cc).
//
// A call's work is n independent units (output-row chunks, output-column slabs). The caller and up
// to threads - 1 helpers scheduled on XLA's intra-op pool (the FFI ThreadPool) claim units from an
// atomic counter. The caller works too, so it needs only one helper per *other* core: a helper more
// than cores would preempt a worker in the middle of its unit, and everyone waits for that unit
// (measured on 2 cores: docs/performance.md, the fp32 kernel). The caller then waits only for units
// a helper already claimed, yielding now and then in case that helper was preempted; a helper that
// starts after all units are claimed returns at once, so a busy pool costs no deadlock.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace nj {

// Threads a call may use: the pool's, capped by NANOJAX_KERNEL_THREADS=N (1: the caller only), read
// at each call (tests vary it).
inline int64_t kernel_threads(const xla::ffi::ThreadPool& pool) {
  const char* cap = std::getenv("NANOJAX_KERNEL_THREADS");
  const int64_t limit = cap ? std::max<int64_t>(1, std::atoll(cap)) : INT64_MAX;
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), limit));
}

// Runs unit(u) once for every u in [0, n), on the caller and up to kernel_threads(pool) - 1 helpers;
// returns when all n are done. `unit` may capture the caller's locals by reference: it only runs on
// claimed units, and every claimed unit finishes before this returns.
template <class Unit>
void parallel_units(xla::ffi::ThreadPool& pool, int64_t n, const Unit& unit) {
  struct State {
    const Unit& unit;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    State(const Unit& u, int64_t count) : unit(u), n(count) {}
  };
  const auto work = [](State& s) {
    for (;;) {
      const int64_t u = s.next.fetch_add(1, std::memory_order_relaxed);
      if (u >= s.n) return;
      s.unit(u);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  auto st = std::make_shared<State>(unit, n);  // shared: a late helper may outlive this call
  const int64_t helpers = std::min(kernel_threads(pool) - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st, work] { work(*st); });
  work(*st);
  for (int spin = 0; st->done.load(std::memory_order_acquire) < n; ++spin) {
    _mm_pause();
    if (spin % 256 == 255) std::this_thread::yield();
  }
}

}  // namespace nj
