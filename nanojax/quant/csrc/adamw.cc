// The whole AdamW update of a train step, every parameter at once, as one XLA FFI custom call.
//
//   for each leaf l and element i (g = the raw gradient, clipped by global norm on the fly):
//     g  = norm < clip ? g : g / norm * clip                  (optax.clip_by_global_norm)
//     m' = nb1 g + b1 m,   v' = nb2 g^2 + b2 v                (optax.scale_by_adam, eps_root 0;
//                                                               nb1 = 1 - b1 rounded from double)
//     u  = (m' / c1) / (sqrt(v' / c2) + eps) + wd_l p          (c1 = 1 - b1^t, c2 = 1 - b2^t)
//     p' = p - lr u                                           (wd_l: the leaf's decay, 0 if masked)
//   and nothing at all when ok == 0 (a non-finite loss or gradient: the step is skipped).
//
// Inputs: hyper f32[11] = {lr, b1, nb1, b2, nb2, eps, c1, c2, norm, clip, ok}, decay f32[L], then
// the L params, L first moments, L second moments and L gradients; outputs: the new params and
// moments, which Python aliases to the inputs (the update is in place).
//
// Why: XLA:CPU compiles optax's update into three loops per leaf (one per output, each reading
// the gradient and recomputing the moments), materialises the clipped gradient first, and copies
// the donated moments so the later loops still see the old ones: ~17 passes over 4-byte arrays
// of every parameter instead of the 7 this loop makes (read p, m, v, g; write p, m, v). On GPT-2
// 124M that was ~0.5 s of a ~2.8 s CPU step (docs/performance/training.md). The tree's leaves are
// cut into chunks of kChunk elements, the units of parallel.h's split over both threads.
//
// ISA: AVX-512 or AVX2 loops (GCC target attributes, picked at run time), a scalar tail and a
// scalar loop for the rest; every path does optax's fp32 operations in optax's order, without
// fma, so the result does not depend on the ISA or the thread count, and matches optax's own
// update wherever XLA does not contract a multiply-add (tests compare against optax).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per unit: 256 KiB of each array, L2-sized

struct Hyper {
  float lr, b1, nb1, b2, nb2, eps, c1, c2, norm, clip, wd;
  bool clipped;
};

inline void scalar_loop(const Hyper& h, int64_t begin, int64_t end, float* p, float* m, float* v,
                        const float* g, const float* pin, const float* min, const float* vin) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = h.clipped ? g[i] / h.norm * h.clip : g[i];
    const float mi = h.nb1 * gi + h.b1 * min[i];
    const float vi = h.nb2 * (gi * gi) + h.b2 * vin[i];
    const float u = (mi / h.c1) / (std::sqrt(vi / h.c2) + h.eps) + h.wd * pin[i];
    m[i] = mi;
    v[i] = vi;
    p[i] = pin[i] - h.lr * u;
  }
}

// The same operations, 16 lanes at a time. No fma: a * b + c rounds twice, as in the scalar loop.
__attribute__((target("avx512f"))) int64_t loop_avx512(const Hyper& h, int64_t begin, int64_t end,
                                                       float* p, float* m, float* v, const float* g,
                                                       const float* pin, const float* min,
                                                       const float* vin) {
  const __m512 b1 = _mm512_set1_ps(h.b1), nb1 = _mm512_set1_ps(h.nb1);
  const __m512 b2 = _mm512_set1_ps(h.b2), nb2 = _mm512_set1_ps(h.nb2);
  const __m512 c1 = _mm512_set1_ps(h.c1), c2 = _mm512_set1_ps(h.c2), eps = _mm512_set1_ps(h.eps);
  const __m512 wd = _mm512_set1_ps(h.wd), lr = _mm512_set1_ps(h.lr);
  const __m512 norm = _mm512_set1_ps(h.norm), clip = _mm512_set1_ps(h.clip);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 gi = _mm512_loadu_ps(g + i);
    if (h.clipped) gi = _mm512_mul_ps(_mm512_div_ps(gi, norm), clip);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(nb1, gi), _mm512_mul_ps(b1, _mm512_loadu_ps(min + i)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(nb2, _mm512_mul_ps(gi, gi)),
                                    _mm512_mul_ps(b2, _mm512_loadu_ps(vin + i)));
    const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vi, c2)), eps);
    const __m512 pi = _mm512_loadu_ps(pin + i);
    const __m512 u = _mm512_add_ps(_mm512_div_ps(_mm512_div_ps(mi, c1), den), _mm512_mul_ps(wd, pi));
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    _mm512_storeu_ps(p + i, _mm512_sub_ps(pi, _mm512_mul_ps(lr, u)));
  }
  return i;
}

__attribute__((target("avx2"))) int64_t loop_avx2(const Hyper& h, int64_t begin, int64_t end, float* p,
                                                  float* m, float* v, const float* g, const float* pin,
                                                  const float* min, const float* vin) {
  const __m256 b1 = _mm256_set1_ps(h.b1), nb1 = _mm256_set1_ps(h.nb1);
  const __m256 b2 = _mm256_set1_ps(h.b2), nb2 = _mm256_set1_ps(h.nb2);
  const __m256 c1 = _mm256_set1_ps(h.c1), c2 = _mm256_set1_ps(h.c2), eps = _mm256_set1_ps(h.eps);
  const __m256 wd = _mm256_set1_ps(h.wd), lr = _mm256_set1_ps(h.lr);
  const __m256 norm = _mm256_set1_ps(h.norm), clip = _mm256_set1_ps(h.clip);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 gi = _mm256_loadu_ps(g + i);
    if (h.clipped) gi = _mm256_mul_ps(_mm256_div_ps(gi, norm), clip);
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(nb1, gi), _mm256_mul_ps(b1, _mm256_loadu_ps(min + i)));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(nb2, _mm256_mul_ps(gi, gi)),
                                    _mm256_mul_ps(b2, _mm256_loadu_ps(vin + i)));
    const __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(vi, c2)), eps);
    const __m256 pi = _mm256_loadu_ps(pin + i);
    const __m256 u = _mm256_add_ps(_mm256_div_ps(_mm256_div_ps(mi, c1), den), _mm256_mul_ps(wd, pi));
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(p + i, _mm256_sub_ps(pi, _mm256_mul_ps(lr, u)));
  }
  return i;
}

// 512, 256 or 0 (scalar): the widest loop this CPU runs, capped by NANOJAX_KERNEL_ISA (read per call).
int vector_bits() {
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  const std::string isa = cap ? cap : "";
  if (isa == "scalar") return 0;
  if (isa != "avx2" && __builtin_cpu_supports("avx512f")) return 512;
  if (__builtin_cpu_supports("avx2")) return 256;
  return 0;
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> decay,
                     ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const int64_t L = decay.element_count();
  if (hyper.element_count() != 11 || static_cast<int64_t>(args.size()) != 4 * L ||
      static_cast<int64_t>(rets.size()) != 3 * L)
    return ffi::Error::InvalidArgument("nanojax adamw: hyper f32[11], decay f32[L], then 4 L arrays in and "
                                       "3 L out (params, moments, second moments, gradients)");
  const float* hp = hyper.typed_data();
  if (hp[10] == 0.0f) return ffi::Error::Success();  // skipped step: the aliased outputs keep the inputs
  struct Leaf {
    float *p, *m, *v;
    const float *g, *pin, *min, *vin;
    int64_t n;
    float wd;
  };
  std::vector<Leaf> leaves(L);
  std::vector<int64_t> first_unit(L + 1, 0);  // leaf l's chunks are units [first_unit[l], first_unit[l+1])
  for (int64_t l = 0; l < L; ++l) {
    auto pin = args.get<ffi::Buffer<ffi::F32>>(l), min = args.get<ffi::Buffer<ffi::F32>>(L + l);
    auto vin = args.get<ffi::Buffer<ffi::F32>>(2 * L + l), g = args.get<ffi::Buffer<ffi::F32>>(3 * L + l);
    auto p = rets.get<ffi::Buffer<ffi::F32>>(l), m = rets.get<ffi::Buffer<ffi::F32>>(L + l);
    auto v = rets.get<ffi::Buffer<ffi::F32>>(2 * L + l);
    if (pin.has_error() || min.has_error() || vin.has_error() || g.has_error() || p.has_error() ||
        m.has_error() || v.has_error())
      return ffi::Error::InvalidArgument("nanojax adamw: every array must be float32");
    const int64_t n = pin->element_count();
    if (min->element_count() != n || vin->element_count() != n || g->element_count() != n ||
        (*p)->element_count() != n || (*m)->element_count() != n || (*v)->element_count() != n)
      return ffi::Error::InvalidArgument("nanojax adamw: a leaf's param, moments and gradient differ in size");
    leaves[l] = {(*p)->typed_data(), (*m)->typed_data(), (*v)->typed_data(), g->typed_data(),
                 pin->typed_data(),  min->typed_data(),  vin->typed_data(),  n, decay.typed_data()[l]};
    first_unit[l + 1] = first_unit[l] + (n + kChunk - 1) / kChunk;
  }
  const bool clipped = !(hp[8] < hp[9]);  // optax clips unless norm < clip (a NaN norm never gets here)
  const Hyper base{hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7], hp[8], hp[9], 0.0f, clipped};
  const int bits = vector_bits();
  nj::parallel_units(pool, first_unit[L], [&](int64_t u) {
    const int64_t l = std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin() - 1;
    const Leaf& f = leaves[l];
    const int64_t begin = (u - first_unit[l]) * kChunk, end = std::min(f.n, begin + kChunk);
    Hyper h = base;
    h.wd = f.wd;
    int64_t i = begin;
    if (bits == 512) i = loop_avx512(h, begin, end, f.p, f.m, f.v, f.g, f.pin, f.min, f.vin);
    else if (bits == 256) i = loop_avx2(h, begin, end, f.p, f.m, f.v, f.g, f.pin, f.min, f.vin);
    scalar_loop(h, i, end, f.p, f.m, f.v, f.g, f.pin, f.min, f.vin);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjAdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper f32[11]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // decay f32[L]
                                  .RemainingArgs()               // params, mu, nu, grads (L each)
                                  .RemainingRets());             // params, mu, nu (aliased in place)

// The loop the AdamW kernel runs now, for kernels_info() and tests: 512, 256 or 0 (scalar).
extern "C" int nj_adamw_vector_bits() { return vector_bits(); }
