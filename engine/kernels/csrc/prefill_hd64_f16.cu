// Prefill attention instance: head_dim 64, __half (one .cu per instance so the build parallelises).
#include "prefill_attn.cuh"

namespace anvil {
cudaError_t launch_prefill_hd64_f16(const PrefillParams& p, cudaStream_t st) {
  return prefill::launch_variant<__half, 64>(p, st);
}
}  // namespace anvil
