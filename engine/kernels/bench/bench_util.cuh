// Helpers shared by anvil_bench.cu and check.cu: error checks, device buffers, the deterministic init kernel,
// host-side dtype conversion.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "anvil_kernels.h"

namespace bench {

// A failed CUDA call in the harness (not a kernel mismatch) ends the run with exit code 3.
#define BENCH_CUDA(expr)                                                                                \
  do {                                                                                                  \
    const cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "anvil_bench: %s failed at %s:%d: %s\n", #expr, __FILE__, __LINE__,          \
                   cudaGetErrorString(err_));                                                           \
      std::exit(3);                                                                                     \
    }                                                                                                   \
  } while (0)

// Owns one cudaMalloc allocation.
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  explicit DevBuf(size_t n) : bytes(n) { BENCH_CUDA(cudaMalloc(&p, n ? n : 1)); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  template <typename T> T* as() const { return static_cast<T*>(p); }
};

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr anvil::DType v = anvil::DType::F32; };
template <> struct DTypeOf<__half> { static constexpr anvil::DType v = anvil::DType::F16; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr anvil::DType v = anvil::DType::BF16; };

template <typename T> const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "f32"; }
template <> inline const char* dtype_name<__half>() { return "f16"; }
template <> inline const char* dtype_name<__nv_bfloat16>() { return "bf16"; }

// host <-> device element conversion (the cuda_fp16 / cuda_bf16 conversions are host-callable)
template <typename T> __host__ __device__ inline float to_float(T x) { return static_cast<float>(x); }
template <> __host__ __device__ inline float to_float<__half>(__half x) { return __half2float(x); }
template <> __host__ __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __host__ __device__ inline T from_float(float x) { return static_cast<T>(x); }
template <> __host__ __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
// x rounded to T and back: the reference's model of "stored in T"
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

// splitmix64: a deterministic value per (seed, index), so every run and every GPU sees the same inputs
__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// uniform in [-1, 1)
__host__ __device__ inline float uniform(uint64_t seed, uint64_t i) {
  const uint64_t h = mix64(seed * 0x100000001b3ull ^ mix64(i));
  return (float)(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

template <typename T>
__global__ void init_kernel(T* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = from_float<T>(scale * uniform(seed, i));
}

// n elements of T, uniform in [-scale, scale); scale sqrt(3) (the default) gives unit variance like torch.randn
template <typename T>
void fill_random(T* p, size_t n, uint64_t seed, cudaStream_t st, float scale = 1.7320508f) {
  if (n == 0) return;
  const size_t blocks = (n + 255) / 256;
  init_kernel<T><<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, st>>>(p, n, seed, scale);
  BENCH_CUDA(cudaGetLastError());
}

template <typename T>
std::vector<float> to_host(const T* d, size_t n) {
  std::vector<T> tmp(n);
  BENCH_CUDA(cudaMemcpy(tmp.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = to_float(tmp[i]);
  return out;
}

template <typename I>
void upload(I* d, const std::vector<I>& h) {
  BENCH_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(I), cudaMemcpyHostToDevice));
}

int run_checks(int device);  // check.cu: number of failed cases

}  // namespace bench
