// Prefill attention: picks the (head_dim, dtype) instance compiled in its own .cu.
#include "anvil_kernels.h"

namespace anvil {

cudaError_t launch_prefill_attention(const PrefillParams& p, int head_dim, DType dt, cudaStream_t st) {
  if (head_dim == 64 && dt == DType::F16) return launch_prefill_hd64_f16(p, st);
  if (head_dim == 64 && dt == DType::BF16) return launch_prefill_hd64_bf16(p, st);
  if (head_dim == 128 && dt == DType::F16) return launch_prefill_hd128_f16(p, st);
  if (head_dim == 128 && dt == DType::BF16) return launch_prefill_hd128_bf16(p, st);
  return cudaErrorInvalidValue;
}

}  // namespace anvil
