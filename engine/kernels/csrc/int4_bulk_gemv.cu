// Int4 decode GEMV on the tensor cores with the weights streamed into shared memory by the bulk-copy (TMA) engine
// (sm_90): the same contract, math and MMA layout as int4_tc_gemv.cu (int4tc::tc_chunk), 1 <= M <= 8, K % 128 == 0,
// G % 128 == 0, (K / G) % 8 == 0 (each row's scales are a 16-byte multiple). int4_gemv's path when env
// ANVIL_INT4_TC_BULK=1 (a measured candidate; off by default).
//
// Why: ncu on int4_tc_gemv at M = 1 (results/gpu/int4-h200/README.md) shows it latency-bound at 25% occupancy (the
// register stages that keep its loads in flight cost 128+ registers per thread), stalled first on global loads,
// with DRAM at a third of peak, and neither fewer instructions nor more register stages helped. Here the loads cost
// no registers: one warp issues `cp.async.bulk` copies (a row's 512 bytes per stage) into an S-stage ring of shared
// memory, each stage completing on its mbarrier, so S x 16 R x 512 bytes per block are in flight at a register
// cost of zero, and the scales / zeros of the block's rows (whole K) arrive the same way at the start.
// - A block: 16 R rows x all of K, 8 warps; a stage is 1,024 columns (8 chunks of 128: warp w takes chunk w), rows
//   padded to 576 bytes so the two rows of a quarter-warp's 16-byte reads fall on disjoint banks.
// - Before griddepcontrol.wait (PDL): the scales / zeros and the first S stages are requested (constants); x after.
// - Per stage: wait on its mbarrier (parity = use count & 1), the chunk's MMAs, __syncthreads, then warp 0 refills
//   the slot with stage + S (after a proxy fence: the async proxy writes what the generic proxy just read).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common.cuh"
#include "int4_mma.cuh"

namespace anvil {
namespace {

constexpr int kCols = 1024;           // columns per stage
constexpr int kWarps = kCols / 128;   // one 128-column chunk per warp per stage
constexpr int kPitch = kCols / 2 + 64;  // bytes per smem row (512 of nibbles + 64 of padding)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n@!P bra WAIT;\n}\n" ::"r"(
          smem_addr(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
#endif

// Dynamic shared memory: S x 16 R rows of kPitch bytes | scales, zeros [16 R][K / G] | red [8][4 R][32] floats |
// S + 1 mbarriers (the stages', then the scales / zeros').
template <int R, int S>
size_t smem_bytes(int ng, int elem) {
  return (size_t)S * 16 * R * kPitch + (size_t)2 * 16 * R * ng * elem + (size_t)kWarps * 4 * R * 32 * 4 + (S + 1) * 8;
}

template <typename T, int R, int S>
__global__ void __launch_bounds__(kWarps * 32) int4_bulk_gemv_kernel(const T* __restrict__ x,
                                                                     const uint32_t* __restrict__ qweight,
                                                                     const T* __restrict__ scales,
                                                                     const T* __restrict__ zeros,
                                                                     const T* __restrict__ bias,
                                                                     const T* __restrict__ residual, T* __restrict__ y,
                                                                     int m, int n, int k, int group) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using MT_ = int4tc::MmaType<T>;
  constexpr int kRows = 16 * R;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int ng = k / group, nb = blockIdx.x * kRows, nst = (k + kCols - 1) / kCols;
  unsigned char* wbuf = smem;
  T* sbuf = reinterpret_cast<T*>(smem + S * kRows * kPitch);
  T* zbuf = sbuf + kRows * ng;
  float* red = reinterpret_cast<float*>(zbuf + kRows * ng);  // [kWarps][4 R][32]
  uint64_t* bars = reinterpret_cast<uint64_t*>(red + kWarps * 4 * R * 32);
  const unsigned char* qbytes = reinterpret_cast<const unsigned char*>(qweight);
  const int64_t row_bytes = k / 2;

  auto issue = [&](int st) {  // warp 0: stage st into its slot, one row per lane
    const int slot = st % S, c0 = st * kCols;
    const uint32_t bytes = (uint32_t)(min(kCols, k - c0) / 2);
    if (lane == 0) mbar_expect_tx(&bars[slot], bytes * kRows);
    for (int r = lane; r < kRows; r += 32) {
      const int row = min(nb + r, n - 1);  // past the end: the last row (never written)
      bulk_copy(wbuf + (slot * kRows + r) * kPitch, qbytes + row * row_bytes + c0 / 2, bytes, &bars[slot]);
    }
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i <= S; ++i) mbar_init(&bars[i]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0) {
    const uint32_t szb = (uint32_t)(ng * sizeof(T));
    if (lane == 0) mbar_expect_tx(&bars[S], 2 * szb * kRows);
    for (int r = lane; r < kRows; r += 32) {
      const int row = min(nb + r, n - 1);
      bulk_copy(sbuf + r * ng, scales + (int64_t)row * ng, szb, &bars[S]);
      bulk_copy(zbuf + r * ng, zeros + (int64_t)row * ng, szb, &bars[S]);
    }
    for (int st = 0; st < min(S, nst); ++st) issue(st);
  }
  pdl_wait();  // the weights are constants; x (and the residual, y) belong to the previous kernels
  pdl_launch_dependents();

  const T* xr = x + (int64_t)min(g, m - 1) * k + 32 * t;
  float acc[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
  mbar_wait(&bars[S], 0);
  for (int st = 0; st < nst; ++st) {
    const int slot = st % S, c = st * kWarps + warp;  // this warp's chunk
    const bool active = (c << 7) < k;
    uint4 xv[4];
    if (active) {
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = __ldca(reinterpret_cast<const uint4*>(xr + (c << 7) + 8 * i));
    }
    mbar_wait(&bars[slot], (uint32_t)((st / S) & 1));
    if (active) {
      const unsigned char* base = wbuf + slot * kRows * kPitch + warp * 64 + 16 * t;
      const int grp = (c << 7) / group;
      uint4 q[R][2];
      float ca[R][2], cb[R][2];  // per A row: S * s and (S + z) * s
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int rr = 16 * r + g + 8 * e;
          q[r][e] = *reinterpret_cast<const uint4*>(base + rr * kPitch);
          const float s = to_f<T>(sbuf[rr * ng + grp]);
          ca[r][e] = MT_::kS * s;
          cb[r][e] = fmaf(to_f<T>(zbuf[rr * ng + grp]), s, ca[r][e]);
        }
      float d[R][4], xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) d[r][cc] = 0.f;
      int4tc::tc_chunk<T, R>(xv, q, d, xs);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc)
          acc[r][cc] = fmaf(ca[r][cc >> 1], d[r][cc], fmaf(-cb[r][cc >> 1], xs[cc & 1], acc[r][cc]));
    }
    __syncthreads();  // every warp is done with the slot
    if (warp == 0 && st + S < nst) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(st + S);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(warp * 4 * R + r * 4 + c) * 32 + lane] = acc[r][c];
  __syncthreads();
  for (int f = threadIdx.x; f < R * 4 * 32; f += kWarps * 32) {
    const int e = f >> 5, l = f & 31, c = e & 3, r = e >> 2;
    const int row = nb + 16 * r + (l >> 2) + 8 * (c >> 1), b = 2 * (l & 3) + (c & 1);
    if (row >= n || b >= m) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * 4 * R + e) * 32 + l];
    if (bias) v += to_f<T>(bias[row]);
    const int64_t o = (int64_t)b * n + row;
    y[o] = out_with_residual<T>(v, residual, o);
  }
#endif
}

template <typename T, int R, int S>
cudaError_t launch_cfg(const Int4GemvParams& p, cudaStream_t st) {
  const size_t smem = smem_bytes<R, S>(p.k / p.group, (int)sizeof(T));
  static bool raised = false;  // one attribute call per instantiation (the limit is per kernel, not per device)
  if (!raised) {
    const cudaError_t e = cudaFuncSetAttribute(int4_bulk_gemv_kernel<T, R, S>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    raised = true;
  }
  const int blocks = (p.n + 16 * R - 1) / (16 * R);
  return launch_kernel(int4_bulk_gemv_kernel<T, R, S>, blocks, kWarps * 32, smem, st, p.pdl != 0,
                       static_cast<const T*>(p.x), static_cast<const uint32_t*>(p.qweight),
                       static_cast<const T*>(p.scales), static_cast<const T*>(p.zeros), static_cast<const T*>(p.bias),
                       static_cast<const T*>(p.residual), static_cast<T*>(p.y), p.m, p.n, p.k, p.group);
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

}  // namespace

bool int4_bulk_gemv_takes(const Int4GemvParams& p) {
  static int major = -1;
  if (major < 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  }
  return major >= 9 && p.m >= 1 && p.m <= kInt4GemvMaxM && p.k % 128 == 0 && p.group % 128 == 0 &&
         p.k % p.group == 0 && (p.k / p.group) % 8 == 0 && aligned16(p.qweight) && aligned16(p.scales) &&
         aligned16(p.zeros);
}

// Env ANVIL_INT4_BULK_R (1 / 2 tiles of 16 rows per block; default 2 above N = 4,096, else 1) and ANVIL_INT4_BULK_S
// (2 / 4 stages; default 4), read per call.
cudaError_t launch_int4_bulk_gemv(const Int4GemvParams& p, DType dt, cudaStream_t st) {
  if (!int4_bulk_gemv_takes(p)) return cudaErrorInvalidValue;
  const int r = env_int("ANVIL_INT4_BULK_R", p.n > 4096 ? 2 : 1), s = env_int("ANVIL_INT4_BULK_S", 4);
  return ANVIL_HALF_SWITCH(dt, T, [&] {
    if (r >= 2) return s >= 4 ? launch_cfg<T, 2, 4>(p, st) : launch_cfg<T, 2, 2>(p, st);
    return s >= 4 ? launch_cfg<T, 1, 4>(p, st) : launch_cfg<T, 1, 2>(p, st);
  });
}

}  // namespace anvil
