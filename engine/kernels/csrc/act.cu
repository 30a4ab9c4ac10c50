// SiLU-and-mul over [gate | up] rows, rounded like torch's F.silu(gate) * up in the input dtype.
#include "common.cuh"

namespace anvil {
namespace {

template <typename T>
__device__ __forceinline__ T silu_mul(T g, T u) {
  const float gf = to_f(g);
  const float s = round_to<T>(gf / (1.f + expf(-gf)));  // F.silu stores in T, then T * T
  return from_f<T>(s * to_f(u));
}

template <typename T>
__global__ void silu_and_mul_vec_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int f) {
  using V = Vec16<T>;
  constexpr int E = V::N;
  const int fv = f / E;
  const int64_t total = rows * fv;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / fv;
    const int c = (int)(i - r * fv);
    const V g = reinterpret_cast<const V*>(x + r * 2 * f)[c];
    const V u = reinterpret_cast<const V*>(x + r * 2 * f + f)[c];
    V o;
#pragma unroll
    for (int e = 0; e < E; ++e) o.v[e] = silu_mul(g.v[e], u.v[e]);
    reinterpret_cast<V*>(out + r * f)[c] = o;
  }
}

template <typename T>
__global__ void silu_and_mul_generic_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int f) {
  const int64_t total = rows * f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / f;
    const int c = (int)(i - r * f);
    out[i] = silu_mul(x[r * 2 * f + c], x[r * 2 * f + f + c]);
  }
}

int grid_for(int64_t work, int threads) {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t need = (work + threads - 1) / threads;
  const int64_t cap = (int64_t)sms * 16;
  return (int)(need < cap ? (need > 0 ? need : 1) : cap);
}

}  // namespace

cudaError_t launch_silu_and_mul(const void* x, void* out, int64_t rows, int f, DType dt, cudaStream_t st) {
  if (rows == 0 || f == 0) return cudaSuccess;
  return ANVIL_DTYPE_SWITCH(dt, T, [&] {
    constexpr int E = Vec16<T>::N;
    const auto* xp = static_cast<const T*>(x);
    auto* op = static_cast<T*>(out);
    if (f % E == 0 && ((uintptr_t)x | (uintptr_t)out) % 16 == 0) {
      silu_and_mul_vec_kernel<T><<<grid_for(rows * (f / E), 256), 256, 0, st>>>(xp, op, rows, f);
    } else {
      silu_and_mul_generic_kernel<T><<<grid_for(rows * f, 256), 256, 0, st>>>(xp, op, rows, f);
    }
    return cudaGetLastError();
  });
}

}  // namespace anvil
