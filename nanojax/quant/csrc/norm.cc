// LayerNorm and RMSNorm over the last axis for training on the CPU, forward and backward, as two XLA FFI
// custom calls.
//
//   forward:  x (M, D) f32, scale (D), bias (D)          -> y (M, D) f32 or bf16, mean (M), rstd (M)
//   backward: x, scale, mean, rstd, dy (M, D) f32 or bf16 -> dx (M, D) f32, dscale (D), dbias (D)
//   attributes: rms (RMSNorm: no centring, mean stored as 0, no bias), eps.
//
//   LayerNorm: mean = sum_j x_j / D, rstd = (sum_j (x_j - mean)^2 / D + eps)^-1/2 (two passes over the row,
//   as nanojax.model.norm), xhat = (x - mean) rstd, y = xhat scale + bias. RMSNorm: mean = 0.
//   backward, g = dy scale: dx = rstd (g - sum_j g_j / D - xhat sum_j g_j xhat_j / D) (RMSNorm without the
//   second term), dscale = sum over rows of dy xhat, dbias = sum over rows of dy.
//
// Why: XLA:CPU runs the norm's forward and its autodiff backward as a dozen separate passes per norm (row
// and column reductions on YNNPACK, each 20-115 us at the quickstart's 768 x 128, and the elementwise
// fusions between them): with the norms taken out of the bf16 quickstart step entirely, it ran ~11%
// faster (docs/performance/training.md, "The norms"). Here a row is read once per pass while it sits in
// L1, and a bf16 y is rounded as it is stored (no separate cast).
//
// Threads: the rows are cut into units of kUnitRows, claimed by the caller and XLA's intra-op pool
// (parallel.h). Each unit sums its own rows' dscale and dbias; the caller adds the units' sums in unit
// order, so the result does not depend on the thread count or on which thread ran which unit.
// ISA: AVX-512 loops (F, BW) for D a multiple of 16 (picked at run time; NANOJAX_KERNEL_ISA=scalar
// forces the scalar loops, which exist for tests and odd widths: Python routes only D % 16 == 0 with
// AVX-512 here).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kUnitRows = 64;  // rows per unit of work

bool use_avx512(int64_t D) {
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  if (cap != nullptr && (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0)) return false;
  return D % 16 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("fma");
}

struct Rows {  // one unit's rows and its partial sums
  const float* x;
  const float* scale;
  const float* bias;
  float* mean;
  float* rstd;
  int64_t D;
  bool rms;
  float eps;
};

// ---------------------------------------------------------------------------------------------------
// Scalar rows (the reference loops; also D % 16 != 0).

void forward_scalar(const Rows& r, int64_t row, void* y, bool y_bf16) {
  const float* x = r.x + row * r.D;
  float mean = 0.0f;
  if (!r.rms) {
    float s = 0.0f;
    for (int64_t j = 0; j < r.D; ++j) s += x[j];
    mean = s / static_cast<float>(r.D);
  }
  float ss = 0.0f;
  for (int64_t j = 0; j < r.D; ++j) ss += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(r.D) + r.eps);
  r.mean[row] = mean;
  r.rstd[row] = rstd;
  for (int64_t j = 0; j < r.D; ++j) {
    const float v = (x[j] - mean) * rstd * r.scale[j] + r.bias[j];
    if (y_bf16)
      static_cast<uint16_t*>(y)[row * r.D + j] = nj::f32_to_bf16(v);
    else
      static_cast<float*>(y)[row * r.D + j] = v;
  }
}

void backward_scalar(const Rows& r, int64_t row, const void* dy, bool dy_bf16, float* dx, float* dscale,
                     float* dbias) {
  const float* x = r.x + row * r.D;
  const float mean = r.mean[row], rstd = r.rstd[row];
  const auto dyv = [&](int64_t j) {
    return dy_bf16 ? nj::bf16_to_f32(static_cast<const uint16_t*>(dy)[row * r.D + j])
                   : static_cast<const float*>(dy)[row * r.D + j];
  };
  float sg = 0.0f, sgx = 0.0f;
  for (int64_t j = 0; j < r.D; ++j) {
    const float xhat = (x[j] - mean) * rstd, d = dyv(j), g = d * r.scale[j];
    sg += g;
    sgx += g * xhat;
    dscale[j] += d * xhat;
    dbias[j] += d;
  }
  const float a = r.rms ? 0.0f : sg / static_cast<float>(r.D), b = sgx / static_cast<float>(r.D);
  for (int64_t j = 0; j < r.D; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    dx[row * r.D + j] = rstd * (dyv(j) * r.scale[j] - a - xhat * b);
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX-512 rows.

__attribute__((target("avx512f,avx512bw"))) inline void store_bf16(uint16_t* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 floats of dy from element i, widened from bf16 when dy_bf16.
__attribute__((target("avx512f,avx512bw"))) inline __m512 load_dy(const void* dy, bool dy_bf16, int64_t i) {
  return dy_bf16 ? load_bf16(static_cast<const uint16_t*>(dy) + i) : _mm512_loadu_ps(static_cast<const float*>(dy) + i);
}

__attribute__((target("avx512f,avx512bw,fma"))) void forward_avx512(const Rows& r, int64_t row, void* y,
                                                                   bool y_bf16) {
  const float* x = r.x + row * r.D;
  const int64_t D = r.D;
  float mean = 0.0f;
  if (!r.rms) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + j));
    mean = _mm512_reduce_add_ps(s) / static_cast<float>(D);
  }
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 ss = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + j), vm);
    ss = _mm512_fmadd_ps(d, d, ss);
  }
  const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + r.eps);
  r.mean[row] = mean;
  r.rstd[row] = rstd;
  const __m512 vr = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vr);
    const __m512 v = _mm512_fmadd_ps(xhat, _mm512_loadu_ps(r.scale + j), _mm512_loadu_ps(r.bias + j));
    if (y_bf16)
      store_bf16(static_cast<uint16_t*>(y) + row * D + j, v);
    else
      _mm512_storeu_ps(static_cast<float*>(y) + row * D + j, v);
  }
}

__attribute__((target("avx512f,avx512bw,fma"))) void backward_avx512(const Rows& r, int64_t row, const void* dy,
                                                                    bool dy_bf16, float* dx, float* dscale,
                                                                    float* dbias) {
  const float* x = r.x + row * r.D;
  const int64_t D = r.D;
  const __m512 vm = _mm512_set1_ps(r.mean[row]), vr = _mm512_set1_ps(r.rstd[row]);
  __m512 sg = _mm512_setzero_ps(), sgx = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vr), d = load_dy(dy, dy_bf16, row * D + j);
    const __m512 g = _mm512_mul_ps(d, _mm512_loadu_ps(r.scale + j));
    sg = _mm512_add_ps(sg, g);
    sgx = _mm512_fmadd_ps(g, xhat, sgx);
    _mm512_storeu_ps(dscale + j, _mm512_fmadd_ps(d, xhat, _mm512_loadu_ps(dscale + j)));
    _mm512_storeu_ps(dbias + j, _mm512_add_ps(d, _mm512_loadu_ps(dbias + j)));
  }
  const float inv_d = 1.0f / static_cast<float>(D);
  const __m512 a = _mm512_set1_ps(r.rms ? 0.0f : _mm512_reduce_add_ps(sg) * inv_d);
  const __m512 b = _mm512_set1_ps(_mm512_reduce_add_ps(sgx) * inv_d);
  for (int64_t j = 0; j < D; j += 16) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vr);
    const __m512 g = _mm512_mul_ps(load_dy(dy, dy_bf16, row * D + j), _mm512_loadu_ps(r.scale + j));
    _mm512_storeu_ps(dx + row * D + j, _mm512_mul_ps(vr, _mm512_fnmadd_ps(xhat, b, _mm512_sub_ps(g, a))));
  }
}

// ---------------------------------------------------------------------------------------------------
// The two calls.

ffi::Error check(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale, int64_t* M, int64_t* D) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("nanojax norm: x must be (M, D) float32 and scale (D,)");
  *M = xd[0];
  *D = xd[1];
  return ffi::Error::Success();
}

bool is_bf16(ffi::DataType t) { return t == ffi::DataType::BF16; }

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, bool rms, float eps) {
  int64_t M, D;
  if (ffi::Error e = check(x, scale, &M, &D); e.failure()) return e;
  const bool y_bf16 = is_bf16(y->element_type());
  if ((!y_bf16 && y->element_type() != ffi::DataType::F32) || y->element_count() != x.element_count() ||
      bias.element_count() != static_cast<size_t>(D) || mean->element_count() != static_cast<size_t>(M) ||
      rstd->element_count() != static_cast<size_t>(M))
    return ffi::Error::InvalidArgument("nanojax norm: bias (D,), y (M, D) float32 or bfloat16, mean and rstd (M,)");
  if (M * D == 0) return ffi::Error::Success();
  const Rows r{x.typed_data(), scale.typed_data(), bias.typed_data(), mean->typed_data(), rstd->typed_data(),
               D, rms, eps};
  const auto fwd = use_avx512(D) ? forward_avx512 : forward_scalar;
  void* out = y->untyped_data();
  nj::parallel_units(pool, (M + kUnitRows - 1) / kUnitRows, [&](int64_t u) {
    for (int64_t row = u * kUnitRows; row < std::min(M, (u + 1) * kUnitRows); ++row) fwd(r, row, out, y_bf16);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::AnyBuffer dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, bool rms) {
  int64_t M, D;
  if (ffi::Error e = check(x, scale, &M, &D); e.failure()) return e;
  const bool dy_bf16 = is_bf16(dy.element_type());
  if ((!dy_bf16 && dy.element_type() != ffi::DataType::F32) || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || mean.element_count() != static_cast<size_t>(M) ||
      rstd.element_count() != static_cast<size_t>(M) || dscale->element_count() != static_cast<size_t>(D) ||
      dbias->element_count() != static_cast<size_t>(D))
    return ffi::Error::InvalidArgument("nanojax norm backward: mean and rstd (M,), dy (M, D) float32 or "
                                       "bfloat16, dx x's shape, dscale and dbias (D,)");
  std::fill(dscale->typed_data(), dscale->typed_data() + D, 0.0f);
  std::fill(dbias->typed_data(), dbias->typed_data() + D, 0.0f);
  if (M * D == 0) return ffi::Error::Success();
  // Rows reads mean and rstd only: the const_casts never write through them.
  const Rows r{x.typed_data(), scale.typed_data(), nullptr, const_cast<float*>(mean.typed_data()),
               const_cast<float*>(rstd.typed_data()), D, rms, 0.0f};
  const auto bwd = use_avx512(D) ? backward_avx512 : backward_scalar;
  const int64_t units = (M + kUnitRows - 1) / kUnitRows;
  std::vector<float> part(static_cast<size_t>(units * 2 * D), 0.0f);  // unit u: dscale, then dbias
  const void* g = dy.untyped_data();
  nj::parallel_units(pool, units, [&](int64_t u) {
    float* ps = part.data() + u * 2 * D;
    for (int64_t row = u * kUnitRows; row < std::min(M, (u + 1) * kUnitRows); ++row)
      bwd(r, row, g, dy_bf16, dx->typed_data(), ps, ps + D);
  });
  for (int64_t u = 0; u < units; ++u)
    for (int64_t j = 0; j < D; ++j) {
      dscale->typed_data()[j] += part[u * 2 * D + j];
      dbias->typed_data()[j] += part[u * 2 * D + D + j];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjNormFwd, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rms")
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjNormBwd, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rms"));

// What the norm kernel runs with for a width D: 512 (AVX-512) or 0 (scalar loops).
extern "C" int nj_norm_vector_bits(int64_t D) { return use_avx512(D) ? 512 : 0; }
