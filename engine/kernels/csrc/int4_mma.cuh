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

}  // namespace int4tc
}  // namespace anvil
