// The work split shared by the CPU kernels.
//
// A call's work is n independent units (output-row chunks, output-column slabs). The caller and up
// to threads - 1 helpers claim units from an atomic counter: helpers scheduled on XLA's intra-op
// pool (the FFI ThreadPool; parallel_units, the training kernels) or the kernels' own spinning
// helpers (parallel_units_spinning, the decode kernels; why below). The caller works too, so it
// needs only one helper per *other* core: a helper more than cores would preempt a worker in the
// middle of its unit, and everyone waits for that unit (measured on 2 cores: docs/performance/decode.md,
// the fp32 kernel). The caller then waits only for units a helper already claimed, yielding now and
// then in case that helper was preempted; a helper that starts after all units are claimed returns
// at once, so a busy pool costs no deadlock.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
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

// The helpers. XLA's intra-op pool parks an idle worker, and on these VMs waking it took ~60-170 us
// (measured in a decode step: mean 174 us from Schedule to the helper's first unit, 10% of helpers
// arriving after the caller had done every unit), against ~250-350 us for a whole layer's product;
// so most of a call ran on one thread. These helpers belong to the kernels instead: after a job
// each spins (pause, and a yield now and then so a runnable XLA thread gets the core) for up to
// NANOJAX_KERNEL_SPIN_US microseconds (default kSpinUs; 0: block at once) waiting for the next one,
// which in a decode step comes within a few to a few tens of microseconds; then it blocks on a
// condition variable. One pool per process (the library's kernels share it), threads made on first
// use, never joined (the pool is never destroyed, so a helper never outlives it).
struct Job {
  virtual ~Job() = default;
  virtual void run() = 0;
};

constexpr int64_t kSpinUs = 300;

class Helpers {
 public:
  static Helpers& instance() {
    static Helpers* pool = new Helpers;  // leaked on purpose: helpers block on it until exit
    return *pool;
  }

  // Hands `job` to helpers 0 .. n - 1 (made on first use) and returns at once.
  void post(int64_t n, std::shared_ptr<Job> job) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int64_t>(threads_) < n) {
        // It starts from the generation before this job's, so it takes this job too.
        std::thread([this, t = threads_, g = gen_.load(std::memory_order_relaxed)] { loop(t, g); }).detach();
        ++threads_;
      }
      job_ = std::move(job);
      wanted_ = n;
      gen_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
  }

 private:
  static int64_t spin_us() {
    static const int64_t us = [] {
      const char* v = std::getenv("NANOJAX_KERNEL_SPIN_US");
      return v ? std::max<int64_t>(0, std::atoll(v)) : kSpinUs;
    }();
    return us;
  }

  void loop(int64_t index, uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
      for (int spin = 1; gen_.load(std::memory_order_acquire) == seen; ++spin) {
        _mm_pause();
        if (spin % 64 != 0) continue;
        if (std::chrono::steady_clock::now() < until) {
          std::this_thread::yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        ++sleepers_;
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = gen_.load(std::memory_order_relaxed);
        if (index < wanted_) job = job_;
      }
      if (job) job->run();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::shared_ptr<Job> job_;
  int64_t wanted_ = 0, sleepers_ = 0;
  size_t threads_ = 0;
};

// The units of one call, claimed from an atomic counter by whoever runs it (caller or helper).
template <class Unit>
struct Units : Job {
  const Unit& unit;
  int64_t n;
  std::atomic<int64_t> next{0}, done{0};
  Units(const Unit& u, int64_t count) : unit(u), n(count) {}
  void run() override {
    for (;;) {
      const int64_t u = next.fetch_add(1, std::memory_order_relaxed);
      if (u >= n) return;
      unit(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs unit(u) once for every u in [0, n), on the caller and up to kernel_threads(pool) - 1 helpers
// (XLA's pool, or the spinning Helpers when `spinning`); returns when all n are done. `unit` may
// capture the caller's locals by reference: it only runs on claimed units, and every claimed unit
// finishes before this returns.
template <class Unit>
void run_units(xla::ffi::ThreadPool& pool, int64_t n, const Unit& unit, bool spinning) {
  auto st = std::make_shared<Units<Unit>>(unit, n);  // shared: a late helper may outlive this call
  const int64_t helpers = std::min(kernel_threads(pool) - 1, n - 1);
  if (spinning && helpers > 0) Helpers::instance().post(helpers, st);
  if (!spinning)
    for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st] { st->run(); });
  st->run();
  for (int spin = 0; st->done.load(std::memory_order_acquire) < n; ++spin) {
    _mm_pause();
    if (spin % 256 == 255) std::this_thread::yield();
  }
}

// The training kernels: helpers from XLA's intra-op pool. Their calls sit between XLA's own
// two-thread matmuls, which a helper spinning on the other core would slow (measured: the
// quickstart step 2-10% slower with the spinning helpers).
template <class Unit>
void parallel_units(xla::ffi::ThreadPool& pool, int64_t n, const Unit& unit) {
  run_units(pool, n, unit, false);
}

// The decode kernels: the spinning helpers above, since their calls come back to back (85 a token
// at llama-134m, a few to tens of us apart).
template <class Unit>
void parallel_units_spinning(xla::ffi::ThreadPool& pool, int64_t n, const Unit& unit) {
  run_units(pool, n, unit, true);
}

}  // namespace nj
