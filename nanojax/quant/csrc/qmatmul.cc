// Quantized matrix products for small M (decode), as XLA FFI custom calls on the CPU backend.
//
//   y (M, O) = x (M, I) @ W (I, O),   W stored out-major (docs/quantization.md, the layout contract):
//   int8: q int8 (O, I),        W[i, o] = q[o, i] * scale[o, i / G]
//   int4: q uint8 (O, I / 2),   byte j of row o = element 2j (low nibble) | element 2j+1 (high nibble),
//                               each stored as value + 8;  W[i, o] = (nibble - 8) * scale[o, i / G]
//
// Why: XLA:CPU converts int8 weights to a full fp32 copy before every dot (DESIGN.md), so a decode
// step reads 5x the bytes it needs. These kernels read the packed bytes once and widen them in
// registers. Activations stay fp32 (a bf16 x is widened first), so the result equals the pure-JAX
// dequantize-then-dot path up to fp32 summation order; the group scale is applied to each group's
// partial sum, as llama.cpp's ggml_vec_dot_q8_0 / q4_0 do with theirs.
//
// ISA: an AVX-512 and an AVX2 version of each inner loop (GCC target attributes), picked once at
// load time with __builtin_cpu_supports; a scalar loop for anything else. Threads: output rows are
// split in chunks, the units of parallel.h's split (claimed by the calling thread and by helpers on
// XLA's intra-op thread pool, the FFI ThreadPool context), shared with fmatmul.cc.

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

using nj::bf16_to_f32;
using nj::f32_to_bf16;

constexpr int kMaxRows = 8;  // rows of x processed together (the weight row is widened once for them)

// Everything one call needs; rows [o0, o1) of the output are one unit of work.
struct Problem {
  int64_t M, I, O, G;
  const float* x;      // (M, I) fp32
  const float* xe;     // int4 only: (M, I/2) even elements of x
  const float* xo;     // int4 only: (M, I/2) odd elements of x
  const void* q;       // int8 (O, I) or uint8 (O, I/2)
  const float* scale;  // (O, I/G) fp32
  float* y;            // (M, O) fp32
  // int4 with int8 activations (VNNI): x quantized per 32-element block, split even / odd, each row
  // padded to hpad bytes (a multiple of 64) with zeros.
  int64_t hpad;
  const int8_t* xqe;   // (M, hpad) even elements of round(x / sx)
  const int8_t* xqo;   // (M, hpad) odd elements
  const int32_t* corr; // (M, hpad / 4): 8 * the sum of the 8 quantized x a dot-product lane covers
  const float* sxl;    // (M, hpad / 4): the x block scale of each lane
  // int8 weights with int8 activations (VNNI): round(x / sx) per 32-block, rows padded to ipad.
  int64_t ipad;
  const int8_t* xq;    // (M, ipad)
  const float* sxl8;   // (M, ipad / 4): the x block scale of each 4-element lane
  int64_t ahead;       // software prefetch distance in bytes of q (0: none); see prefetch_q
};

// The loops stream q from DRAM and do a few integer ops per byte; with only the hardware prefetcher
// a thread read ~6-7 GB/s (the two ~11-13), the loads waiting on misses while the ALUs idle. One
// software prefetch per 64 bytes loaded, kPrefetch bytes further along the same stream (the rows
// of a unit are contiguous), keeps DRAM busy: ~17-20 GB/s on two threads (docs/quantization.md).
// NANOJAX_KERNEL_PREFETCH=BYTES changes the distance (0: off), read once.
constexpr int64_t kPrefetch = 8192;

int64_t prefetch_distance() {
  static const int64_t d = [] {
    const char* v = std::getenv("NANOJAX_KERNEL_PREFETCH");
    return v ? std::max<int64_t>(0, std::atoll(v)) : kPrefetch;
  }();
  return d;
}

// Prefetches the line `ahead` bytes past `at` into L2 (ahead 0: nothing). A prefetch of an address
// past the end of q never faults.
inline void prefetch_q(const Problem& p, const void* at) {
  if (p.ahead) _mm_prefetch(static_cast<const char*>(at) + p.ahead, _MM_HINT_T1);
}

#include "kernels_fp32.inc"  // scalar / AVX-512 / AVX2 loops, x in fp32
#include "kernels_vnni.inc"  // AVX-512 VNNI loops, x rounded to int8

// ---------------------------------------------------------------------------------------------
// Dispatch: rows [o0, o1), all of M, in blocks of kMaxRows (AVX-512) or 4 (AVX2) rows of x.

using BlockFn = void (*)(const Problem&, int64_t, int64_t);

struct Isa {
  BlockFn blocks[kMaxRows + 1];  // blocks[mb]: a kernel for mb rows (nullptr: none)
  int max_rows;
  BlockFn rows4;  // M = 1: four output rows at a time (nullptr: none)
};

// Kernel kinds: int8 weights (fp32 x), int4 weights (fp32 x), int4 weights with int8 x (VNNI).
enum Kind { kInt8 = 0, kInt4 = 1, kInt4Q8 = 2, kInt8Q8 = 3 };

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

// tier 2: AVX-512 VNNI, 1: AVX-512, 0: AVX2. Empty when the CPU lacks the tier.
Isa make_isa(Kind kind, int tier) {
  Isa isa{};
  const bool q8 = kind == kInt4Q8 || kind == kInt8Q8;
  if (tier == 2 && q8 && has_avx512() && __builtin_cpu_supports("avx512vnni")) {
    if (kind == kInt4Q8) {
      isa.blocks[1] = int4_block_vnni<1>; isa.blocks[2] = int4_block_vnni<2>;
      isa.blocks[4] = int4_block_vnni<4>; isa.blocks[8] = int4_block_vnni<8>;
      isa.rows4 = int4_rows4_vnni;
    } else {
      isa.blocks[1] = int8_block_vnni<1>; isa.blocks[2] = int8_block_vnni<2>;
      isa.blocks[4] = int8_block_vnni<4>; isa.blocks[8] = int8_block_vnni<8>;
      isa.rows4 = int8_rows4_vnni;
    }
    isa.max_rows = 8;
  } else if (tier == 1 && !q8 && has_avx512()) {
    if (kind == kInt4) {
      isa.blocks[1] = int4_block_avx512<1>; isa.blocks[2] = int4_block_avx512<2>;
      isa.blocks[4] = int4_block_avx512<4>; isa.blocks[8] = int4_block_avx512<8>;
    } else {
      isa.blocks[1] = int8_block_avx512<1>; isa.blocks[2] = int8_block_avx512<2>;
      isa.blocks[4] = int8_block_avx512<4>; isa.blocks[8] = int8_block_avx512<8>;
    }
    isa.max_rows = 8;
  } else if (tier == 0 && !q8 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    if (kind == kInt4) {
      isa.blocks[1] = int4_block_avx2<1>; isa.blocks[2] = int4_block_avx2<2>;
      isa.blocks[4] = int4_block_avx2<4>;
    } else {
      isa.blocks[1] = int8_block_avx2<1>; isa.blocks[2] = int8_block_avx2<2>;
      isa.blocks[4] = int8_block_avx2<4>;
    }
    isa.max_rows = 4;
  }
  return isa;
}

// The widest loops this CPU has for `kind`. The tables are built once; NANOJAX_KERNEL_ISA =
// vnni | avx512 | avx2 | scalar, read at each call, caps the choice (tests run every tier in-process).
// An int8-activation request without VNNI runs the fp32-activation int4 loops (exact, slower).
const Isa& isa_for(Kind kind, Kind* ran) {
  static const Isa tables[4][3] = {
      {make_isa(kInt8, 0), make_isa(kInt8, 1), make_isa(kInt8, 2)},
      {make_isa(kInt4, 0), make_isa(kInt4, 1), make_isa(kInt4, 2)},
      {make_isa(kInt4Q8, 0), make_isa(kInt4Q8, 1), make_isa(kInt4Q8, 2)},
      {make_isa(kInt8Q8, 0), make_isa(kInt8Q8, 1), make_isa(kInt8Q8, 2)}};
  static const Isa none{};
  const char* cap = std::getenv("NANOJAX_KERNEL_ISA");
  int top = 2;
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) top = 1;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) top = 0;
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) top = -1;
  if (kind == kInt4Q8 || kind == kInt8Q8) {
    if (top == 2 && tables[kind][2].max_rows) {
      *ran = kind;
      return tables[kind][2];
    }
    kind = kind == kInt4Q8 ? kInt4 : kInt8;
  }
  *ran = kind;
  for (int t = top; t >= 0; --t)
    if (tables[kind][t].max_rows) return tables[kind][t];
  return none;
}

void run_rows(const Problem& p, const Isa& isa, Kind kind, int64_t o0, int64_t o1) {
  if (isa.max_rows == 0) {
    (kind == kInt8 || kind == kInt8Q8 ? int8_rows_scalar : int4_rows_scalar)(p, o0, o1);
    return;
  }
  int64_t o = o0;
  if (p.M == 1 && isa.rows4 != nullptr && std::getenv("NANOJAX_KERNEL_NO_ROWS4") == nullptr)
    for (; o + 4 <= o1; o += 4) isa.rows4(p, o, 0);
  for (; o < o1; ++o) {
    int64_t m = 0;
    while (m < p.M) {
      int mb = isa.max_rows;
      while (mb > p.M - m) mb /= 2;  // 8, 4, 2, 1: the widest block that fits
      isa.blocks[mb](p, o, m);
      m += mb;
    }
  }
}

ffi::Error compute(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                   ffi::Result<ffi::AnyBuffer> y, int64_t group_size, Kind want) {
  const bool int4 = want == kInt4 || want == kInt4Q8;
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("nanojax quant kernel: x, q and scale must be 2-D");
  const int64_t M = xd[0], I = xd[1], O = qd[0], G = group_size;
  if (G <= 0 || I % G != 0 || qd[1] != (int4 ? I / 2 : I) || sd[0] != O || sd[1] != I / G ||
      (int4 && G % 32 != 0))
    return ffi::Error::InvalidArgument("nanojax quant kernel: shapes do not match the layout contract");
  if (M == 0 || O == 0) return ffi::Error::Success();

  // fp32 copies of the small operands: x (M*I) and the scales (O*I/G) when stored as bf16.
  std::vector<float> xf, xeo, sf, yf, sxl;
  std::vector<int8_t> xq;  // int8 activations, when the VNNI loops run
  std::vector<int32_t> corr;
  const float* xp;
  if (x.element_type() == ffi::F32) {
    xp = static_cast<const float*>(x.untyped_data());
  } else if (x.element_type() == ffi::BF16) {
    xf.resize(M * I);
    const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < M * I; ++i) xf[i] = bf16_to_f32(src[i]);
    xp = xf.data();
  } else {
    return ffi::Error::InvalidArgument("nanojax quant kernel: x must be float32 or bfloat16");
  }
  const float* sp;
  if (scale.element_type() == ffi::F32) {
    sp = static_cast<const float*>(scale.untyped_data());
  } else if (scale.element_type() == ffi::BF16) {
    sf.resize(O * (I / G));
    const uint16_t* src = static_cast<const uint16_t*>(scale.untyped_data());
    for (size_t i = 0; i < sf.size(); ++i) sf[i] = bf16_to_f32(src[i]);
    sp = sf.data();
  } else {
    return ffi::Error::InvalidArgument("nanojax quant kernel: scale must be float32 or bfloat16");
  }
  Problem p{M, I, O, G, xp, nullptr, nullptr, q.untyped_data(), sp, nullptr, 0, nullptr, nullptr, nullptr,
              nullptr, 0, nullptr, nullptr, prefetch_distance()};
  if (want == kInt8Q8 && !int8_vnni_shape(p)) want = kInt8;
  Kind kind;
  const Isa& isa = isa_for(want, &kind);
  if (kind == kInt4Q8) {
    quantize_activations(p, xq, corr, sxl);
  } else if (kind == kInt8Q8) {
    quantize_activations8(p, xq, sxl);
  } else if (int4) {  // split x into even / odd elements, the order the nibbles come out of a byte in
    const int64_t half = I / 2;
    xeo.resize(2 * M * half);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < half; ++j) {
        xeo[m * half + j] = xp[m * I + 2 * j];
        xeo[M * half + m * half + j] = xp[m * I + 2 * j + 1];
      }
    p.xe = xeo.data();
    p.xo = xeo.data() + M * half;
  }
  const bool out_bf16 = y->element_type() == ffi::BF16;
  if (out_bf16) {
    yf.resize(M * O);
    p.y = yf.data();
  } else {
    p.y = static_cast<float*>(y->untyped_data());
  }
  // ~64 KiB of weights per chunk keeps the claim overhead negligible and the two cores balanced.
  const int64_t row_bytes = int4 ? I / 2 : I;
  const int64_t chunk = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes));
  nj::parallel_units_spinning(pool, (O + chunk - 1) / chunk,
                     [&](int64_t c) { run_rows(p, isa, kind, c * chunk, std::min(O, (c + 1) * chunk)); });
  if (out_bf16) {
    uint16_t* dst = static_cast<uint16_t*>(y->untyped_data());
    for (int64_t i = 0; i < M * O; ++i) dst[i] = f32_to_bf16(yf[i]);
  }
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                    ffi::Result<ffi::AnyBuffer> y, int64_t group_size, int64_t int8_activations) {
  if (q.element_type() != ffi::S8) return ffi::Error::InvalidArgument("nanojax int8 kernel: q must be int8");
  return compute(pool, x, q, scale, y, group_size, int8_activations ? kInt8Q8 : kInt8);
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                    ffi::Result<ffi::AnyBuffer> y, int64_t group_size, int64_t int8_activations) {
  if (q.element_type() != ffi::U8) return ffi::Error::InvalidArgument("nanojax int4 kernel: q must be uint8");
  return compute(pool, x, q, scale, y, group_size, int8_activations ? kInt4Q8 : kInt4);
}

}  // namespace

namespace {
// Both handlers take the same call: the thread pool, x, q, scale -> y, and two attributes.
auto QMatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // x
      .Arg<ffi::AnyBuffer>()  // q
      .Arg<ffi::AnyBuffer>()  // scale
      .Ret<ffi::AnyBuffer>()  // y
      .Attr<int64_t>("group_size")
      .Attr<int64_t>("int8_activations");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NjInt8Matmul, Int8Impl, QMatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NjInt4Matmul, Int4Impl, QMatmulBinding());

// What the kernels run with, for kernels_info() in nanojax/quant/ffi.py: 512, 256 or 0 (scalar) bits,
// + 1 when int4 x int8-activation requests get the VNNI loops.
extern "C" int nj_quant_vector_bits() {
  Kind ran;
  const Isa& isa = isa_for(kInt8, &ran);
  isa_for(kInt4Q8, &ran);
  return (isa.max_rows == 8 ? 512 : isa.max_rows == 4 ? 256 : 0) + (ran == kInt4Q8);
}
