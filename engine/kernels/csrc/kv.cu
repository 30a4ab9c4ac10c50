// write_kv: scatter this step's k/v rows [T, Hkv, D] into the contiguous cache [B, Hkv, S_max, D].
#include "common.cuh"

namespace anvil {
namespace {

// W is the access word (uint4 = 16 bytes, or the element itself); strides arrive in elements of size p.elem_size.
template <typename W, typename I>
__global__ void write_kv_kernel(WriteKVParams p) {
  const int t = blockIdx.x;
  const int64_t b = static_cast<const I*>(p.batch_idx)[t];
  const int64_t pos = static_cast<const I*>(p.positions)[t];
  if (b < 0 || b >= p.batch || pos < 0 || pos >= p.s_max) return;  // the binding checks ranges on request
  const int per = (int)sizeof(W) / p.elem_size;  // elements per word
  const int wpr = p.head_dim / per;              // words per head row
  const int es = p.elem_size;
  for (int i = threadIdx.x; i < 2 * p.kv_heads * wpr; i += blockDim.x) {
    const int which = i / (p.kv_heads * wpr);  // 0 = k, 1 = v
    const int j = i - which * p.kv_heads * wpr;
    const int h = j / wpr, c = j % wpr;
    const char* src = static_cast<const char*>(which ? p.v : p.k) +
                      (t * (which ? p.v_tok : p.k_tok) + h * (which ? p.v_head : p.k_head)) * es;
    char* dst = static_cast<char*>(which ? p.v_cache : p.k_cache) + (b * p.c_b + h * p.c_h + pos * p.c_s) * es;
    reinterpret_cast<W*>(dst)[c] = reinterpret_cast<const W*>(src)[c];
  }
}

template <typename I>
cudaError_t run(const WriteKVParams& p, cudaStream_t st) {
  const int threads = 128;
  if (p.vec) {
    write_kv_kernel<uint4, I><<<p.tokens, threads, 0, st>>>(p);
  } else if (p.elem_size == 2) {
    write_kv_kernel<uint16_t, I><<<p.tokens, threads, 0, st>>>(p);
  } else if (p.elem_size == 4) {
    write_kv_kernel<uint32_t, I><<<p.tokens, threads, 0, st>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t st) {
  if (p.tokens == 0) return cudaSuccess;
  return p.idx64 ? run<int64_t>(p, st) : run<int32_t>(p, st);
}

}  // namespace anvil
