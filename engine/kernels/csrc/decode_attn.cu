// Decode attention (flash-decoding): each block takes one split of the cached sequence for G query heads that share
// a KV head, keeps an online softmax per key-row group, and writes (partial output, log-sum-exp); a reduce kernel
// combines the splits.
#include <cstdlib>

#include "common.cuh"

namespace anvil {
namespace {

constexpr int kThreads = 128;

template <typename T, int D, int G, bool kPrefetch>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  constexpr int TPR = D / 8;             // threads per key row, 16 bytes each
  constexpr int RPI = kThreads / TPR;    // key rows per step
  constexpr int U = G >= 8 ? 2 : 4;      // steps in flight per iteration
  __shared__ float sm_m[RPI][G], sm_l[RPI][G];
  __shared__ float sm_acc[RPI][G][D];

  const int split = blockIdx.x, hb = blockIdx.y * G, b = blockIdx.z;
  const int kvh = hb / (p.heads / p.kv_heads);
  const int tid = threadIdx.x, grp = tid / TPR, li = tid % TPR;
  const int n = min(p.seq_lens[b], p.s_max);
  const int lo = p.window > 0 ? max(0, n - p.window) : 0;
  const int k_begin = max(lo, split * p.chunk), k_end = min(n, (split + 1) * p.chunk);
  const int64_t part0 = ((int64_t)b * p.heads + hb) * p.num_splits + split;  // + g * num_splits
  if (k_begin >= k_end) {
    if (tid < G) p.lse_part[part0 + (int64_t)tid * p.num_splits] = -INFINITY;
    return;
  }

  using V = Vec16<T>;
  float qf[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const V qv = *reinterpret_cast<const V*>(static_cast<const T*>(p.q) + b * p.q_b + (int64_t)(hb + g) * p.q_h + li * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[g][e] = to_f(qv.v[e]) * p.scale_log2;
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  const T* kb = static_cast<const T*>(p.k) + b * p.k_b + (int64_t)kvh * p.k_h + li * 8;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_b + (int64_t)kvh * p.v_h + li * 8;

  // software pipeline: the next step's K/V rows are in flight while this step computes
  constexpr int STEP = RPI * U;
  V kr[U], vr[U], kn[U], vn[U];
  auto load_step = [&](int k0, V* kd, V* vd) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = k0 + u * RPI + grp;
      if (key < k_end) {
        *reinterpret_cast<uint4*>(&kd[u]) = __ldg(reinterpret_cast<const uint4*>(kb + (int64_t)key * p.k_s));
        *reinterpret_cast<uint4*>(&vd[u]) = __ldg(reinterpret_cast<const uint4*>(vb + (int64_t)key * p.v_s));
      } else {
        *reinterpret_cast<uint4*>(&kd[u]) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(&vd[u]) = make_uint4(0, 0, 0, 0);
      }
    }
  };
  if constexpr (kPrefetch) load_step(k_begin, kr, vr);
  for (int k0 = k_begin; k0 < k_end; k0 += STEP) {
    if constexpr (kPrefetch) {
      if (k0 + STEP < k_end) load_step(k0 + STEP, kn, vn);
    } else {
      load_step(k0, kr, vr);
    }
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) kf[e] = to_f(kr[u].v[e]);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
        s[u][g] = d;
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (k0 + u * RPI + grp >= k_end)
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] = -INFINITY;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float m_sc = mx == -INFINITY ? 0.f : mx;
      const float alpha = fast_exp2(m[g] - m_sc);
      m[g] = mx;
      float pu[U], ps = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[u] = fast_exp2(s[u][g] - m_sc);
        ps += pu[u];
      }
      l[g] = l[g] * alpha + ps;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = acc[g][e] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pu[u], to_f(vr[u].v[e]), a);
        acc[g][e] = a;
      }
    }
    if constexpr (kPrefetch) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kr[u] = kn[u];
        vr[u] = vn[u];
      }
    }
  }

  // combine the RPI row groups
  if (li == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      sm_m[grp][g] = m[g];
      sm_l[grp][g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[grp][g][li * 8 + e] = acc[g][e];
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int r = 0; r < RPI; ++r) M = fmaxf(M, sm_m[r][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int r = 0; r < RPI; ++r) {
      const float w = sm_m[r][g] == -INFINITY ? 0.f : fast_exp2(sm_m[r][g] - M);
      L = fmaf(sm_l[r][g], w, L);
      A = fmaf(sm_acc[r][g][d], w, A);
    }
    const int64_t part = part0 + (int64_t)g * p.num_splits;
    p.o_part[part * D + d] = L > 0.f ? A / L : 0.f;
    if (d == 0) p.lse_part[part] = L > 0.f ? M + log2f(L) : -INFINITY;
  }
}

template <typename T, int D>
__global__ void decode_reduce_kernel(const DecodeParams p) {
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t base = ((int64_t)b * p.heads + h) * p.num_splits;
  float M = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) M = fmaxf(M, p.lse_part[base + s]);
  float L = 0.f, A = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float lse = p.lse_part[base + s];
    if (lse == -INFINITY) continue;
    const float w = fast_exp2(lse - M);
    L += w;
    A = fmaf(w, p.o_part[(base + s) * D + threadIdx.x], A);
  }
  static_cast<T*>(p.o)[b * p.o_b + (int64_t)h * p.o_h + threadIdx.x] = from_f<T>(L > 0.f ? A / L : 0.f);
}

template <typename T, int D, int G>
cudaError_t run(const DecodeParams& p, cudaStream_t st) {
  const dim3 grid(p.num_splits, p.heads / G, p.batch);
  if (env_int("ANVIL_DECODE_PREFETCH", 1))
    decode_split_kernel<T, D, G, true><<<grid, kThreads, 0, st>>>(p);
  else
    decode_split_kernel<T, D, G, false><<<grid, kThreads, 0, st>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_reduce_kernel<T, D><<<dim3(p.heads, p.batch), D, 0, st>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t run_g(const DecodeParams& p, cudaStream_t st) {
  const int ratio = p.heads / p.kv_heads;
  if (ratio % 8 == 0) return run<T, D, 8>(p, st);
  if (ratio % 4 == 0) return run<T, D, 4>(p, st);
  if (ratio % 2 == 0) return run<T, D, 2>(p, st);
  return run<T, D, 1>(p, st);
}

}  // namespace

void decode_split_plan(int batch, int kv_heads, int s_max, int num_sms, int* num_splits, int* chunk) {
  // enough blocks for several waves (so the last wave's tail is short), but at least 256 keys per block
  const int work = batch * kv_heads > 0 ? batch * kv_heads : 1;
  const int waves = env_int("ANVIL_DECODE_WAVES", 16);  // target blocks = waves * SMs
  int ns = (waves * num_sms + work - 1) / work;
  const int max_ns = (s_max + 255) / 256;
  ns = ns < 1 ? 1 : (ns > max_ns ? max_ns : ns);
  int c = (s_max + ns - 1) / ns;
  c = (c + 63) / 64 * 64;
  if (c < 64) c = 64;
  *chunk = c;
  *num_splits = (s_max + c - 1) / c;
}

cudaError_t launch_decode_attention(const DecodeParams& p, int head_dim, DType dt, cudaStream_t st) {
  if (p.batch == 0) return cudaSuccess;
  return ANVIL_HALF_SWITCH(dt, T, [&] {
    if (head_dim == 64) return run_g<T, 64>(p, st);
    if (head_dim == 128) return run_g<T, 128>(p, st);
    return cudaErrorInvalidValue;
  });
}

}  // namespace anvil
