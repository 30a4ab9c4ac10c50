// The tensor-core pieces shared by the int4 kernels (int4_mma.cu: M <= 64, W as MMA's B operand; int4_tc_gemv.cu:
// M <= 8, W as the A operand): one m16n8k16 MMA per dtype and the nibble-pair unpack.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace anvil {
namespace int4tc {

// D += A @ B for one m16n8k16 tile: A row-major bf16 / f16 (4 registers), B column-major (2), D fp32 (4).
#define ANVIL_MMA_16816(TY)                                                                                  \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
      "{%0, %1, %2, %3};"                                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> {
  static constexpr uint32_t kOne = 0x3F803F80u;  // (1.0, 1.0); a nibble at mantissa bits 0..3 adds q / 128
  static constexpr float kS = 128.f;
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ANVIL_MMA_16816("bf16");
  }
};
template <> struct MmaType<__half> {
  static constexpr uint32_t kOne = 0x3C003C00u;  // a nibble at mantissa bits 0..3 adds q / 1024
  static constexpr float kS = 1024.f;
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ANVIL_MMA_16816("f16");
  }
};

// Nibbles j and j + 4 of w as the T pair (1 + q_j / S, 1 + q_j+4 / S): (w >> 4j) & 0x000F000F | one, one lop3.
template <typename T, int J>
__device__ __forceinline__ uint32_t unit_pair(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w >> (4 * J)), "n"(0x000F000F), "n"(MmaType<T>::kOne));
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& q, int i) {
  return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

// One 128-column chunk of R 16-row tiles with W as the A operand (int4_tc_gemv.cu's layout): lane (g, t) holds
// xv, 16 bytes of each of 4 column groups of its x row, and q[r][e], the 16 bytes of rows g + 8 e of tile r at
// columns 32 t .. 32 t + 31. d[r] (+)= sum (1 + q / S) x over the chunk, xs (+)= sum x (an MMA against ones);
// d[r][c]: row 16 r + g + 8 (c >> 1), batch row 2 t + (c & 1); xs[c]: batch row 2 t + (c & 1).
template <typename T, int R>
__device__ __forceinline__ void tc_chunk(const uint4 (&xv)[4], const uint4 (&q)[R][2], float (&d)[R][4],
                                         float (&xs)[4]) {
  using MT_ = MmaType<T>;
  const uint32_t ones[4] = {MT_::kOne, MT_::kOne, MT_::kOne, MT_::kOne};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // B: x pairs (x[2h], x[2h + 4]) at k slots (2t, 2t + 1), (x[2h + 1], x[2h + 5]) at (2t + 8, 2t + 9)
      const uint32_t lo = h == 0 ? xv[i].x : xv[i].y, hi = h == 0 ? xv[i].z : xv[i].w;
      const uint32_t b0 = __byte_perm(lo, hi, 0x5410), b1 = __byte_perm(lo, hi, 0x7632);
      MT_::mma(xs, ones, b0, b1);
#pragma unroll
      for (int r = 0; r < R; ++r) {  // A: the same columns of rows g (a0, a2) and g + 8 (a1, a3)
        const uint32_t wg = word(q[r][0], i), w8 = word(q[r][1], i);
        const uint32_t a[4] = {h == 0 ? unit_pair<T, 0>(wg) : unit_pair<T, 2>(wg),
                               h == 0 ? unit_pair<T, 0>(w8) : unit_pair<T, 2>(w8),
                               h == 0 ? unit_pair<T, 1>(wg) : unit_pair<T, 3>(wg),
                               h == 0 ? unit_pair<T, 1>(w8) : unit_pair<T, 3>(w8)};
        MT_::mma(d[r], a, b0, b1);
      }
    }
}

}  // namespace int4tc
}  // namespace anvil
