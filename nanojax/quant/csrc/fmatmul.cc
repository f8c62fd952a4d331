// fp32 matrix products for small M (decode), as an XLA FFI custom call on the CPU backend.
//
//   y (M, O) = x (M, I) @ w (I, O),   all float32, w in the model's own in-major layout (row i of w
//   holds the O weights that input i feeds), read in place: no transpose, no copy.
//
// Why: XLA:CPU runs a layer-sized matrix-vector dot (768 x 2048) on one thread, and a batch-1
// decode step is nothing but weight streaming; at M = 8..32 (the serving engine's batch) its dot
// reads the weights once per few rows. This kernel reads each weight once per call for all M rows
// and spreads the work over XLA's intra-op thread pool (parallel.h).
//
// Summation order (the determinism contract): the I input rows are cut into chunks of kChunk rows,
// [0, kChunk), [kChunk, 2 kChunk), ..., fixed by I alone. Within chunk k every y[m, o] is one fp32
// fma chain c_k = fma(x[m, i], w[i, o], ...) over its rows in order, starting at 0 (held in a
// register within a tile of rows, stored to and reloaded from fp32 memory between tiles, which
// rounds nothing); then y = (...((c_0 + c_1) + c_2) ...) + c_last, fp32 adds in chunk order. Nothing
// in that depends on M, on which register block of rows of x a row falls in, on the column split,
// on the thread count or on the ISA (the scalar loop uses fmaf), so a row's result is bit-identical
// at M = 1 and inside a batch of 32, as the serving engine's batch-vs-single greedy comparison needs.
//
// Two ways to cut the work, same numbers (docs/performance/decode.md, "fp32 small-M kernel"):
//  * M <= kSplitMaxM, or partial sums of at most kMaxPartial bytes: units are (chunk, column slab)
//    pairs with slabs as wide as kWide columns, so a unit streams whole contiguous runs of w (one
//    128-row chunk of a 2048-wide matrix is one contiguous 1 MiB block) and the hardware
//    prefetcher follows it. Chunk 0 writes y, chunk k > 0 a partial buffer; the unit that
//    finishes a slab's last chunk adds the partials to y in chunk order.
//  * otherwise (large M x O, e.g. M = 32 on a 32000-wide head): units are column slabs (about two
//    per thread), each walking all chunks in order, chunk 0 into y and the others into a scratch
//    added to y right after.
// At M = 1 the row split's units stream their rows front to back (run_stream, slabs up to
// kStreamWide columns). Otherwise both forms walk their rows in tiles of kRows rows x kGroup
// columns: every register block of rows of x passes over a tile while it is in L1, and the first
// pass prefetches the same columns of the next tile (kRows rows further) into L2, so DRAM reads
// overlap the FMAs of the current tile (not at M <= 2 on a matrix as wide as the head: run_chain).
// Register blocks are 8 rows x 3 zmm (AVX-512) down to 1 x 12; every loop over a block's rows and
// vectors is unrolled, without which GCC 12 kept the accumulators in memory and stored them all
// on every row of w (the earlier kernel's 4 x 4 block did).
//
// ISA: AVX-512 and AVX2 loops (GCC target attributes) picked at each call with __builtin_cpu_supports
// (capped by NANOJAX_KERNEL_ISA=avx512|avx2|scalar, as the quant kernels), a scalar loop otherwise.
//
// Masks: only a ragged end of columns loads and stores through a mask; whole vectors use plain
// loads and stores. On Zen 5 (AMD EPYC, family 26) a masked load streams from DRAM ~25% slower
// than a plain one even with every lane on (a C loop over llama-134m's products, both threads:
// 0.75-0.78x), which held the whole batch-1 decode below llama.cpp F32 there (docs/performance/decode.md,
// "Decode on Zen 5: masked loads and 2 MiB pages"; the Xeon was not measured).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 128;     // input rows per summation chunk: part of the result's definition
constexpr int64_t kMaxM = 32;       // rows of x per call (FP32_KERNEL_MAX_ROWS in ffi.py)
constexpr int64_t kSplitMaxM = 4;   // the row split always up to this M; above it only while
constexpr int64_t kMaxPartial = 2 << 20;  // the partial sums take at most these bytes (one L2)
constexpr int64_t kWide = 4096;     // widest column slab of the row-split form (16 KiB runs of a row)
constexpr int64_t kStreamWide = 16384;  // widest slab at M = 1 (run_stream): 64 KiB runs of a row
constexpr int64_t kMaxSlab = 1024;  // widest column slab of the column-split form
constexpr int64_t kGroup = 192;     // columns per tile: 4 x 48, 3 x 64, 2 x 96, 1 x 192 (register blocks)
constexpr int64_t kRows = 16;       // rows per tile (kRows x kGroup floats = 12 KiB, L1) and prefetch distance

struct Fp32Problem {
  int64_t M, I, O;
  const float* x;  // (M, I)
  const float* w;  // (I, O)
  float* y;        // (M, O)
};

// One row of w into MB x NV accumulators: a[m][v] += x[m * ldx] * wr[16 v ...]. The loops over
// m and v must unroll completely (hence the pragmas here and in block_avx512): otherwise GCC 12
// kept `a` in memory and stored every accumulator on every row.
template <int MB, int NV, bool FULL>
__attribute__((target("avx512f,fma"), always_inline)) inline void row_avx512(__m512 (&a)[MB][NV],
                                                                             const __mmask16 (&mk)[NV],
                                                                             const float* x, int64_t ldx,
                                                                             const float* wr) {
  __m512 b[NV];
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) b[v] = FULL ? _mm512_loadu_ps(wr + 16 * v) : _mm512_maskz_loadu_ps(mk[v], wr + 16 * v);
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    const __m512 xs = _mm512_set1_ps(x[m * ldx]);
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[m][v] = _mm512_fmadd_ps(xs, b[v], a[m][v]);
  }
}

// One tile pass of one register block: MB rows of x (x[m * ldx + r], r < nrows), NV vectors of
// columns of w (w[r * ldw + c], c < ncols <= 16 NV) into acc[m * ldacc + c]; acc starts at 0 when
// `zero`, else is loaded. The rows r < npf also prefetch w[(r + kRows) * ldw + c] into L2.
template <int MB, int NV, bool FULL>
__attribute__((target("avx512f,fma"))) void block_avx512(const float* x, int64_t ldx, const float* w,
                                                         int64_t ldw, int64_t nrows, float* acc, int64_t ldacc,
                                                         int64_t ncols, bool zero, int64_t npf) {
  __mmask16 mk[NV];
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const int64_t r = ncols - 16 * v;
    mk[v] = r >= 16 ? __mmask16(0xFFFF) : r <= 0 ? __mmask16(0) : __mmask16((1u << r) - 1);
  }
  __m512 a[MB][NV];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      a[m][v] = zero ? _mm512_setzero_ps()
                : FULL ? _mm512_loadu_ps(acc + m * ldacc + 16 * v) : _mm512_maskz_loadu_ps(mk[v], acc + m * ldacc + 16 * v);
  for (int64_t r = 0; r < nrows; ++r) {
    if (r < npf)
      for (int v = 0; v < NV; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + kRows) * ldw + 16 * v), _MM_HINT_T1);
    row_avx512<MB, NV, FULL>(a, mk, x + r, ldx, w + r * ldw);
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (FULL) _mm512_storeu_ps(acc + m * ldacc + 16 * v, a[m][v]);
      else _mm512_mask_storeu_ps(acc + m * ldacc + 16 * v, mk[v], a[m][v]);
    }
}

// AVX2: the same with 8-lane vectors and masked loads and stores for a ragged end.
template <int MB, int NV, bool FULL>
__attribute__((target("avx2,fma"))) void block_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw,
                                                   int64_t nrows, float* acc, int64_t ldacc, int64_t ncols,
                                                   bool zero, int64_t npf) {
  __m256i mk[NV];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v)
    mk[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(ncols - 8 * v, 0, 8))),
                               lane);
  __m256 a[MB][NV];
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      a[m][v] = zero ? _mm256_setzero_ps()
                : FULL ? _mm256_loadu_ps(acc + m * ldacc + 8 * v) : _mm256_maskload_ps(acc + m * ldacc + 8 * v, mk[v]);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* wr = w + r * ldw;
    if (r < npf)
      #pragma GCC unroll 16
      for (int v = 0; v < NV; v += 2)
        _mm_prefetch(reinterpret_cast<const char*>(wr + kRows * ldw + 8 * v), _MM_HINT_T1);
    __m256 b[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = FULL ? _mm256_loadu_ps(wr + 8 * v) : _mm256_maskload_ps(wr + 8 * v, mk[v]);
    #pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const __m256 xs = _mm256_set1_ps(x[m * ldx + r]);
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[m][v] = _mm256_fmadd_ps(xs, b[v], a[m][v]);
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (FULL) _mm256_storeu_ps(acc + m * ldacc + 8 * v, a[m][v]);
      else _mm256_maskstore_ps(acc + m * ldacc + 8 * v, mk[v], a[m][v]);
    }
}

void block_scalar(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t nrows, float* acc,
                  int64_t ldacc, int64_t ncols, bool zero, int mb) {
  for (int m = 0; m < mb; ++m) {
    float* am = acc + m * ldacc;
    if (zero) std::fill(am, am + ncols, 0.0f);
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t c = 0; c < ncols; ++c) am[c] = std::fmaf(x[m * ldx + r], w[r * ldw + c], am[c]);
  }
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

// The widest register block (rows of x) that fits the remaining rows: 8 (AVX-512 only), 4, 2, 1.
int block_rows(Tier tier, int64_t rows_left) {
  if (tier == kAvx512 && rows_left >= 8) return 8;
  return rows_left >= 4 ? 4 : rows_left >= 2 ? 2 : 1;
}

// One register block over one tile (nc <= kGroup columns), in as many column steps as it needs.
// Register budget: MB * NV accumulators + NV loads + 1 broadcast (AVX-512: 32 zmm, AVX2: 16 ymm).
void run_block(Tier tier, int mb, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t nrows,
               float* acc, int64_t ldacc, int64_t nc, bool zero, int64_t npf) {
  // FULL: the step's columns are all there, so its loads and stores go unmasked (Masks, above).
#define NJ_BLOCK(KIND, MB, NV)                                                                    \
  (nc - c >= step ? KIND<MB, NV, true>(x, ldx, wc, ldw, nrows, ac, ldacc, nc - c, zero, npf)     \
                  : KIND<MB, NV, false>(x, ldx, wc, ldw, nrows, ac, ldacc, nc - c, zero, npf))
  if (tier == kAvx512) {  // (8, 3), (4, 4), (2, 6), (1, 12): 24, 16, 12, 12 accumulators
    const int64_t step = mb == 8 ? 48 : mb == 4 ? 64 : mb == 2 ? 96 : 192;
    for (int64_t c = 0; c < nc; c += step) {
      const float* wc = w + c;
      float* ac = acc + c;
      if (mb == 8) NJ_BLOCK(block_avx512, 8, 3);
      else if (mb == 4) NJ_BLOCK(block_avx512, 4, 4);
      else if (mb == 2) NJ_BLOCK(block_avx512, 2, 6);
      else NJ_BLOCK(block_avx512, 1, 12);
    }
  } else if (tier == kAvx2) {  // (4, 2), (2, 4), (1, 8): 8 accumulators each
    const int64_t step = mb == 4 ? 16 : mb == 2 ? 32 : 64;
    for (int64_t c = 0; c < nc; c += step) {
      const float* wc = w + c;
      float* ac = acc + c;
      if (mb == 4) NJ_BLOCK(block_avx2, 4, 2);
      else if (mb == 2) NJ_BLOCK(block_avx2, 2, 4);
      else NJ_BLOCK(block_avx2, 1, 8);
    }
  } else {
    block_scalar(x, ldx, w, ldw, nrows, acc, ldacc, nc, zero, mb);
  }
#undef NJ_BLOCK
}

// acc[m * ldacc + c] = the fma chain over input rows [i0, i1) of w's columns [c0, c0 + ncols), for
// all M rows of x, from 0. Tiles of kRows x kGroup; the first register block over a tile prefetches
// the next tile's rows (within w) at the same columns.
void run_chain(const Fp32Problem& p, Tier tier, int64_t i0, int64_t i1, int64_t c0, int64_t ncols, float* acc,
               int64_t ldacc) {
  // At M <= 2 on a wide matrix (kRows rows ahead is over 1 MiB: the 32000-wide head) the software
  // prefetch costs more than it brings; the hardware streamer alone read the head ~13% faster,
  // while the layer-sized matrices lost ~7% without it (docs/performance/decode.md).
  const bool prefetch = p.M > 2 || p.O * kRows * int64_t(sizeof(float)) <= (1 << 20);
  for (int64_t r0 = i0; r0 < i1; r0 += kRows) {
    const int64_t nr = std::min(kRows, i1 - r0);
    // rows of this tile whose row + kRows exists
    const int64_t npf = prefetch ? std::clamp<int64_t>(p.I - kRows - r0, 0, nr) : 0;
    for (int64_t c = 0; c < ncols; c += kGroup) {
      const int64_t nc = std::min(kGroup, ncols - c);
      for (int64_t m = 0; m < p.M;) {
        const int mb = block_rows(tier, p.M - m);
        run_block(tier, mb, p.x + m * p.I + r0, p.I, p.w + r0 * p.O + c0 + c, p.O, nr, acc + m * ldacc + c,
                  ldacc, nc, r0 == i0, m == 0 ? npf : 0);
        m += mb;
      }
    }
  }
}

// M = 1, the decode step's product: a unit's rows of w read front to back, four at a time, while
// acc[c] (the unit's sums, at most kStreamWide floats, in L1 or L2) takes the fma chain over them
// in row order: the same chain, hence the same bits, as run_chain's tiles. The walk is linear in
// memory (a tile of run_chain jumps a whole row of w every 0.75 KiB), so the hardware prefetcher
// alone streams it; a software prefetch 2 or 4 rows ahead measured no better on the layers and
// worse on the head. Measured: 1.05-1.09x the tiled walk on llama-134m's layers, 1.15-1.19x on
// its 768 x 32000 head (docs/performance/decode.md, "Decode, third pass").

template <int R>
__attribute__((target("avx512f,fma"))) void stream_rows_avx512(
    const float* x, const float* w, int64_t ldw, float* acc, int64_t ncols, bool zero) {
  __m512 xs[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) xs[r] = _mm512_set1_ps(x[r]);
  int64_t c = 0;
  for (; c + 16 <= ncols; c += 16) {  // whole vectors: plain loads and stores (Masks, above)
    __m512 a = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a = _mm512_fmadd_ps(xs[r], _mm512_loadu_ps(w + r * ldw + c), a);
    _mm512_storeu_ps(acc + c, a);
  }
  if (c == ncols) return;
  const __mmask16 mk = static_cast<__mmask16>((1u << (ncols - c)) - 1);
  __m512 a = zero ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, acc + c);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a = _mm512_fmadd_ps(xs[r], _mm512_maskz_loadu_ps(mk, w + r * ldw + c), a);
  _mm512_mask_storeu_ps(acc + c, mk, a);
}

template <int R>
__attribute__((target("avx2,fma"))) void stream_rows_avx2(
    const float* x, const float* w, int64_t ldw, float* acc, int64_t ncols, bool zero) {
  __m256 xs[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) xs[r] = _mm256_set1_ps(x[r]);
  int64_t c = 0;
  for (; c + 8 <= ncols; c += 8) {
    __m256 a = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + c);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a = _mm256_fmadd_ps(xs[r], _mm256_loadu_ps(w + r * ldw + c), a);
    _mm256_storeu_ps(acc + c, a);
  }
  if (c == ncols) return;
  const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ncols - c)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 a = zero ? _mm256_setzero_ps() : _mm256_maskload_ps(acc + c, mk);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a = _mm256_fmadd_ps(xs[r], _mm256_maskload_ps(w + r * ldw + c, mk), a);
  _mm256_maskstore_ps(acc + c, mk, a);
}

// acc[c] = the fma chain of x[i] * w[i, c0 + c] over rows i in [i0, i1), from 0 (M = 1, not scalar).
void run_stream(const Fp32Problem& p, Tier tier, int64_t i0, int64_t i1, int64_t c0, int64_t ncols, float* acc) {
  const float* w = p.w + c0;
  for (int64_t r = i0; r < i1;) {
    const bool four = i1 - r >= 4;
    if (tier == kAvx512) {
      if (four) stream_rows_avx512<4>(p.x + r, w + r * p.O, p.O, acc, ncols, r == i0);
      else stream_rows_avx512<1>(p.x + r, w + r * p.O, p.O, acc, ncols, r == i0);
    } else {
      if (four) stream_rows_avx2<4>(p.x + r, w + r * p.O, p.O, acc, ncols, r == i0);
      else stream_rows_avx2<1>(p.x + r, w + r * p.O, p.O, acc, ncols, r == i0);
    }
    r += four ? 4 : 1;
  }
}

// y[m, c0 + c] += part[m * ldp + c] for M rows, ncols columns (elementwise fp32 adds: any
// vectorisation gives the same bits).
void add_into(float* y, int64_t ldy, const float* part, int64_t ldp, int64_t M, int64_t ncols) {
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * ldy;
    const float* pm = part + m * ldp;
    for (int64_t c = 0; c < ncols; ++c) ym[c] += pm[c];
  }
}

// Scratch that outlives nothing but one call: grown, never shrunk, one per thread.
float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// The row split: units (chunk k, slab s), chunk-major.
void run_split_rows(xla::ffi::ThreadPool& pool, const Fp32Problem& p, Tier tier) {
  const int64_t nk = (p.I + kChunk - 1) / kChunk;
  const bool stream = p.M == 1 && tier != kScalar;  // run_stream, else run_chain
  const int64_t wide = stream ? kStreamWide : kWide;
  const int64_t ns = (p.O + wide - 1) / wide;
  const int64_t sw = ((p.O + ns - 1) / ns + 15) / 16 * 16;  // slab width, a multiple of 16 columns
  thread_local std::vector<float> part_buf;
  float* part = nk > 1 ? scratch(part_buf, static_cast<size_t>((nk - 1) * p.M * p.O)) : nullptr;
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[ns]);
  for (int64_t s = 0; s < ns; ++s) done[s].store(0, std::memory_order_relaxed);
  nj::parallel_units_spinning(pool, nk * ns, [&](int64_t u) {
    const int64_t k = u / ns, s = u % ns;
    const int64_t c0 = s * sw, nc = std::min(sw, p.O - c0);
    float* dst = k == 0 ? p.y + c0 : part + (k - 1) * p.M * p.O + c0;
    if (stream)
      run_stream(p, tier, k * kChunk, std::min(p.I, (k + 1) * kChunk), c0, nc, dst);
    else
      run_chain(p, tier, k * kChunk, std::min(p.I, (k + 1) * kChunk), c0, nc, dst, p.O);
    // The last unit of a slab to finish adds its partials to y, in chunk order (acq_rel: it sees
    // every other unit's writes to that slab).
    if (done[s].fetch_add(1, std::memory_order_acq_rel) == nk - 1)
      for (int64_t j = 1; j < nk; ++j) add_into(p.y + c0, p.O, part + (j - 1) * p.M * p.O + c0, p.O, p.M, nc);
  });
}

// The column split: units are column slabs, each walking every chunk in order.
void run_split_cols(xla::ffi::ThreadPool& pool, const Fp32Problem& p, Tier tier) {
  const int64_t threads = nj::kernel_threads(pool);
  // About two slabs per thread (so a late helper still finds work), a multiple of 16 columns in
  // [64, kMaxSlab]. The width changes no result.
  int64_t slab = std::clamp<int64_t>((p.O + 2 * threads - 1) / (2 * threads), 64, kMaxSlab);
  slab = (slab + 15) / 16 * 16;
  nj::parallel_units_spinning(pool, (p.O + slab - 1) / slab, [&](int64_t s) {
    thread_local std::vector<float> chunk_buf;
    const int64_t c0 = s * slab, nc = std::min(slab, p.O - c0);
    run_chain(p, tier, 0, std::min(p.I, kChunk), c0, nc, p.y + c0, p.O);
    if (p.I <= kChunk) return;
    float* tmp = scratch(chunk_buf, static_cast<size_t>(p.M * slab));
    for (int64_t i0 = kChunk; i0 < p.I; i0 += kChunk) {
      run_chain(p, tier, i0, std::min(p.I, i0 + kChunk), c0, nc, tmp, slab);
      add_into(p.y + c0, p.O, tmp, slab, p.M, nc);
    }
  });
}

ffi::Error Fp32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("nanojax fp32 kernel: x (M, I) and w (I, O) must be 2-D");
  const int64_t M = xd[0], I = xd[1], O = wd[1];
  if (wd[0] != I) return ffi::Error::InvalidArgument("nanojax fp32 kernel: w must have I rows (x's columns)");
  if (M > kMaxM) return ffi::Error::InvalidArgument("nanojax fp32 kernel: at most 32 rows of x");
  if (M == 0 || O == 0) return ffi::Error::Success();
  float* yp = y->typed_data();
  if (I == 0) {
    std::memset(yp, 0, sizeof(float) * M * O);
    return ffi::Error::Success();
  }
  const Fp32Problem p{M, I, O, x.typed_data(), w.typed_data(), yp};
  const Tier tier = pick_tier();
  // Measured (docs/performance/decode.md): the row split streams faster at every M while its partial
  // sums stay in L2; at M = 32 on the 32000-wide head (20 MB of partials) the column split wins.
  const int64_t partial_bytes = ((I + kChunk - 1) / kChunk - 1) * M * O * int64_t(sizeof(float));
  if (M <= kSplitMaxM || partial_bytes <= kMaxPartial) run_split_rows(pool, p, tier);
  else run_split_cols(pool, p, tier);
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
