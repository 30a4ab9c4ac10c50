// Prefill attention instance: head_dim 128, __nv_bfloat16 (one .cu per instance so the build parallelises).
#include "prefill_attn.cuh"

namespace anvil {
cudaError_t launch_prefill_hd128_bf16(const PrefillParams& p, cudaStream_t st) {
  return prefill::launch_variant<__nv_bfloat16, 128>(p, st);
}
}  // namespace anvil
