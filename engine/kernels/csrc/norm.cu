// RMSNorm and residual-add + RMSNorm: one block per row, the row held in registers as 16-byte vectors.
#include "common.cuh"

namespace anvil {
namespace {

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NV 16-byte vectors per thread; the row (n = nvec * E elements) stays in registers between the two passes.
template <typename T, int NV, bool kRes>
__global__ void rms_norm_vec_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                                    T* __restrict__ out, T* __restrict__ res_out, int n, float eps) {
  using V = Vec16<T>;
  constexpr int E = V::N;
  __shared__ float red[32];
  const int64_t off = (int64_t)blockIdx.x * n;
  const int nvec = n / E;
  V xv[NV];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      xv[i] = reinterpret_cast<const V*>(x + off)[idx];
      if constexpr (kRes) {
        const V rv = reinterpret_cast<const V*>(res + off)[idx];
#pragma unroll
        for (int e = 0; e < E; ++e) xv[i].v[e] = from_f<T>(to_f(xv[i].v[e]) + to_f(rv.v[e]));
        reinterpret_cast<V*>(res_out + off)[idx] = xv[i];
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float f = to_f(xv[i].v[e]);
        ss += f * f;
      }
    }
  }
  const float inv = rsqrtf(block_sum(ss, red) / n + eps);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      const V wv = reinterpret_cast<const V*>(w)[idx];
      V o;
#pragma unroll
      for (int e = 0; e < E; ++e) o.v[e] = from_f<T>(to_f(wv.v[e]) * round_to<T>(to_f(xv[i].v[e]) * inv));
      reinterpret_cast<V*>(out + off)[idx] = o;
    }
  }
}

// Any n, any alignment: two passes over the row (the second from L1/L2).
template <typename T, bool kRes>
__global__ void rms_norm_generic_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                                        T* __restrict__ out, T* __restrict__ res_out, int n, float eps) {
  __shared__ float red[32];
  const int64_t off = (int64_t)blockIdx.x * n;
  const T* src = x + off;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float f = to_f(x[off + i]);
    if constexpr (kRes) {
      const T r = from_f<T>(f + to_f(res[off + i]));
      res_out[off + i] = r;
      f = to_f(r);
    }
    ss += f * f;
  }
  if constexpr (kRes) src = res_out + off;
  const float inv = rsqrtf(block_sum(ss, red) / n + eps);  // block_sum's barrier also orders res_out
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    out[off + i] = from_f<T>(to_f(w[i]) * round_to<T>(to_f(src[i]) * inv));
}

template <typename T, bool kRes>
cudaError_t run(const void* x, const void* res, const void* w, void* out, void* res_out, int64_t rows, int n,
                float eps, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  constexpr int E = Vec16<T>::N;
  const auto* xp = static_cast<const T*>(x);
  const auto* rp = static_cast<const T*>(res);
  const auto* wp = static_cast<const T*>(w);
  auto* op = static_cast<T*>(out);
  auto* rop = static_cast<T*>(res_out);
  const bool aligned = ((uintptr_t)x | (uintptr_t)res | (uintptr_t)w | (uintptr_t)out | (uintptr_t)res_out) % 16 == 0;
  const int nvec = n / E;
  if (aligned && n % E == 0 && nvec <= 8 * 1024) {
    const int nv = nvec <= 1024 ? 1 : nvec <= 2048 ? 2 : nvec <= 4096 ? 4 : 8;
    int threads = ((nvec + nv - 1) / nv + 31) / 32 * 32;
    threads = threads < 32 ? 32 : threads;
    const dim3 grid((unsigned)rows);
    switch (nv) {
      case 1: rms_norm_vec_kernel<T, 1, kRes><<<grid, threads, 0, st>>>(xp, rp, wp, op, rop, n, eps); break;
      case 2: rms_norm_vec_kernel<T, 2, kRes><<<grid, threads, 0, st>>>(xp, rp, wp, op, rop, n, eps); break;
      case 4: rms_norm_vec_kernel<T, 4, kRes><<<grid, threads, 0, st>>>(xp, rp, wp, op, rop, n, eps); break;
      default: rms_norm_vec_kernel<T, 8, kRes><<<grid, threads, 0, st>>>(xp, rp, wp, op, rop, n, eps); break;
    }
  } else {
    rms_norm_generic_kernel<T, kRes><<<(unsigned)rows, 256, 0, st>>>(xp, rp, wp, op, rop, n, eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm(const void* x, const void* residual, const void* weight, void* out, void* res_out,
                            int64_t rows, int n, float eps, DType dt, cudaStream_t st) {
  return ANVIL_DTYPE_SWITCH(dt, T, [&] {
    return ANVIL_BOOL_SWITCH(residual != nullptr, kRes,
                             [&] { return run<T, kRes>(x, residual, weight, out, res_out, rows, n, eps, st); });
  });
}

}  // namespace anvil
