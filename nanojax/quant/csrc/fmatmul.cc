// fp32 matrix products for small M (decode), as an XLA FFI custom call on the CPU backend.
//
//   y (M, O) = x (M, I) @ w (I, O),   all float32, w in the model's own in-major layout (row i of w
//   holds the O weights that input i feeds), read in place: no transpose, no copy.
//
// Why: XLA:CPU runs a layer-sized matrix-vector dot (768 x 2048) on one thread (~27 GB/s of weights
// on the Xeon of docs/performance.md) where two threads can stream ~45 GB/s, and a batch-1 decode step
// is nothing but weight streaming. This kernel splits the output columns over XLA's intra-op thread
// pool and reads each weight once per call for all M rows of x.
//
// Scheme: the O columns are cut into slabs (about two per thread, 64..1024 columns), one unit of work
// each. A slab is walked down the I rows in tiles of kIBlock rows x kGroup columns (8 KiB, which stays
// in L1 while every register block of rows of x passes over it), accumulating MB rows x NV vectors
// of y in registers; the first pass over a tile software-prefetches kPrefetch rows ahead, because
// consecutive rows of a slab are O * 4 bytes apart, often in another 4 KiB page, where the hardware
// streamer does not follow. Wider slabs read longer contiguous runs of each row (measured a little
// faster per thread than 128- or 512-column slabs, inside this machine's noise).
//
// Determinism: every y[m, o] is one fp32 accumulator that starts at 0 and takes fma(x[m, i], w[i, o])
// for i = 0, 1, ..., I - 1 in order (kept in a register within an I block, stored to and reloaded
// from an fp32 scratch between blocks, which rounds nothing). That order does not depend on M, on
// which block of rows of x a row falls in, on the slab width, on the thread count or on the ISA (the
// scalar loop uses fmaf), so a row's result is bit-identical at M = 1 and inside a batch of 16, as the
// serving engine's batch-vs-single greedy comparison needs.
//
// ISA: AVX-512 and AVX2 loops (GCC target attributes) picked at each call with __builtin_cpu_supports
// (capped by NANOJAX_KERNEL_ISA=avx512|avx2|scalar, as the quant kernels), a scalar loop otherwise.
// Threads: the slabs are the units of parallel.h's split, shared with qmatmul.cc (claimed by the
// caller and by helpers on the FFI ThreadPool).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxSlab = 1024; // widest slab (output columns per unit of work); scratch row stride
constexpr int64_t kGroup = 128;    // columns per register block group (8 zmm / 16 ymm)
constexpr int64_t kIBlock = 16;    // rows of w per tile (16 x 128 floats = 8 KiB, L1-resident)
constexpr int64_t kMaxM = 16;      // rows of x per call (KERNEL_MAX_ROWS in ffi.py)
constexpr int64_t kPrefetch = 8;   // rows ahead the first pass prefetches

struct Fp32Problem {
  int64_t M, I, O;
  const float* x;  // (M, I)
  const float* w;  // (I, O)
  float* y;        // (M, O)
};

// One register block: rows [m0, m0 + MB) of x, columns [c, c + ncols) of one slab (ncols <= NV * 16
// for AVX-512), input rows [i0, i1). acc: the slab's fp32 scratch (kMaxM x kMaxSlab), row m0 first.
template <int MB, int NV>
__attribute__((target("avx512f,fma"))) void tile_avx512(const float* x, int64_t I, const float* w, int64_t O,
                                                        int64_t i0, int64_t i1, float* acc, int64_t ncols,
                                                        bool prefetch) {
  __mmask16 mk[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t r = ncols - 16 * v;
    mk[v] = r >= 16 ? __mmask16(0xFFFF) : r <= 0 ? __mmask16(0) : __mmask16((1u << r) - 1);
  }
  __m512 a[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) a[m][v] = _mm512_loadu_ps(acc + m * kMaxSlab + 16 * v);
  for (int64_t i = i0; i < i1; ++i) {
    const float* wr = w + i * O;
    if (prefetch)
      for (int v = 0; v < NV; ++v) 
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch * O + 16 * v), _MM_HINT_T0);
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(mk[v], wr + 16 * v);
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(x[m * I + i]);
      for (int v = 0; v < NV; ++v) a[m][v] = _mm512_fmadd_ps(xs, b[v], a[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + m * kMaxSlab + 16 * v, a[m][v]);
}

// AVX2: the same with 8-lane vectors and masked loads for the slab's ragged end.
template <int MB, int NV>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t I, const float* w, int64_t O,
                                                  int64_t i0, int64_t i1, float* acc, int64_t ncols,
                                                  bool prefetch) {
  __m256i mk[NV];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < NV; ++v)
    mk[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(ncols - 8 * v, 8))), lane);
  __m256 a[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) a[m][v] = _mm256_loadu_ps(acc + m * kMaxSlab + 8 * v);
  for (int64_t i = i0; i < i1; ++i) {
    const float* wr = w + i * O;
    if (prefetch)
      for (int v = 0; v < NV; v += 2)
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch * O + 8 * v), _MM_HINT_T0);
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_maskload_ps(wr + 8 * v, mk[v]);
    for (int m = 0; m < MB; ++m) {
      const __m256 xs = _mm256_set1_ps(x[m * I + i]);
      for (int v = 0; v < NV; ++v) a[m][v] = _mm256_fmadd_ps(xs, b[v], a[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + m * kMaxSlab + 8 * v, a[m][v]);
}

void tile_scalar(const float* x, int64_t I, const float* w, int64_t O, int64_t i0, int64_t i1, float* acc,
                 int64_t ncols, int mb) {
  for (int m = 0; m < mb; ++m)
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < ncols; ++c) acc[m * kMaxSlab + c] = std::fmaf(x[m * I + i], w[i * O + c], acc[m * kMaxSlab + c]);
}

enum Tier { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Tier pick_tier() {
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  int top = kAvx512;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) top = kAvx2;
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) top = kScalar;
  if (top >= kAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return kAvx512;
  if (top >= kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

// Rows of x are taken in register blocks of 4, 2, 1 (the widest that fits); the columns of the slab
// in as many vector groups as the block needs. Register budget: MB * NV accumulators + NV loads.
void run_block(Tier tier, const float* x, int64_t I, const float* w, int64_t O, int64_t i0, int64_t i1,
               float* acc, int64_t ncols, int mb, bool prefetch) {
  if (tier == kAvx512) {  // 32 zmm: (1, 8), (2, 8), (4, 4) -> 8, 16, 16 accumulators
    if (mb == 4) {
      for (int64_t c = 0; c < ncols; c += 64)
        tile_avx512<4, 4>(x, I, w + c, O, i0, i1, acc + c, ncols - c, prefetch);
    } else if (mb == 2) {
      tile_avx512<2, 8>(x, I, w, O, i0, i1, acc, ncols, prefetch);
    } else {
      tile_avx512<1, 8>(x, I, w, O, i0, i1, acc, ncols, prefetch);
    }
  } else if (tier == kAvx2) {  // 16 ymm: (1, 8), (2, 4), (4, 2) -> 8, 8, 8 accumulators
    const int nv = mb == 4 ? 2 : mb == 2 ? 4 : 8;
    for (int64_t c = 0; c < ncols; c += 8 * nv) {
      if (mb == 4) tile_avx2<4, 2>(x, I, w + c, O, i0, i1, acc + c, ncols - c, prefetch);
      else if (mb == 2) tile_avx2<2, 4>(x, I, w + c, O, i0, i1, acc + c, ncols - c, prefetch);
      else tile_avx2<1, 8>(x, I, w + c, O, i0, i1, acc + c, ncols - c, prefetch);
    }
  } else {
    tile_scalar(x, I, w, O, i0, i1, acc, ncols, mb);
  }
}

// Columns [c0, c0 + ncols) of y for all M rows (ncols <= kMaxSlab). Tiles of kIBlock rows x kGroup
// columns; every register block of rows of x passes over a tile while it is in L1.
void run_slab(const Fp32Problem& p, Tier tier, int64_t c0, int64_t ncols) {
  alignas(64) float acc[kMaxM * kMaxSlab];
  for (int64_t m = 0; m < p.M; ++m) std::memset(acc + m * kMaxSlab, 0, sizeof(float) * ncols);
  for (int64_t i0 = 0; i0 < p.I; i0 += kIBlock) {
    const int64_t i1 = std::min(p.I, i0 + kIBlock);
    for (int64_t c = 0; c < ncols; c += kGroup) {
      const int64_t nc = std::min(kGroup, ncols - c);
      for (int64_t m = 0; m < p.M;) {
        const int mb = p.M - m >= 4 ? 4 : p.M - m >= 2 ? 2 : 1;
        // Only the first pass reads the tile from memory; it prefetches the rows ahead.
        run_block(tier, p.x + m * p.I, p.I, p.w + c0 + c, p.O, i0, i1, acc + m * kMaxSlab + c, nc, mb, m == 0);
        m += mb;
      }
    }
  }
  for (int64_t m = 0; m < p.M; ++m) std::memcpy(p.y + m * p.O + c0, acc + m * kMaxSlab, sizeof(float) * ncols);
}

ffi::Error Fp32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("nanojax fp32 kernel: x (M, I) and w (I, O) must be 2-D");
  const int64_t M = xd[0], I = xd[1], O = wd[1];
  if (wd[0] != I) return ffi::Error::InvalidArgument("nanojax fp32 kernel: w must have I rows (x's columns)");
  if (M > kMaxM) return ffi::Error::InvalidArgument("nanojax fp32 kernel: at most 16 rows of x");
  if (M == 0 || O == 0) return ffi::Error::Success();
  float* yp = y->typed_data();
  if (I == 0) {
    std::memset(yp, 0, sizeof(float) * M * O);
    return ffi::Error::Success();
  }
  const Fp32Problem p{M, I, O, x.typed_data(), w.typed_data(), yp};
  const Tier tier = pick_tier();
  // Slab width: about two slabs per thread (so a late helper still finds work), a multiple of 16
  // columns, within [64, kMaxSlab]: wider slabs read longer contiguous runs of each weight row.
  // The width changes no result (see Determinism above).
  const int64_t threads = nj::kernel_threads(pool);
  int64_t slab = std::clamp<int64_t>((O + 2 * threads - 1) / (2 * threads), 64, kMaxSlab);
  slab = (slab + 15) / 16 * 16;
  nj::parallel_units(pool, (O + slab - 1) / slab,
                     [&](int64_t c) { run_slab(p, tier, c * slab, std::min(slab, O - c * slab)); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjFp32Matmul, Fp32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (M, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (I, O)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (M, O)

// What the fp32 kernel runs with, for kernels_info(): 512, 256 or 0 (scalar) bits.
extern "C" int nj_fp32_vector_bits() {
  const Tier t = pick_tier();
  return t == kAvx512 ? 512 : t == kAvx2 ? 256 : 0;
}
