// Int4 (group-wise asymmetric) weight-only GEMV for decode: y[M, N] = x[M, K] @ W^T (+ bias), 1 <= M <= 8,
// W in Anvil's packed format (engine/quant/int4.py): qweight int32 [N, K/8] (nibble j of word w = column 8w + j),
// scales / zeros [N, K/G] in x's dtype (zeros integer-valued), W[n, k] = (q - z) * s. fp16 / bf16.
//
// Decode reads W once: the kernel is built to keep many weight bytes in flight and to spend few ALU instructions
// per nibble (the int4 -> float unpack, not the FMA, is what limits int4 GEMVs).
// - A warp owns R consecutive rows and all of K: per iteration lane l reads 16 bytes (32 nibbles = 32 columns of
//   one group, as G % 32 == 0) of each of its R rows, covering 1,024 columns per warp; the words, scales and zeros
//   of P iterations are in flight (a ring of P register stages, refilled as each is used; P = 1 is a double
//   buffer). At M = 1 (decode) the row count and the depth are chosen per shape (int4_gemv_rp). One shuffle
//   reduction at the end; no split-K, no workspace, no second kernel.
// - Epilogue: + bias, + residual (rounded product + r, HF's order). On sm_90 the launch is a PDL one: the first
//   stages of weights are loaded before griddepcontrol.wait, while the previous kernel finishes.
// - Unpack without int -> float conversions: a nibble moved to bits 16..19 of a word and OR-ed with 0x43000000
//   is the float 128 + q; one at bits 12..15 with 0x45000000 is 2048 + q (exact). Per 8-nibble word: 4 shifts and
//   8 lop3 (and + or in one instruction), then 8 FMAs into an accumulator that starts at -sum_j base_j x_j, so it
//   ends at sum_j q_j x_j. The zero and the scale are applied once per row and group:
//   y += s * (sum q x - z * sum x). The bases (128 / 2048) keep fp32 rounding far below bf16's.
// - x is read 16 bytes at a time with coherent, L1-cached loads (ld.global.ca: it is tiny and stays in L1 / L2;
//   not the non-coherent path, as under PDL the kernel starts before the kernel that writes x has finished).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace anvil {
namespace {

constexpr int kWarps = 4;

template <typename T> struct Pair;
template <> struct Pair<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t v) { return __half22float2(*reinterpret_cast<__half2*>(&v)); }
};
template <> struct Pair<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  }
};

__device__ __forceinline__ float lop(uint32_t t, uint32_t mask, uint32_t base) {
  return __uint_as_float((t & mask) | base);
}

// The 8 columns of word w as floats base_j + q_j (j = 0..7), base_j = 2048 for j in {1, 3, 6}, else 128 (the
// kernel's accumulator starts at -sum_j base_j x_j).
__device__ __forceinline__ void unpack8(uint32_t w, float (&f)[8]) {
  constexpr uint32_t M16 = 0x000F0000u, M12 = 0x0000F000u, B128 = 0x43000000u, B2048 = 0x45000000u;
  const uint32_t t1 = w << 8, t2 = w << 16, t3 = w >> 4, t4 = w >> 12;
  f[0] = lop(t2, M16, B128);
  f[1] = lop(t1, M12, B2048);
  f[2] = lop(t1, M16, B128);
  f[3] = lop(w, M12, B2048);
  f[4] = lop(w, M16, B128);
  f[5] = lop(t3, M16, B128);
  f[6] = lop(t4, M12, B2048);
  f[7] = lop(t4, M16, B128);
}

template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ p, float (&x)[8]) {
  const uint4 v = __ldca(reinterpret_cast<const uint4*>(p));
  const float2 a = Pair<T>::f2(v.x), b = Pair<T>::f2(v.y), c = Pair<T>::f2(v.z), d = Pair<T>::f2(v.w);
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y; x[4] = c.x; x[5] = c.y; x[6] = d.x; x[7] = d.y;
}

template <typename T, int M, int R, int P>
__global__ void __launch_bounds__(kWarps * 32) int4_gemv_kernel(const T* __restrict__ x,
                                                                const uint32_t* __restrict__ qweight,
                                                                const T* __restrict__ scales,
                                                                const T* __restrict__ zeros,
                                                                const T* __restrict__ bias,
                                                                const T* __restrict__ residual, T* __restrict__ y,
                                                                int n, int k, int group, int pdl) {
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * R;
  if (n0 >= n) return;
  const int kw = k >> 3, ng = k / group;
  const int iters = (k + 1023) >> 10;
  float yacc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) yacc[r][m] = 0.f;
  bool live[R];
#pragma unroll
  for (int r = 0; r < R; ++r) live[r] = n0 + r < n;

  // P stages of (words, scale, zero) per row: iteration it lives in stage it % P and is loaded P iterations
  // before it is used, so P * R 16-byte loads (and their scales / zeros) are in flight per lane.
  uint4 qst[P][R];
  T sst[P][R], zst[P][R];
  auto load = [&](int it, uint4 (&q)[R], T (&s)[R], T (&z)[R]) {
    const int c = (it << 10) + (lane << 5);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      q[r] = make_uint4(0, 0, 0, 0);
      s[r] = z[r] = from_f<T>(0.f);
      if (live[r] && it < iters && c < k) {
        q[r] = __ldcs(reinterpret_cast<const uint4*>(qweight + (int64_t)(n0 + r) * kw + (c >> 3)));
        const int64_t sz = (int64_t)(n0 + r) * ng + c / group;
        s[r] = __ldg(scales + sz);
        z[r] = __ldg(zeros + sz);
      }
    }
  };
#pragma unroll
  for (int p = 0; p < P; ++p) load(p, qst[p], sst[p], zst[p]);
  pdl_enter(pdl);  // the weights above are constants; x (and the residual, y) belong to the previous kernels
  for (int it0 = 0; it0 < iters; it0 += P) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int it = it0 + p;
    if (it >= iters) break;
    uint4 q[R];
    T sv[R], zv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) q[r] = qst[p][r], sv[r] = sst[p][r], zv[r] = zst[p][r];
    if (it + P < iters) load(it + P, qst[p], sst[p], zst[p]);
    const int c = (it << 10) + (lane << 5);
    if (c >= k) continue;  // the tail iteration's idle lanes (nothing loaded for them either)
    float acc[R][M], xs[M], base[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xs[m] = base[m] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      float f[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t w = wi == 0 ? q[r].x : wi == 1 ? q[r].y : wi == 2 ? q[r].z : q[r].w;
        unpack8(w, f[r]);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        load_x8(x + (int64_t)m * k + c + wi * 8, xv);
        const float s_all = xv[0] + xv[1] + xv[2] + xv[3] + xv[4] + xv[5] + xv[6] + xv[7];
        xs[m] += s_all;
        base[m] += 128.f * s_all + 1920.f * (xv[1] + xv[3] + xv[6]);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r][m] = fmaf(f[r][j], xv[j], acc[r][m]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (!live[r]) continue;
      const float s = to_f<T>(sv[r]), z = to_f<T>(zv[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) yacc[r][m] += s * ((acc[r][m] - base[m]) - z * xs[m]);
    }
  }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = yacc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      yacc[r][m] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (!live[r]) continue;
      const float b = bias ? to_f<T>(bias[n0 + r]) : 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const int64_t o = (int64_t)m * n + n0 + r;
        y[o] = out_with_residual<T>(yacc[r][m] + b, residual, o);
      }
    }
  }
}

template <typename T, int M, int R, int P>
cudaError_t launch_mrp(const Int4GemvParams& p, cudaStream_t st) {
  const int blocks = (p.n + kWarps * R - 1) / (kWarps * R);
  return launch_kernel(int4_gemv_kernel<T, M, R, P>, blocks, kWarps * 32, 0, st, p.pdl != 0,
                       static_cast<const T*>(p.x), static_cast<const uint32_t*>(p.qweight),
                       static_cast<const T*>(p.scales), static_cast<const T*>(p.zeros), static_cast<const T*>(p.bias),
                       static_cast<const T*>(p.residual), static_cast<T*>(p.y), p.n, p.k, p.group, p.pdl);
}

// The M = 1 default per shape, from the H200 sweep of every R x P (results/gpu/int4-h200/
// int4-kernels-stages-aea7397.json, µs): up to N = 4,096 rows R = 2 with 4 stages (wo 6.0, w2 18.3; R = 4, P = 1:
// 6.9 / 22.2), above R = 4 with 1 (qkv 8.3, w13 31.5; R = 8, P = 2: 10.6 / 40.7). Deeper stages gain little:
// the kernel is bound by instruction issue (the unpack), not by the loads in flight.
void int4_gemv_rp(int n, int k, int* r, int* stages) {
  (void)k;
  *r = n <= 4096 ? 2 : 4;
  *stages = n <= 4096 ? 4 : 1;
}

template <typename T, int R>
cudaError_t launch_r1(const Int4GemvParams& p, int stages, cudaStream_t st) {
  if constexpr (R < 8) {  // R = 8 with 4 stages spills (255 registers): it runs 2
    if (stages >= 4) return launch_mrp<T, 1, R, 4>(p, st);
  }
  if (stages >= 2) return launch_mrp<T, 1, R, 2>(p, st);
  return launch_mrp<T, 1, R, 1>(p, st);
}

// M = 1 (decode; M = 2..64 go to int4_mma in the engine): R rows per warp and P stages of loads in flight.
// Defaults: see int4_gemv_rp; env ANVIL_INT4_GEMV_R (2 / 4 / 8) and ANVIL_INT4_GEMV_P (1 / 2 / 4), read per call,
// override them (tuning knobs for benchmarks/bench_int4.py). M = 2..8: R = 4 for M = 2, else 2; P = 1.
template <typename T, int M>
cudaError_t launch_m(const Int4GemvParams& p, cudaStream_t st) {
  if constexpr (M == 1) {
    int r, stages;
    int4_gemv_rp(p.n, p.k, &r, &stages);
    r = env_int("ANVIL_INT4_GEMV_R", r);
    stages = env_int("ANVIL_INT4_GEMV_P", stages);
    if (r == 2) return launch_r1<T, 2>(p, stages, st);
    if (r == 8) return launch_r1<T, 8>(p, stages, st);
    return launch_r1<T, 4>(p, stages, st);
  } else {
    return launch_mrp<T, M, (M <= 2 ? 4 : 2), 1>(p, st);
  }
}

template <typename T>
cudaError_t launch_t(const Int4GemvParams& p, cudaStream_t st) {
  switch (p.m) {
    case 1: return launch_m<T, 1>(p, st);
    case 2: return launch_m<T, 2>(p, st);
    case 3: return launch_m<T, 3>(p, st);
    case 4: return launch_m<T, 4>(p, st);
    case 5: return launch_m<T, 5>(p, st);
    case 6: return launch_m<T, 6>(p, st);
    case 7: return launch_m<T, 7>(p, st);
    case 8: return launch_m<T, 8>(p, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_int4_gemv(const Int4GemvParams& p, DType dt, cudaStream_t st) {
  if (p.m < 1 || p.m > kInt4GemvMaxM || p.k % 32 != 0 || p.group % 32 != 0 || p.k % p.group != 0)
    return cudaErrorInvalidValue;
  if (p.k % 128 == 0 && p.group % 128 == 0 && env_int("ANVIL_INT4_GEMV_TC", 1) != 0)
    return launch_int4_tc_gemv(p, dt, st);
  if (p.norm_w || p.act) return cudaErrorNotSupported;  // the prologues are the tensor-core path's (..._takes_prologue)
  return ANVIL_HALF_SWITCH(dt, T, [&] { return launch_t<T>(p, st); });
}

}  // namespace anvil
