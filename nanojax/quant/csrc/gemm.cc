// Matrix products for training-sized M, as XLA FFI custom calls on the CPU backend.
//
//   c (M, N) = op(a) @ op(b),   op(a) = a (M, K) or a^T with a (K, M); op(b) = b (K, N) or b^T
//   with b (N, K); row-major, read in place (a transposed operand is not copied); c float32.
//   NjGemm: a, b float32. NjGemmBf16: a, b bfloat16, the products summed in fp32.
//
// Why: XLA:CPU's own dot (its YNN fusions) ran the dense layer's three products (forward x @ w,
// backward g @ w^T and x^T @ g) at 60-175 GFLOP/s on two Sapphire Rapids cores at the quickstart's
// 768 x 128 x 512 shapes, where Intel MKL's sgemm runs at 190-280, and XLA's bf16 dot was no faster
// than its fp32 one, where MKL's bf16 gemm runs on the CPU's bf16 units (AMX where the OS grants it)
// at 2-4x its sgemm (docs/performance.md, "Training GEMMs on MKL"). The kernel cuts c into row (or
// column) blocks, one per thread, each one single-threaded MKL call, the blocks shared by the
// caller and XLA's intra-op pool (parallel.h), as the other training kernels do.
//
// MKL is linked statically from the `mkl-static` package when the build finds it (ffi.py): its
// sequential layer, so every call runs on its caller's thread alone; its symbols are kept local to
// this library, so a PyTorch or NumPy in the same process keeps its own BLAS and threading. Built
// without it, nj_gemm_blas() returns 0, the calls return an error and nanojax.kernels.cpu_gemm never
// routes here.
//
// Numbers: each block is an independent MKL call with the same K, so a result depends on MKL's
// kernel for that block shape; the split depends on M, N and the thread count only, so a run is
// deterministic for a given machine and NANOJAX_KERNEL_THREADS.

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifdef NJ_WITH_MKL
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
// bf16 operands (raw uint16 bit patterns), fp32 products summed in fp32.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                                       float* c, int ldc);
#endif

namespace {

#ifdef NJ_WITH_MKL

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // CBLAS's enum values
constexpr int64_t kAlign = 16;     // a block's rows (or columns) are a multiple of this: whole zmm
constexpr int64_t kMinRows = 64;   // no block smaller than this (a BLAS call has a fixed cost)

// One sgemm, or one bf16 x bf16 -> fp32 gemm, row-major.
void blas_gemm(int ta, int tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
               float* c, int ldc) {
  cblas_sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}
void blas_gemm(int ta, int tb, int m, int n, int k, const uint16_t* a, int lda, const uint16_t* b, int ldb,
               float* c, int ldc) {
  cblas_gemm_bf16bf16f32(kRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

template <ffi::DataType T>
ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<T> a, ffi::Buffer<T> b, ffi::ResultBuffer<ffi::F32> c,
                    bool transpose_a, bool transpose_b) {
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("nanojax gemm: a, b and c must be 2-D");
  const int64_t M = transpose_a ? da[1] : da[0], K = transpose_a ? da[0] : da[1];
  const int64_t Kb = transpose_b ? db[1] : db[0], N = transpose_b ? db[0] : db[1];
  if (K != Kb || dc[0] != M || dc[1] != N)
    return ffi::Error::InvalidArgument("nanojax gemm: op(a) (M, K) @ op(b) (K, N) -> c (M, N) shapes differ");
  if (std::max({da[0], da[1], db[0], db[1]}) > INT32_MAX)
    return ffi::Error::InvalidArgument("nanojax gemm: a dimension exceeds the BLAS's 32-bit sizes");
  const auto* A = a.typed_data();
  const auto* B = b.typed_data();
  float* C = c->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(C, C + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const int lda = static_cast<int>(da[1]), ldb = static_cast<int>(db[1]);
  const int ta = transpose_a ? kTrans : kNoTrans, tb = transpose_b ? kTrans : kNoTrans;
  // Blocks along the longer side of c, one per thread (more only cost BLAS calls: measured).
  const bool by_rows = M >= N;
  const int64_t extent = by_rows ? M : N;
  const int64_t threads = nj::kernel_threads(pool);
  int64_t block = (extent + threads - 1) / threads;
  block = std::max(kMinRows, (block + kAlign - 1) / kAlign * kAlign);
  const int64_t units = (extent + block - 1) / block;
  nj::parallel_units(pool, units, [&](int64_t u) {
    const int64_t lo = u * block, n = std::min(extent, lo + block) - lo;
    if (by_rows) {  // rows [lo, lo + n) of op(a) and c
      blas_gemm(ta, tb, static_cast<int>(n), static_cast<int>(N), static_cast<int>(K),
                transpose_a ? A + lo : A + lo * lda, lda, B, ldb, C + lo * N, static_cast<int>(N));
    } else {  // columns [lo, lo + n) of op(b) and c
      blas_gemm(ta, tb, static_cast<int>(M), static_cast<int>(n), static_cast<int>(K), A, lda,
                transpose_b ? B + lo * ldb : B + lo, ldb, C + lo, static_cast<int>(N));
    }
  });
  return ffi::Error::Success();
}

#else  // built without MKL: the handlers exist (ffi.py registers them) and refuse every call

template <ffi::DataType T>
ffi::Error GemmImpl(ffi::ThreadPool, ffi::Buffer<T>, ffi::Buffer<T>, ffi::ResultBuffer<ffi::F32>, bool, bool) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "nanojax gemm: the kernel library was built without a BLAS (install mkl-static and "
                    "rebuild: `make kernels`)");
}

#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjGemm, GemmImpl<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a (M, K), or (K, M) if transpose_a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b (K, N), or (N, K) if transpose_b
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c (M, N)
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjGemmBf16, GemmImpl<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // a, as NjGemm's
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // b
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c (M, N), fp32
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

// Which BLAS the gemm kernel calls, for kernels_info(): 1 = MKL (linked statically), 0 = none.
extern "C" int nj_gemm_blas() {
#ifdef NJ_WITH_MKL
  return 1;
#else
  return 0;
#endif
}
