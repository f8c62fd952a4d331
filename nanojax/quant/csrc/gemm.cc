// Matrix products for training-sized M, as XLA FFI custom calls on the CPU backend.
//
//   c (M, N) = op(a) @ op(b),   op(a) = a (M, K) or a^T with a (K, M); op(b) = b (K, N) or b^T
//   with b (N, K); row-major, read in place (a transposed operand is not copied); c float32.
//   NjGemm: a, b float32, on MKL. NjGemmBf16: a, b bfloat16, the products summed in fp32, on MKL.
//   NjGemmBf16Dnnl: the same bf16 product on oneDNN's matmul; c float32 or bfloat16 (rounded
//   once from the fp32 sums as it is stored, where a separate cast would take another pass).
//
// Why: XLA:CPU's own dot (its YNN fusions) ran the dense layer's three products (forward x @ w,
// backward g @ w^T and x^T @ g) at 60-175 GFLOP/s on two Sapphire Rapids cores at the quickstart's
// 768 x 128 x 512 shapes, where Intel MKL's sgemm runs at 190-280, and XLA's bf16 dot was no faster
// than its fp32 one, where MKL's bf16 gemm runs on the CPU's bf16 units (AMX where the OS grants it)
// at 2-4x its sgemm (docs/performance/training.md, "Training GEMMs on MKL"). On an AMD EPYC (Zen 5) MKL takes
// slow paths (its fp32 and bf16 gemms ran the GPT-2 step at half XLA's speed) while oneDNN's bf16
// matmul runs its AVX512_BF16 kernels at ~2x XLA's fp32 dot ("AMD EPYC, Zen 5"). The kernel
// cuts c into row (or column) blocks, one per thread, each one single-threaded library call, the
// blocks shared by the caller and XLA's intra-op pool (parallel.h), as the other training kernels do.
//
// MKL is linked statically from the `mkl-static` package when the build finds it (ffi.py): its
// sequential layer, so every call runs on its caller's thread alone; its symbols are kept local to
// this library, so a PyTorch or NumPy in the same process keeps its own BLAS and threading. oneDNN
// is linked as the shared library of the `onednn-cpu-gomp` package (GNU OpenMP threading); each
// call runs with the calling thread's OpenMP thread count set to 1 and put back afterwards, so it
// stays on its thread and a PyTorch in the same process keeps its own count. Built without either,
// nj_gemm_blas() says so, those calls return an error and nanojax.kernels.cpu_gemm never routes
// there.
//
// Numbers: each block is an independent library call with the same K, so a result depends on the
// library's kernel for that block shape; the split depends on M, N and the thread count only, so a
// run is deterministic for a given machine and NANOJAX_KERNEL_THREADS.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

#ifdef NJ_WITH_DNNL
#include <oneapi/dnnl/dnnl.h>
extern "C" int omp_get_max_threads();
extern "C" void omp_set_num_threads(int);
#endif

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

constexpr int64_t kAlign = 16;     // a block's rows (or columns) are a multiple of this: whole zmm
constexpr int64_t kMinRows = 64;   // no block smaller than this (a library call has a fixed cost)

// One block's product, c (m, n) = op(a) @ op(b), row-major with leading dimensions lda, ldb, ldc,
// c bfloat16 if c_bf16 else float32, on the calling thread alone; false when the library failed.
using BlockFn = bool (*)(bool ta, bool tb, int m, int n, int k, const void* a, int lda, const void* b,
                         int ldb, void* c, int ldc, bool c_bf16);

#ifdef NJ_WITH_MKL
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // CBLAS's enum values

bool mkl_sgemm(bool ta, bool tb, int m, int n, int k, const void* a, int lda, const void* b, int ldb,
               void* c, int ldc, bool /*c_bf16: false*/) {
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f,
              static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb, 0.0f, static_cast<float*>(c),
              ldc);
  return true;
}
bool mkl_bf16(bool ta, bool tb, int m, int n, int k, const void* a, int lda, const void* b, int ldb,
              void* c, int ldc, bool /*c_bf16: false*/) {
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f,
                         static_cast<const uint16_t*>(a), lda, static_cast<const uint16_t*>(b), ldb, 0.0f,
                         static_cast<float*>(c), ldc);
  return true;
}
constexpr BlockFn kMklSgemm = mkl_sgemm, kMklBf16 = mkl_bf16;
#else
constexpr BlockFn kMklSgemm = nullptr, kMklBf16 = nullptr;
#endif

#ifdef NJ_WITH_DNNL
// oneDNN's matmul, one primitive per block shape (made on first use, kept for the process: a
// model has a few dozen), run on the calling thread with a scratchpad of that thread's own, so
// the blocks of a call (and calls on other threads) run the same primitive at once.
namespace onednn {

dnnl_engine_t engine() {
  static dnnl_engine_t eng = [] {
    dnnl_engine_t e = nullptr;
    return dnnl_engine_create(&e, dnnl_cpu, 0) == dnnl_success ? e : nullptr;
  }();
  return eng;
}

// OpenMP's thread count on this thread is 1 while it lives (a primitive reads it when made and
// when run), then back to what it was: the thread may be one PyTorch also runs OpenMP loops on.
class OneOmpThread {
 public:
  OneOmpThread() : prev_(omp_get_max_threads()) {
    if (prev_ != 1) omp_set_num_threads(1);
  }
  ~OneOmpThread() {
    if (prev_ != 1) omp_set_num_threads(prev_);
  }

 private:
  int prev_;
};

// A block's product as oneDNN runs it. oneDNN 3.2's fast bf16 matmul (brgemm) takes op(a) only as
// stored row by row; given a^T (the weight gradient x^T @ g) it picks its older gemm kernel
// (ONEDNN_VERBOSE: gemm:jit:bf16), which ran them slower here and allocates on every call. So a
// transposed a is first copied row by row into a buffer of the thread's own (transpose_bf16), and
// the matmul reads that (the quickstart's bf16 step: 3% faster with oneDNN's own reorder as the
// copy, then 3-5% faster again with transpose_bf16; docs/performance/training.md). Only blocks of
// 16k rows: the tied head's 65-row gradient ran slower copied (and no faster with transpose_bf16).
struct Plan {
  dnnl_primitive_desc_t pd;
  dnnl_primitive_t prim;
  size_t scratch_bytes;
  bool copy_a;  // the matmul reads op(a) (m, k) from a row-major copy
};

// t (m, k) = the m columns of a (k rows, lda apart) from column 0, row-major: t[i][j] = a[j][i]. The
// vector path takes tiles of 32 rows by 16 columns: each pair of rows is interleaved into 16 32-bit
// lanes (a[j][i], a[j+1][i]), and a 16 x 16 transpose of those lanes leaves column i's 32 values
// in order in one register. oneDNN's own reorder (jit:uni) did the same copy at ~7.5 GB/s on Zen 5:
// a quarter of the block's time at 128 x 768 x 128.
__attribute__((target("avx512f,avx512bw"))) void transpose_bf16_avx512(const uint16_t* a, int64_t lda, int64_t k,
                                                                      int64_t m, uint16_t* t) {
  const int64_t k32 = k / 32 * 32, m16 = m / 16 * 16;
  for (int64_t i0 = 0; i0 < m16; i0 += 16) {
    for (int64_t j0 = 0; j0 < k32; j0 += 32) {
      __m512 p[16];
      for (int r = 0; r < 16; ++r) {  // p[r], lane L: (a[j0 + 2r][i0 + L], a[j0 + 2r + 1][i0 + L])
        const uint16_t* row = a + (j0 + 2 * r) * lda + i0;
        const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + lda));
        // Per 128-bit half: lo holds lanes 0-3 (first half) and 8-11, hi lanes 4-7 and 12-15.
        const __m256i lo = _mm256_unpacklo_epi16(r0, r1), hi = _mm256_unpackhi_epi16(r0, r1);
        p[r] = _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)), _mm256_permute2x128_si256(lo, hi, 0x31), 1));
      }
      // Lane L of p[r] holds rows j0 + 2r, j0 + 2r + 1 of column i0 + L: transposed, column i0 + L's 32
      // values leave in order as one 64-byte row of t.
      nj::store_transposed16(p, reinterpret_cast<char*>(t + i0 * k + j0), 2 * k);
    }
  }
  for (int64_t i = 0; i < m; ++i)  // the ragged edges: columns from m16, rows from k32
    for (int64_t j = i < m16 ? k32 : 0; j < k; ++j) t[i * k + j] = a[j * lda + i];
}

void transpose_bf16_scalar(const uint16_t* a, int64_t lda, int64_t k, int64_t m, uint16_t* t) {
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < m; ++i) t[i * k + j] = a[j * lda + i];
}

void transpose_bf16(const uint16_t* a, int64_t lda, int64_t k, int64_t m, uint16_t* t) {
  static const bool vector = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  (vector ? transpose_bf16_avx512 : transpose_bf16_scalar)(a, lda, k, m, t);
}
using Key = std::tuple<bool, bool, int, int, int, int, int, int, bool>;  // ta, tb, m, n, k, lda, ldb, ldc, c_bf16

const Plan* plan(const Key& key) {
  static std::mutex mu;
  static auto* plans = new std::map<Key, Plan>;  // never freed: node addresses stay valid
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = plans->find(key); it != plans->end()) return &it->second;
  const auto [ta, tb, m, n, k, lda, ldb, ldc, c_bf16] = key;
  const bool copy_a = ta && m % 16 == 0;
  // op(a) (m, k) and op(b) (k, n) read in place: a transposed operand swaps its strides; the
  // matmul reads a transposed a from its row-major copy (m, k).
  const dnnl_dims_t a_dims = {m, k}, a_strides = {ta ? 1 : lda, ta ? lda : 1}, a_rows = {k, 1};
  const dnnl_dims_t b_dims = {k, n}, b_strides = {tb ? 1 : ldb, tb ? ldb : 1};
  const dnnl_dims_t c_dims = {m, n}, c_strides = {ldc, 1};
  dnnl_memory_desc_t a_md = nullptr, a_copy_md = nullptr, b_md = nullptr, c_md = nullptr;
  dnnl_primitive_attr_t attr = nullptr;
  Plan pl{};
  bool ok = dnnl_memory_desc_create_with_strides(&a_md, 2, a_dims, dnnl_bf16, a_strides) == dnnl_success &&
            dnnl_memory_desc_create_with_strides(&a_copy_md, 2, a_dims, dnnl_bf16, a_rows) == dnnl_success &&
            dnnl_memory_desc_create_with_strides(&b_md, 2, b_dims, dnnl_bf16, b_strides) == dnnl_success &&
            dnnl_memory_desc_create_with_strides(&c_md, 2, c_dims, c_bf16 ? dnnl_bf16 : dnnl_f32, c_strides) ==
                dnnl_success &&
            dnnl_primitive_attr_create(&attr) == dnnl_success &&
            dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) == dnnl_success &&
            dnnl_matmul_primitive_desc_create(&pl.pd, engine(), copy_a ? a_copy_md : a_md, b_md, nullptr, c_md,
                                              attr) == dnnl_success &&
            dnnl_primitive_create(&pl.prim, pl.pd) == dnnl_success;
  pl.copy_a = copy_a;
  for (dnnl_memory_desc_t md : {a_md, a_copy_md, b_md, c_md})
    if (md) dnnl_memory_desc_destroy(md);
  if (attr) dnnl_primitive_attr_destroy(attr);
  if (!ok) {
    if (pl.prim) dnnl_primitive_destroy(pl.prim);
    if (pl.pd) dnnl_primitive_desc_destroy(pl.pd);
    return nullptr;
  }
  pl.scratch_bytes = dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pl.pd, dnnl_query_scratchpad_md, 0));
  return &plans->emplace(key, pl).first->second;
}

// A plan's memory objects on one thread: made on the thread's first call with the plan, then only
// pointed at each call's buffers. Making them per call cost an aligned malloc each (four a block),
// and glibc serves aligned blocks under its arena lock, which the other core's blocks wanted too.
struct Bound {
  dnnl_memory_t mem[4] = {};  // the matmul's src, weights, dst, scratchpad
  Bound() = default;
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;
  ~Bound() {
    for (dnnl_memory_t m : mem)
      if (m) dnnl_memory_destroy(m);
  }
};

// Points memory object `slot` of `bound` (made on first use, of `md`) at `data`.
bool bind(Bound& bound, int slot, const_dnnl_memory_desc_t md, void* data) {
  dnnl_memory_t& m = bound.mem[slot];
  if (m != nullptr) return dnnl_memory_set_data_handle(m, data) == dnnl_success;
  if (dnnl_memory_create(&m, md, engine(), data) == dnnl_success) return true;
  m = nullptr;
  return false;
}

bool bf16(bool ta, bool tb, int m, int n, int k, const void* a, int lda, const void* b, int ldb, void* c,
          int ldc, bool c_bf16) {
  struct Stream {
    dnnl_stream_t s = nullptr;
    ~Stream() {
      if (s) dnnl_stream_destroy(s);
    }
  };
  thread_local Stream stream;
  thread_local std::vector<char> scratch;
  thread_local std::vector<uint16_t> a_copy;
  thread_local std::map<const Plan*, Bound> bound;
  if (engine() == nullptr) return false;
  OneOmpThread one;
  const Plan* p = plan(Key{ta, tb, m, n, k, lda, ldb, ldc, c_bf16});
  if (p == nullptr) return false;
  if (!stream.s && dnnl_stream_create(&stream.s, engine(), dnnl_stream_default_flags) != dnnl_success) return false;
  if (scratch.size() < p->scratch_bytes) scratch.resize(p->scratch_bytes);
  Bound& mem = bound[p];
  void* src = const_cast<void*>(a);
  if (p->copy_a) {
    if (a_copy.size() < size_t(m) * k) a_copy.resize(size_t(m) * k);
    transpose_bf16(static_cast<const uint16_t*>(a), lda, k, m, a_copy.data());
    src = a_copy.data();
  }
  const struct {
    int arg;
    dnnl_query_t query;
    void* data;
  } args_of[] = {{DNNL_ARG_SRC, dnnl_query_src_md, src},
                 {DNNL_ARG_WEIGHTS, dnnl_query_weights_md, const_cast<void*>(b)},
                 {DNNL_ARG_DST, dnnl_query_dst_md, c},
                 {DNNL_ARG_SCRATCHPAD, dnnl_query_scratchpad_md, scratch.data()}};
  const int nargs = p->scratch_bytes > 0 ? 4 : 3;
  dnnl_exec_arg_t args[4] = {};
  for (int i = 0; i < nargs; ++i) {
    if (!bind(mem, i, dnnl_primitive_desc_query_md(p->pd, args_of[i].query, 0), args_of[i].data)) return false;
    args[i] = {args_of[i].arg, mem.mem[i]};
  }
  return dnnl_primitive_execute(p->prim, stream.s, nargs, args) == dnnl_success &&
         dnnl_stream_wait(stream.s) == dnnl_success;
}

}  // namespace onednn
constexpr BlockFn kDnnlBf16 = onednn::bf16;
#else
constexpr BlockFn kDnnlBf16 = nullptr;
#endif

// Cuts c into blocks along its longer side, one per thread (more only cost library calls:
// measured), and runs `block` on each over the caller and XLA's pool. On oneDNN a transposed a of
// 128 rows or more is cut by rows whatever N: each block then copies only its own rows of a (Plan).
// c is float32, or bfloat16 where `block` stores that. `library` names the library in errors:
// "MKL" or "oneDNN".
template <ffi::DataType T>
ffi::Error GemmBlocks(ffi::ThreadPool& pool, ffi::Buffer<T>& a, ffi::Buffer<T>& b, ffi::AnyBuffer c,
                      bool transpose_a, bool transpose_b, BlockFn block, const char* library) {
  if (block == nullptr)
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      std::string("nanojax gemm: the kernel library was built without ") + library +
                          " (install mkl-static / onednn-cpu-gomp: pip install 'nanojax[mkl,onednn]', and "
                          "rebuild: `make kernels`)");
  const bool c_bf16 = c.element_type() == ffi::DataType::BF16;
  if (!c_bf16 && c.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("nanojax gemm: c must be float32 or bfloat16");
  const auto da = a.dimensions(), db = b.dimensions(), dc = c.dimensions();
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
  char* C = static_cast<char*>(c.untyped_data());
  const int64_t c_size = c_bf16 ? 2 : 4;  // bytes per element of c
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(C, C + M * N * c_size, 0);  // 0.0 in both formats
    return ffi::Error::Success();
  }
  const int lda = static_cast<int>(da[1]), ldb = static_cast<int>(db[1]);
  const bool by_rows = M >= N || (transpose_a && block == kDnnlBf16 && M >= 2 * kMinRows);
  const int64_t extent = by_rows ? M : N;
  const int64_t threads = nj::kernel_threads(pool);
  int64_t size = (extent + threads - 1) / threads;
  size = std::max(kMinRows, (size + kAlign - 1) / kAlign * kAlign);
  const int64_t units = (extent + size - 1) / size;
  std::atomic<bool> failed{false};
  nj::parallel_units(pool, units, [&](int64_t u) {
    const int64_t lo = u * size, n = std::min(extent, lo + size) - lo;
    bool ok;
    if (by_rows) {  // rows [lo, lo + n) of op(a) and c
      ok = block(transpose_a, transpose_b, static_cast<int>(n), static_cast<int>(N), static_cast<int>(K),
                 transpose_a ? A + lo : A + lo * lda, lda, B, ldb, C + lo * N * c_size, static_cast<int>(N), c_bf16);
    } else {  // columns [lo, lo + n) of op(b) and c
      ok = block(transpose_a, transpose_b, static_cast<int>(M), static_cast<int>(n), static_cast<int>(K), A, lda,
                 transpose_b ? B + lo * ldb : B + lo, ldb, C + lo * c_size, static_cast<int>(N), c_bf16);
    }
    if (!ok) failed.store(true);
  });
  if (failed.load())
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("nanojax gemm: ") + library + " failed on a (" + std::to_string(M) + ", " +
                          std::to_string(K) + ") @ (" + std::to_string(K) + ", " + std::to_string(N) + ") product");
  return ffi::Error::Success();
}

// MKL's gemms (sgemm for F32 operands, the bf16 gemm for BF16) store fp32 only.
template <ffi::DataType T>
ffi::Error GemmMkl(ffi::ThreadPool pool, ffi::Buffer<T> a, ffi::Buffer<T> b, ffi::Result<ffi::AnyBuffer> c,
                   bool transpose_a, bool transpose_b) {
  if (c->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("nanojax gemm: MKL's result c must be float32");
  return GemmBlocks(pool, a, b, *c, transpose_a, transpose_b, T == ffi::F32 ? kMklSgemm : kMklBf16, "MKL");
}
ffi::Error GemmBf16Dnnl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                        ffi::Result<ffi::AnyBuffer> c, bool transpose_a, bool transpose_b) {
  return GemmBlocks(pool, a, b, *c, transpose_a, transpose_b, kDnnlBf16, "oneDNN");
}

// The handlers' one signature: a (M, K), or (K, M) if transpose_a, and b (K, N), or (N, K) if
// transpose_b, both of T; c (M, N) as the handler stores it (fp32; NjGemmBf16Dnnl: fp32 or bf16).
template <ffi::DataType T>
auto GemmBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<bool>("transpose_a")
      .template Attr<bool>("transpose_b");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjGemm, GemmMkl<ffi::F32>, GemmBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjGemmBf16, GemmMkl<ffi::BF16>, GemmBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjGemmBf16Dnnl, GemmBf16Dnnl, GemmBinding<ffi::BF16>());

// Which libraries the gemm kernel calls, for kernels_info(): bit 0 = MKL (linked statically, the
// fp32 and bf16 handlers), bit 1 = oneDNN (NjGemmBf16Dnnl); 0 = neither.
extern "C" int nj_gemm_blas() {
  int libs = 0;
#ifdef NJ_WITH_MKL
  libs |= 1;
#endif
#ifdef NJ_WITH_DNNL
  libs |= 2;
#endif
  return libs;
}
