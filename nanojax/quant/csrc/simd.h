// Small pieces shared by the CPU kernels: bfloat16 <-> float32 one value at a time, and the 16 x 16
// in-register transpose of 32-bit lanes (fattn.cc packs k and v with it, gemm.cc transposes bf16
// weight-gradient operands).

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace nj {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as XLA's convert does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Stores the transpose of the 16 x 16 block whose row r is a[r]: lane i of every a[r], in r's order,
// goes to out + i * row_bytes (16 floats, or any 64 bytes of 32-bit lanes). Rows are interleaved in
// pairs, then 4 x 4 blocks are transposed within each 128-bit lane, then the lanes themselves.
__attribute__((target("avx512f"))) inline void store_transposed16(const __m512 a[16], char* out,
                                                                   int64_t row_bytes) {
  __m512 c[16];
  for (int r = 0; r < 16; r += 4) {  // c[r + j], 128-bit lane L: lane 4L + j of a[r .. r + 3]
    const __m512 lo01 = _mm512_unpacklo_ps(a[r], a[r + 1]), hi01 = _mm512_unpackhi_ps(a[r], a[r + 1]);
    const __m512 lo23 = _mm512_unpacklo_ps(a[r + 2], a[r + 3]), hi23 = _mm512_unpackhi_ps(a[r + 2], a[r + 3]);
    c[r] = _mm512_shuffle_ps(lo01, lo23, 0x44);
    c[r + 1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
    c[r + 2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
    c[r + 3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // lane 4L + j: 128-bit lane L of c[j], c[4 + j], c[8 + j], c[12 + j]
    const __m512 d0 = _mm512_shuffle_f32x4(c[j], c[4 + j], 0x44), d1 = _mm512_shuffle_f32x4(c[j], c[4 + j], 0xEE);
    const __m512 d2 = _mm512_shuffle_f32x4(c[8 + j], c[12 + j], 0x44);
    const __m512 d3 = _mm512_shuffle_f32x4(c[8 + j], c[12 + j], 0xEE);
    char* o = out + j * row_bytes;
    _mm512_storeu_ps(o, _mm512_shuffle_f32x4(d0, d2, 0x88));
    _mm512_storeu_ps(o + 4 * row_bytes, _mm512_shuffle_f32x4(d0, d2, 0xDD));
    _mm512_storeu_ps(o + 8 * row_bytes, _mm512_shuffle_f32x4(d1, d3, 0x88));
    _mm512_storeu_ps(o + 12 * row_bytes, _mm512_shuffle_f32x4(d1, d3, 0xDD));
  }
}

}  // namespace nj
