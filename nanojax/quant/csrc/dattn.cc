// Decode attention over a KV cache read in place (the serving engine's slots, generate's window), as
// an XLA FFI custom call on the CPU.
//
//   out (R, N, H) = softmax(q k^T * H^-0.5) v   for each row r and query head n, over cache positions
//   [starts[r], lens[r]) of cache rows rows[r] * K + n / G (K kv heads, G = N / K query heads per kv
//   head).
//
//   q (R, N, H) fp32; k, v (S * K, C, H) fp32 (infer/slots.py's slot cache or infer/engine.py's
//   window, read in place); rows, lens, starts int32 (R,) (starts: generate's left padding, 0 in
//   the slot engine); out (R, N, H) fp32.
//
// Why: XLA:CPU runs the two batched products of one-query attention (a (1, H) x (H, W) dot per row
// and kv head) on one thread at ~11-16 GB/s, and over the whole attention window W of the batch (the
// furthest row's), so at 16 slots and a 256-slot window the attention read 300 MB a step and cost
// ~27 ms of a ~75 ms step (docs/serving.md). Here each (row, kv head) is one unit of parallel.h's
// split over both threads, and reads only its own lens[r] positions, straight from the cache: no
// window is copied out and back.
//
// Per unit: the G query heads' scores for every position (one pass over k), their max, exp and sum,
// then one pass over v accumulating the exp-weighted rows, divided by the sum at the end. The result
// of a row depends only on its own q, cache rows and length (not on R, the other rows or the thread
// count), so a request decodes to the same bits alone and in a batch.
//
// ISA: an AVX-512 loop for H a multiple of 16 (GCC target attribute, picked at run time); a scalar
// loop otherwise. nj_attn_vector_bits() reports which; Python uses the kernel only with AVX-512 (the
// scalar loop exists for correctness tests and odd head sizes, not for speed).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct AttnProblem {
  int64_t R, N, H, K, C;
  const float* q;       // (R, N, H)
  const float* k;       // (S*K, C, H)
  const float* v;       // (S*K, C, H)
  const int32_t* rows;  // (R,)
  const int32_t* lens;  // (R,)
  const int32_t* starts;  // (R,)
  float* out;           // (R, N, H)
};

bool use_avx512(int64_t H) {
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  if (cap != nullptr && (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0)) return false;
  return H % 16 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

// scores[g * n + t] = dot(q_g, k_t) * scale for t < n; q: the G query rows (G, H), k: n cache rows.
__attribute__((target("avx512f,fma"))) void scores_avx512(const float* q, int64_t G, const float* k, int64_t n,
                                                         int64_t H, float scale, float* scores) {
  for (int64_t t = 0; t < n; ++t) {
    const float* kt = k + t * H;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * H;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kt));
      for (int64_t h = 16; h < H; h += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + h), _mm512_loadu_ps(kt + h), acc);
      scores[g * n + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// out_g (H) = sum_t p[g * n + t] * v_t, for each of the G rows.
__attribute__((target("avx512f,fma"))) void mix_avx512(const float* p, int64_t G, const float* v, int64_t n,
                                                      int64_t H, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t h0 = 0; h0 < H; h0 += 64) {  // 4 accumulators of 16 at a time
      const int64_t nv = std::min<int64_t>(4, (H - h0) / 16);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t t = 0; t < n; ++t) {
        const __m512 w = _mm512_set1_ps(p[g * n + t]);
        const float* vt = v + t * H + h0;
        for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16 * j), acc[j]);
      }
      for (int64_t j = 0; j < nv; ++j) _mm512_storeu_ps(out + g * H + h0 + 16 * j, acc[j]);
    }
  }
}

void scores_scalar(const float* q, int64_t G, const float* k, int64_t n, int64_t H, float scale, float* scores) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.0f;
      for (int64_t h = 0; h < H; ++h) acc = std::fmaf(q[g * H + h], k[t * H + h], acc);
      scores[g * n + t] = acc * scale;
    }
}

void mix_scalar(const float* p, int64_t G, const float* v, int64_t n, int64_t H, float* out) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      for (int64_t t = 0; t < n; ++t) acc = std::fmaf(p[g * n + t], v[t * H + h], acc);
      out[g * H + h] = acc;
    }
}

// One (row, kv head) unit: its G query heads over its cache row's positions [starts[r], lens[r])
// (lens clamped to [1, C], starts to [0, lens - 1]: at least one position).
void run_unit(const AttnProblem& p, bool avx512, int64_t u, std::vector<float>& buf) {
  const int64_t r = u / p.K, kh = u % p.K, G = p.N / p.K, H = p.H;
  const int64_t end = std::clamp<int64_t>(p.lens[r], 1, p.C);
  const int64_t start = std::clamp<int64_t>(p.starts[r], 0, end - 1);
  const int64_t n = end - start;
  const int64_t cache_row = int64_t(p.rows[r]) * p.K + kh;
  const float* q = p.q + (r * p.N + kh * G) * H;
  const float* k = p.k + (cache_row * p.C + start) * H;
  const float* v = p.v + (cache_row * p.C + start) * H;
  float* out = p.out + (r * p.N + kh * G) * H;
  buf.resize(G * n);
  float* s = buf.data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  if (avx512) scores_avx512(q, G, k, n, H, scale, s);
  else scores_scalar(q, G, k, n, H, scale, s);
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    const float m = *std::max_element(sg, sg + n);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - m);
      sum += sg[t];
    }
    inv[g] = 1.0f / sum;
  }
  if (avx512) mix_avx512(s, G, v, n, H, out);
  else mix_scalar(s, G, v, n, H, out);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < H; ++h) out[g * H + h] *= inv[g];
}

ffi::Error DecodeAttnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> lens,
                          ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out, int64_t kv_heads) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2])
    return ffi::Error::InvalidArgument("nanojax decode attention: q (R, N, H), k and v (S*K, C, H)");
  const int64_t R = qd[0], N = qd[1], H = qd[2], C = kd[1];
  if (kv_heads < 1 || N % kv_heads != 0 || kd[0] % kv_heads != 0 || kd[2] != H)
    return ffi::Error::InvalidArgument("nanojax decode attention: N and S*K must be multiples of kv_heads, "
                                       "and k's head size must be q's");
  if (rows.element_count() != R || lens.element_count() != R || starts.element_count() != R)
    return ffi::Error::InvalidArgument(
        "nanojax decode attention: rows, lens and starts need one entry per row of q");
  const int64_t slots = kd[0] / kv_heads;
  for (int64_t r = 0; r < R; ++r)
    if (rows.typed_data()[r] < 0 || rows.typed_data()[r] >= slots)
      return ffi::Error::InvalidArgument("nanojax decode attention: a row's slot is outside the cache");
  if (R == 0 || C == 0) return ffi::Error::Success();
  const AttnProblem p{R, N, H, kv_heads, C, q.typed_data(), k.typed_data(), v.typed_data(),
                      rows.typed_data(), lens.typed_data(), starts.typed_data(), out->typed_data()};
  const bool avx512 = use_avx512(H);
  nj::parallel_units_spinning(pool, R * kv_heads, [&](int64_t u) {
    thread_local std::vector<float> buf;
    run_unit(p, avx512, u, buf);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjDecodeAttention, DecodeAttnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (R, N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k (S*K, C, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v (S*K, C, H)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows (R,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lens (R,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // starts (R,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out (R, N, H)
                                  .Attr<int64_t>("kv_heads"));

// What the attention kernel runs with for a head size H, for kernels_info(): 512 or 0 (scalar).
extern "C" int nj_attn_vector_bits(int64_t H) { return use_avx512(H) ? 512 : 0; }
