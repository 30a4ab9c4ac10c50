// RoPE (rotate-half form) applied in place to q [T, H, D] and k [T, Hkv, D]; cos/sin from the float32 table.
#include "common.cuh"

namespace anvil {
namespace {

// torch computes x * cos + rotate_half(x) * sin as separate float ops: keep them unfused to match bit for bit.
__device__ __forceinline__ void rotate(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
  o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// One thread per (token, head, group of EPT pairs); EPT = 8 with 16-byte accesses, else 1.
template <typename T, int EPT>
__global__ void rope_kernel(RopeParams p) {
  const int half = p.head_dim / 2;
  const int groups = half / EPT;
  const int nh = p.heads + p.kv_heads;
  const int64_t total = (int64_t)p.tokens * nh * groups;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int g = (int)(i % groups);
    const int64_t th = i / groups;
    const int hh = (int)(th % nh);
    const int64_t t = th / nh;
    T* base = hh < p.heads ? static_cast<T*>(p.q) + t * p.q_tok + (int64_t)hh * p.q_head
                           : static_cast<T*>(p.k) + t * p.k_tok + (int64_t)(hh - p.heads) * p.k_head;
    const float* cs = p.cos_sin + p.positions[t] * p.head_dim;
    const int c0 = g * EPT;
    if constexpr (EPT == 8) {
      using V = Vec16<T>;
      static_assert(V::N == 8, "16-byte path is for 2-byte types");
      V a = *reinterpret_cast<const V*>(base + c0);
      V b = *reinterpret_cast<const V*>(base + half + c0);
      const float4 c_lo = *reinterpret_cast<const float4*>(cs + c0);
      const float4 c_hi = *reinterpret_cast<const float4*>(cs + c0 + 4);
      const float4 s_lo = *reinterpret_cast<const float4*>(cs + half + c0);
      const float4 s_hi = *reinterpret_cast<const float4*>(cs + half + c0 + 4);
      const float cv[8] = {c_lo.x, c_lo.y, c_lo.z, c_lo.w, c_hi.x, c_hi.y, c_hi.z, c_hi.w};
      const float sv[8] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w, s_hi.x, s_hi.y, s_hi.z, s_hi.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float o1, o2;
        rotate(to_f(a.v[e]), to_f(b.v[e]), cv[e], sv[e], o1, o2);
        a.v[e] = from_f<T>(o1);
        b.v[e] = from_f<T>(o2);
      }
      *reinterpret_cast<V*>(base + c0) = a;
      *reinterpret_cast<V*>(base + half + c0) = b;
    } else {
      float o1, o2;
      rotate(to_f(base[c0]), to_f(base[half + c0]), cs[c0], cs[half + c0], o1, o2);
      base[c0] = from_f<T>(o1);
      base[half + c0] = from_f<T>(o2);
    }
  }
}

}  // namespace

cudaError_t launch_rope(const RopeParams& p, DType dt, cudaStream_t st) {
  if (p.tokens == 0) return cudaSuccess;
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return ANVIL_DTYPE_SWITCH(dt, T, [&] {
    const bool vec = sizeof(T) == 2 && p.vec && (p.head_dim / 2) % 8 == 0;
    const int ept = vec ? 8 : 1;
    const int64_t total = (int64_t)p.tokens * (p.heads + p.kv_heads) * (p.head_dim / 2 / ept);
    const int64_t need = (total + 255) / 256;
    const int grid = (int)(need < (int64_t)sms * 16 ? need : (int64_t)sms * 16);
    if constexpr (sizeof(T) == 2) {
      if (vec) {
        rope_kernel<T, 8><<<grid, 256, 0, st>>>(p);
        return cudaGetLastError();
      }
    }
    rope_kernel<T, 1><<<grid, 256, 0, st>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace anvil
