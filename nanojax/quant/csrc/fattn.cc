// Causal self-attention for fp32 training on the CPU, forward and backward, as two XLA FFI custom calls.
//
//   forward:  q (B, T, N, H), k, v (B, T, K, H)           -> out (B, T, N, H), lse (B, N, T)
//   backward: q, k, v, out, lse, dout                      -> dq (B, T, N, H), dk, dv (B, T, K, H)
//
//   out[b, t, n] = sum_{s <= t} softmax_s(q[b, t, n] . k[b, s, n / G] * H^-0.5) v[b, s, n / G]
//   lse[b, n, t] = log sum_{s <= t} exp(q . k * H^-0.5): the row's log-normaliser, kept for the backward.
//
// The tensors stay in the model's own (B, T, heads, H) layout: a head's rows are H contiguous floats,
// N*H (or K*H) apart, read and written in place, so nothing is transposed outside the calls.
// K kv heads, G = N / K query heads per kv head (grouped-query attention).
//
// Why: XLA:CPU runs training attention as batched dots at ~17-54 GFLOP/s plus separate passes for the
// mask, the softmax and the transposes around them (docs/performance/training.md). Here the whole
// attention of a (batch row, kv head) is one pass whose blocks sit in L1/L2.
//
// Algorithm (FlashAttention-2, Dao 2023, arXiv:2307.08691, with whole key rows instead of an online
// softmax: a training row has at most T keys, so a block of 32 query rows' scores, 32 x T floats, fits
// in L2 for T up to several thousand):
//   forward, per unit (b, kv head, block of 32 query rows), for each of the G query heads:
//     S = Q K^T * scale over keys [0, t1) (t1 = the block's last row + 1); per row t: m = max_{s<=t} S,
//     P = exp(S - m) (0 for s > t), l = sum P, lse = m + log l; O = P V / l.
//   backward, per unit (b, kv head), for each of its G query heads and query block:
//     recompute S and P = exp(S - lse); dP = dO V^T; D_t = dO_t . O_t; dS = P * (dP - D);
//     dV += P^T dO; dK += dS^T Q * scale; dQ = dS K * scale.
//   A unit owns its kv head's dK and dV (accumulated over the G query heads in a private buffer) and its
//   query heads' dQ rows, so no two threads write the same output.
// Causality: a tile of query rows computes only the key columns its last row can see (rounded up to 16),
// and the P V / dS K products stop at that row's last key; masked entries of P and dS are exact zeros.
//
// The products are register-tiled AVX-512 loops (4 rows x up to 64 columns of accumulators); exp is a
// vectorised Cody-Waite reduction + degree-7 Taylor polynomial + scalef (max error measured against
// double exp: nj_fattn_exp_max_ulp below, and docs/attention.md); both are in fattn_tiles.inc. ISA:
// AVX-512 for H a multiple of 16 (picked at run time, NANOJAX_KERNEL_ISA=scalar forces the scalar
// loops, as in dattn.cc); the scalar loops (std::exp) exist for tests and odd head sizes, not for
// speed. Python uses the kernel only with AVX-512 (nj_fattn_vector_bits).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Buf = ffi::Buffer<ffi::F32>;
using Res = ffi::ResultBuffer<ffi::F32>;

namespace {

constexpr int64_t kRows = 32;  // query rows per block
constexpr int64_t kMR = 4;     // rows per register tile
constexpr int64_t kPrefetchRows = 128;  // k and v rows a backward unit prefetches before packing them

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

bool use_avx512(int64_t H) {
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  if (cap != nullptr && (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0)) return false;
  return H % 16 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

#include "fattn_tiles.inc"  // exp, the score / product tiles, softmax rows, packing: AVX-512 and scalar

// ---------------------------------------------------------------------------------------------------
// The two passes.

struct Ops {
  decltype(&nt_scalar) nt;
  decltype(&nn_scalar) nn;
  decltype(&softmax_row_scalar) softmax_row;
  decltype(&grad_row_scalar) grad_row;
  decltype(&dot_scalar) dot;
  decltype(&pack_scalar) pack;
};

Ops ops_for(int64_t H) {
  if (use_avx512(H)) return {nt_avx512, nn_avx512, softmax_row_avx512, grad_row_avx512, dot_avx512, pack_avx512};
  return {nt_scalar, nn_scalar, softmax_row_scalar, grad_row_scalar, dot_scalar, pack_scalar};
}

struct Shape {
  int64_t B, T, N, K, H;
  int64_t G() const { return N / K; }
  int64_t qrow() const { return N * H; }  // floats between rows t and t+1 of one query head
  int64_t krow() const { return K * H; }
  const float* head(const float* x, int64_t b, int64_t heads, int64_t n, int64_t t) const {
    return x + ((b * T + t) * heads + n) * H;
  }
};

// kt (H, npad) = k[b, 0:n, kh]^T, zero-padded to npad columns.
void pack_transposed(const Ops& op, const Shape& sh, const float* k, int64_t b, int64_t kh, int64_t n, int64_t npad,
                     float* kt) {
  op.pack(sh.head(k, b, sh.K, kh, 0), sh.krow(), n, sh.H, npad, kt);
}

// Asks for rows t0 .. t0 + rows - 1 of head n of x (heads per row), H floats each, to be brought into L1.
void prefetch_rows(const Shape& sh, const float* x, int64_t heads, int64_t b, int64_t n, int64_t t0, int64_t rows) {
  for (int64_t t = t0; t < t0 + rows; ++t) {
    const char* row = reinterpret_cast<const char*>(sh.head(x, b, heads, n, t));
    for (int64_t byte = 0; byte < sh.H * 4; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T0);
  }
}

struct Scratch {
  std::vector<float> kt, vt, s, dp, dk, dv;
};

// Forward unit: batch row b, kv head kh, all G query heads of kh, query blocks c, c + stride, ... (k is
// transposed once for all of them, up to the last block's keys).
void forward_unit(const Ops& op, const Shape& sh, const float* q, const float* k, const float* v, float* out,
                  float* lse, int64_t b, int64_t kh, int64_t c, int64_t stride, Scratch& w) {
  const int64_t H = sh.H, blocks = (sh.T + kRows - 1) / kRows;
  const int64_t last = c + (blocks - 1 - c) / stride * stride;
  const int64_t kpad = round16(std::min(sh.T, (last + 1) * kRows));
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  w.kt.resize(H * kpad);
  w.s.resize(kRows * kpad);
  pack_transposed(op, sh, k, b, kh, std::min(sh.T, (last + 1) * kRows), kpad, w.kt.data());
  float* s = w.s.data();
  for (int64_t blk = last; blk >= 0 && blk >= c; blk -= stride) {
    const int64_t t0 = blk * kRows, t1 = std::min(sh.T, t0 + kRows), M = t1 - t0, npad = round16(t1);
    for (int64_t g = 0; g < sh.G(); ++g) {
      const int64_t n = kh * sh.G() + g;
      op.nt(sh.head(q, b, sh.N, n, t0), sh.qrow(), M, w.kt.data(), kpad, H, npad, t0, scale, s, npad);
      float inv[kRows];
      for (int64_t i = 0; i < M; ++i) {
        float l;
        const float m = op.softmax_row(s + i * npad, t0 + i + 1, npad, &l);
        lse[(b * sh.N + n) * sh.T + t0 + i] = m + std::log(l);
        inv[i] = 1.0f / l;
      }
      float* o = out + ((b * sh.T + t0) * sh.N + n) * H;
      op.nn(s, npad, 1, M, t1, Band::kUpTo, t0, sh.head(v, b, sh.K, kh, 0), sh.krow(), H, 1.0f, false, o,
            sh.qrow());
      for (int64_t i = 0; i < M; ++i)
        for (int64_t h = 0; h < H; ++h) o[i * sh.qrow() + h] *= inv[i];
    }
  }
}

// Backward unit: batch row b, kv head kh: dk, dv of kh and dq of its G query heads, all rows.
void backward_unit(const Ops& op, const Shape& sh, const float* q, const float* k, const float* v,
                   const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   int64_t b, int64_t kh, Scratch& w) {
  const int64_t H = sh.H, T = sh.T, tpad = round16(T);
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  w.kt.resize(H * tpad);
  w.vt.resize(H * tpad);
  w.s.resize(kRows * tpad);
  w.dp.resize(kRows * tpad);
  w.dk.assign(T * H, 0.0f);
  w.dv.assign(T * H, 0.0f);
  // The forward's q, k, v, o are long out of cache by now: ask for k and v's first rows and the first
  // block's q, dO, O rows together (their misses overlap instead of stalling the loops one by one),
  // and in each block for the next block's (docs/performance/training.md, the attention backward).
  const int64_t kv_rows = std::min(T, kPrefetchRows);
  prefetch_rows(sh, k, sh.K, b, kh, 0, kv_rows);
  prefetch_rows(sh, v, sh.K, b, kh, 0, kv_rows);
  const auto prefetch_block = [&](int64_t n, int64_t t0) {
    const int64_t rows = std::min(T, t0 + kRows) - t0;
    for (const float* x : {q, dout, o}) prefetch_rows(sh, x, sh.N, b, n, t0, rows);
  };
  prefetch_block(kh * sh.G(), 0);
  pack_transposed(op, sh, k, b, kh, T, tpad, w.kt.data());
  pack_transposed(op, sh, v, b, kh, T, tpad, w.vt.data());
  float* s = w.s.data();
  float* dp = w.dp.data();
  for (int64_t g = 0; g < sh.G(); ++g) {
    const int64_t n = kh * sh.G() + g;
    for (int64_t t0 = 0; t0 < T; t0 += kRows) {
      const int64_t t1 = std::min(T, t0 + kRows), M = t1 - t0, npad = round16(t1);
      const float* qb = sh.head(q, b, sh.N, n, t0);
      const float* dob = sh.head(dout, b, sh.N, n, t0);
      if (t1 < T) prefetch_block(n, t1);
      else if (g + 1 < sh.G()) prefetch_block(n + 1, 0);
      op.nt(qb, sh.qrow(), M, w.kt.data(), tpad, H, npad, t0, scale, s, npad);
      op.nt(dob, sh.qrow(), M, w.vt.data(), tpad, H, npad, t0, 1.0f, dp, npad);
      for (int64_t i = 0; i < M; ++i) {
        const float D = op.dot(dob + i * sh.qrow(), sh.head(o, b, sh.N, n, t0 + i), H);
        op.grad_row(s + i * npad, dp + i * npad, t0 + i + 1, npad, lse[(b * sh.N + n) * T + t0 + i], D);
      }
      // dV[j] += sum_i P[i, j] dO[i] and dK[j] += sum_i dS[i, j] Q[i]: rows j < t1, i >= j - t0.
      op.nn(s, 1, npad, t1, M, Band::kFrom, t0, dob, sh.qrow(), H, 1.0f, true, w.dv.data(), H);
      op.nn(dp, 1, npad, t1, M, Band::kFrom, t0, qb, sh.qrow(), H, 1.0f, true, w.dk.data(), H);
      // dQ[i] = scale * sum_j dS[i, j] K[j], j <= t0 + i.
      op.nn(dp, npad, 1, M, t1, Band::kUpTo, t0, sh.head(k, b, sh.K, kh, 0), sh.krow(), H, scale, false,
            dq + ((b * T + t0) * sh.N + n) * H, sh.qrow());
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    float* dkr = dk + ((b * T + t) * sh.K + kh) * H;
    float* dvr = dv + ((b * T + t) * sh.K + kh) * H;
    for (int64_t h = 0; h < H; ++h) {
      dkr[h] = w.dk[t * H + h] * scale;
      dvr[h] = w.dv[t * H + h];
    }
  }
}

ffi::Error shape_of(const Buf& q, const Buf& k, const Buf& v, Shape* sh) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("nanojax causal attention: q (B, T, N, H), k and v (B, T, K, H)");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i] || (i != 2 && kd[i] != qd[i]))
      return ffi::Error::InvalidArgument("nanojax causal attention: k and v must be (B, T, K, H) with q's B, T, H");
  *sh = Shape{qd[0], qd[1], qd[2], kd[2], qd[3]};
  if (sh->K < 1 || sh->N % sh->K != 0)
    return ffi::Error::InvalidArgument("nanojax causal attention: N must be a multiple of K");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Buf q, Buf k, Buf v, Res out, Res lse) {
  Shape sh;
  if (ffi::Error e = shape_of(q, k, v, &sh); e.failure()) return e;
  if (out->element_count() != q.element_count() || lse->element_count() != static_cast<size_t>(sh.B * sh.N * sh.T))
    return ffi::Error::InvalidArgument("nanojax causal attention: out must be q's shape and lse (B, N, T)");
  if (sh.B * sh.T * sh.N * sh.H == 0) return ffi::Error::Success();
  const Ops op = ops_for(sh.H);
  // Units: (b, kv head, every stride-th query block from c), stride just large enough to give each
  // thread ~4 units; the latest blocks (the most keys) run first so the last to finish are short.
  const int64_t blocks = (sh.T + kRows - 1) / kRows, heads = sh.B * sh.K;
  const int64_t want = 4 * nj::kernel_threads(pool);
  const int64_t stride = std::clamp<int64_t>((want + heads - 1) / heads, 1, blocks);
  nj::parallel_units(pool, heads * stride, [&](int64_t u) {
    thread_local Scratch w;
    const int64_t bk = u / stride;
    forward_unit(op, sh, q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data(),
                 bk / sh.K, bk % sh.K, u % stride, stride, w);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, Buf q, Buf k, Buf v, Buf o, Buf lse, Buf dout, Res dq, Res dk,
                        Res dv) {
  Shape sh;
  if (ffi::Error e = shape_of(q, k, v, &sh); e.failure()) return e;
  if (o.element_count() != q.element_count() || dout.element_count() != q.element_count() ||
      lse.element_count() != static_cast<size_t>(sh.B * sh.N * sh.T) || dq->element_count() != q.element_count() ||
      dk->element_count() != k.element_count() || dv->element_count() != v.element_count())
    return ffi::Error::InvalidArgument("nanojax causal attention backward: out, dout, dq must be q's shape, "
                                       "lse (B, N, T), dk and dv k's shape");
  if (sh.B * sh.T * sh.N * sh.H == 0) return ffi::Error::Success();
  const Ops op = ops_for(sh.H);
  nj::parallel_units(pool, sh.B * sh.K, [&](int64_t u) {
    thread_local Scratch w;
    backward_unit(op, sh, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
                  dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), u / sh.K, u % sh.K, w);
  });
  return ffi::Error::Success();
}

}  // namespace

// Operands and results as the file's header lists them (q, k, v [, out, lse, dout]).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjCausalAttentionFwd, ForwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Ret<Buf>()
                                  .Ret<Buf>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjCausalAttentionBwd, BackwardImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
                                  .Arg<Buf>().Arg<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>());

// What the training attention kernel runs with for a head size H: 512 (AVX-512) or 0 (scalar loops).
extern "C" int nj_fattn_vector_bits(int64_t H) { return use_avx512(H) ? 512 : 0; }

// The largest |exp512(x) - exp(x)| / ulp(exp(x)) (ulp: the float spacing at the exact value) over n
// points evenly spaced in [lo, hi], n >= 2; -1 without AVX-512. For the tests and docs/attention.md.
extern "C" double nj_fattn_exp_max_ulp(float lo, float hi, int64_t n) {
  if (!use_avx512(16) || n < 2) return -1.0;
  return exp_max_ulp_avx512(lo, hi, n);
}
