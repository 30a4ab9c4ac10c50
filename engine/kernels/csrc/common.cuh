// Device helpers shared by the kernels: dtype conversion, 16-byte vectors, compile-time switches, PTX wrappers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdlib>

#include "anvil_kernels.h"

namespace anvil {

// A host-side tuning knob from the environment, read per call so a benchmark can sweep it.
inline int env_int(const char* name, int fallback) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : fallback;
}

// Turns a runtime value into a template constant (flash-attention static_switch.h style).
#define ANVIL_DTYPE_SWITCH(DT, T, ...)                                   \
  [&]() -> cudaError_t {                                                 \
    switch (DT) {                                                        \
      case DType::F32: { using T = float; return __VA_ARGS__(); }        \
      case DType::F16: { using T = __half; return __VA_ARGS__(); }       \
      case DType::BF16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                    \
    return cudaErrorInvalidValue;                                        \
  }()

#define ANVIL_HALF_SWITCH(DT, T, ...)                                    \
  [&]() -> cudaError_t {                                                 \
    switch (DT) {                                                        \
      case DType::F16: { using T = __half; return __VA_ARGS__(); }       \
      case DType::BF16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
      default: return cudaErrorInvalidValue;                             \
    }                                                                    \
  }()

#define ANVIL_BOOL_SWITCH(COND, NAME, ...)                               \
  [&]() -> cudaError_t {                                                 \
    if (COND) { constexpr static bool NAME = true; return __VA_ARGS__(); } \
    constexpr static bool NAME = false; return __VA_ARGS__();            \
  }()

// Programmatic dependent launch (sm_90+; no-ops before and when the kernel was launched without it): `pdl_wait`
// blocks until the previous kernel on the stream has completed and its writes are visible (call it before
// reading what an earlier kernel wrote, or writing what it reads); `pdl_launch_dependents` lets the next PDL
// kernel start early (call it after the wait, as the Triton kernels do: engine/kernels/triton/pdl.py).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The kernel's entry after its independent loads, by Int4GemvParams::pdl mode: 1 waits then triggers, 2 (env
// ANVIL_PDL_EARLY=1, an experiment) triggers first so that the next kernels can be resident sooner (see
// engine/kernels/triton/pdl.py: the order is kept, each wait still follows the previous kernel's completion).
__device__ __forceinline__ void pdl_enter(int mode) {
  if (mode == 2) pdl_launch_dependents();
  pdl_wait();
  if (mode != 2) pdl_launch_dependents();
}

// A launch, with the programmatic-stream-serialization attribute when `pdl` (the kernel may start while the
// previous one finishes; it must call pdl_wait before touching that kernel's data).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), int blocks, int threads, size_t smem, cudaStream_t st, bool pdl,
                          Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round-trip through T: what torch does when an op's result is stored in T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f<T>(from_f<T>(x)); }

// An output element v (fp32) stored as T, plus a residual when one is given: round(v) + r, rounded again (HF's
// order: the product in T, then the add in T). r is read with a coherent load (it may come from a PDL predecessor).
template <typename T>
__device__ __forceinline__ T out_with_residual(float v, const T* __restrict__ residual, int64_t o) {
  return from_f<T>(residual ? round_to<T>(v) + to_f<T>(__ldca(residual + o)) : v);
}

// 16 bytes of T, read/written with one vector instruction.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one 32-bit register of two T (low half = a).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace anvil
