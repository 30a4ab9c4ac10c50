// L2 prefetch of a weight range: the decode step's small kernels (RoPE + KV write, split-KV attention, its merge)
// leave HBM idle for ~8 us per layer at batch 1; a prefetch issued before them streams the next GEMV's weights
// into L2 meanwhile, and that GEMV then reads them from L2 instead of HBM.
//
// One CTA of 32 threads. On sm_90 each thread issues bulk L2 prefetches (`cp.async.bulk.prefetch.L2`, the TMA
// unit: fire and forget, no completion to wait for) of `chunk`-byte pieces, thread t the pieces t, t + 32, ...
// (so the range is requested roughly front to back, the order the GEMV's CTAs read it in). Before sm_90 the
// same CTA walks the range with one `prefetch.global.L2` per 128-byte line (slower to issue; the engine turns
// the prefetch on only on sm_90). Under PDL the prefetches go out before griddepcontrol.wait, i.e. while the
// previous kernel (the QKV GEMV) finishes; the kernel then waits for it so the stream's order is kept.
#include "common.cuh"

namespace anvil {
namespace {

__global__ void l2_prefetch_kernel(const char* __restrict__ p, int64_t bytes, int chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int64_t pieces = (bytes + chunk - 1) / chunk;
  for (int64_t c = threadIdx.x; c < pieces; c += blockDim.x) {
    const int64_t off = c * chunk;
    const uint32_t n = (uint32_t)(bytes - off < chunk ? bytes - off : chunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + off), "r"(n) : "memory");
  }
#else
  for (int64_t off = (int64_t)threadIdx.x * 128; off < bytes; off += (int64_t)blockDim.x * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
#endif
  pdl_wait();
  pdl_launch_dependents();
}

}  // namespace

cudaError_t launch_l2_prefetch(const void* p, int64_t bytes, int chunk, bool pdl, cudaStream_t st) {
  if (bytes <= 0) return cudaSuccess;
  if (chunk <= 0 || chunk % 16 != 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(p) % 16 != 0)
    return cudaErrorInvalidValue;
  return launch_kernel(l2_prefetch_kernel, 1, 32, 0, st, pdl, static_cast<const char*>(p), bytes, chunk);
}

}  // namespace anvil
