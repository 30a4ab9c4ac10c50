// FlashAttention-2-style varlen prefill: tiles of BM queries x BN keys, mma.sync m16n8k16 tensor cores,
// online softmax in registers, K/V double-buffered in swizzled shared memory via cp.async, causal/window block skipping.
#pragma once
#include "common.cuh"

#include <cstdlib>

#ifndef ANVIL_PREFILL_DEFAULT_HD128
#define ANVIL_PREFILL_DEFAULT_HD128 5
#endif
#ifndef ANVIL_PREFILL_DEFAULT_HD64
#define ANVIL_PREFILL_DEFAULT_HD64 1
#endif

namespace anvil {
namespace prefill {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  const int sz = valid ? 16 : 0;  // 0 bytes read: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// c[16x8 f32] += a[16x16] * b[16x8]
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Row r, 16-byte chunk c of a [rows, D] tile: chunks XOR-swizzled by (r % 8) so ldmatrix reads are conflict-free.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

template <int D, int BM, int BN, int NW>
struct Cfg {
  static constexpr int kThreads = NW * 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kSmemElems = BM * D + 4 * BN * D;  // Q + 2 x (K, V)
  static_assert(BM == NW * 16, "each warp owns 16 query rows");
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shapes");
};

// rows [row0, row0 + R) of a [L, D] sequence (row stride `stride` elements) -> smem tile, zero-filled past L
template <typename T, int D, int R, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride, int row0, int L, int tid) {
  constexpr int C = D / 8;
#pragma unroll
  for (int i = tid; i < R * C; i += NT) {
    const int r = i / C, c = i % C;
    const bool ok = row0 + r < L;
    const T* src = ok ? g + (int64_t)(row0 + r) * stride + c * 8 : g;
    cp_async16(s + swz<D>(r, c), src, ok);
  }
}

template <typename T, int D, int BM, int BN, int NW, int MINB, bool kQreg>
__global__ void __launch_bounds__(NW * 32, MINB) prefill_kernel(const PrefillParams p) {
  using C = Cfg<D, BM, BN, NW>;
  constexpr int NT = C::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;      // 2 buffers of BN * D
  T* sV = sK + 2 * BN * D;  // 2 buffers of BN * D

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.x;
  const int kvh = h / (p.heads / p.kv_heads);

  // blockIdx.y -> (sequence, query tile); within a sequence the last (heaviest causal) tile goes first
  int tile = blockIdx.y, b = -1, mblk = 0, start = 0, L = 0;
  for (int i = 0; i < p.batch; ++i) {
    const int s = p.cu_seqlens[i], e = p.cu_seqlens[i + 1];
    const int nt = (e - s + BM - 1) / BM;
    if (tile < nt) {
      b = i; mblk = nt - 1 - tile; start = s; L = e - s;
      break;
    }
    tile -= nt;
  }
  if (b < 0) return;
  const int q0 = mblk * BM;

  const T* qg = static_cast<const T*>(p.q) + (int64_t)start * p.q_tok + (int64_t)h * p.q_head;
  const T* kg = static_cast<const T*>(p.k) + (int64_t)start * p.k_tok + (int64_t)kvh * p.k_head;
  const T* vg = static_cast<const T*>(p.v) + (int64_t)start * p.v_tok + (int64_t)kvh * p.v_head;

  int n_lo = 0, n_hi = L;
  if (p.causal) n_hi = min(L, q0 + BM);
  if (p.window > 0) n_lo = max(0, q0 - p.window + 1);
  const int nb_lo = n_lo / BN, nb_hi = (n_hi + BN - 1) / BN;

  load_tile<T, D, BM, NT>(sQ, qg, p.q_tok, q0, L, tid);
  cp_async_commit();
  load_tile<T, D, BN, NT>(sK, kg, p.k_tok, nb_lo * BN, L, tid);
  load_tile<T, D, BN, NT>(sV, vg, p.v_tok, nb_lo * BN, L, tid);
  cp_async_commit();

  const int g = lane / 4, t4 = lane % 4;
  const int wrow0 = q0 + warp * 16;           // first query row (in-sequence) of this warp
  const int row_a = wrow0 + g, row_b = row_a + 8;  // the two rows this thread accumulates
  const float sl2 = p.scale_log2;

  // kQreg: the warp's Q fragments stay in registers for the whole key loop (fewer ldmatrix, more registers)
  uint32_t qf[kQreg ? D / 16 : 1][4];
  if constexpr (kQreg) {
    cp_async_wait<1>();  // the Q group (the first K/V group may still be in flight)
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int r = warp * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
      ldmatrix_x4(qf[ks], sQ + swz<D>(r, c));
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int buf = (nb - nb_lo) & 1;
    if (nb + 1 < nb_hi) {
      load_tile<T, D, BN, NT>(sK + (buf ^ 1) * BN * D, kg, p.k_tok, (nb + 1) * BN, L, tid);
      load_tile<T, D, BN, NT>(sV + (buf ^ 1) * BN * D, vg, p.v_tok, (nb + 1) * BN, L, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = sK + buf * BN * D;
    const T* v_s = sV + buf * BN * D;
    const int n0 = nb * BN;

    // warp-uniform: does any (row, key) pair of this warp survive the masks?
    bool live = wrow0 < L;
    if (p.causal) live = live && n0 <= wrow0 + 15;
    if (p.window > 0) live = live && wrow0 - (n0 + BN - 1) < p.window;
    if (live) {
      float s[BN / 8][4];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      // S = Q K^T
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        if constexpr (kQreg) {
          a[0] = qf[ks][0]; a[1] = qf[ks][1]; a[2] = qf[ks][2]; a[3] = qf[ks][3];
        } else {
          const int r = warp * 16 + (lane & 15), c = ks * 2 + (lane >> 4);
          ldmatrix_x4(a, sQ + swz<D>(r, c));
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bf[4];
          const int r = np * 16 + (lane >> 4) * 8 + (lane & 7), c = ks * 2 + ((lane >> 3) & 1);
          ldmatrix_x4(bf, k_s + swz<D>(r, c));
          mma16816<T>(s[2 * np], a, bf[0], bf[1]);
          mma16816<T>(s[2 * np + 1], a, bf[2], bf[3]);
        }
      }
      // masks, only on tiles that cross a boundary (sequence end, diagonal, window edge)
      const bool need_mask = (n0 + BN > L) || (p.causal && n0 + BN - 1 > wrow0) ||
                             (p.window > 0 && wrow0 + 15 - n0 >= p.window);
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n0 + j * 8 + 2 * t4 + (e & 1);
            const int row = e < 2 ? row_a : row_b;
            bool keep = col < L;
            if (p.causal) keep = keep && col <= row;
            if (p.window > 0) keep = keep && row - col < p.window;
            if (!keep) s[j][e] = -INFINITY;
          }
        }
      }
      // online softmax (base 2; the scale is folded into the exponent)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hf], s[j][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[hf], mx);
        const float m_sc = m_new == -INFINITY ? 0.f : m_new * sl2;
        const float alpha = fast_exp2(m_run[hf] * sl2 - m_sc);
        m_run[hf] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const float p0 = fast_exp2(fmaf(s[j][2 * hf], sl2, -m_sc));
          const float p1 = fast_exp2(fmaf(s[j][2 * hf + 1], sl2, -m_sc));
          s[j][2 * hf] = p0;
          s[j][2 * hf + 1] = p1;
          rs += p0 + p1;
        }
        l_run[hf] = l_run[hf] * alpha + rs;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[i][2 * hf] *= alpha;
          o[i][2 * hf + 1] *= alpha;
        }
      }
      // O += P V  (P straight from the accumulator registers as the A operand)
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bf[4];
          const int r = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), c = dp * 2 + (lane >> 4);
          ldmatrix_x4_trans(bf, v_s + swz<D>(r, c));
          mma16816<T>(o[2 * dp], a, bf[0], bf[1]);
          mma16816<T>(o[2 * dp + 1], a, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's loads overwrite this buffer
  }

  // normalise, stage the warp's 16 rows in its own slice of sQ, then 16-byte coalesced stores
  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = l_run[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[hf] = l > 0.f ? 1.f / l : 0.f;
  }
  T* so = sQ;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int ra = warp * 16 + g, rb = ra + 8;
    *reinterpret_cast<uint32_t*>(so + swz<D>(ra, i) + 2 * t4) = pack2<T>(o[i][0] * inv[0], o[i][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(so + swz<D>(rb, i) + 2 * t4) = pack2<T>(o[i][2] * inv[1], o[i][3] * inv[1]);
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + (int64_t)start * p.o_tok + (int64_t)h * p.o_head;
#pragma unroll
  for (int i = lane; i < 16 * C::kChunks; i += 32) {
    const int r = i / C::kChunks, c = i % C::kChunks;
    const int row = wrow0 + r;
    if (row < L)
      *reinterpret_cast<uint4*>(og + (int64_t)row * p.o_tok + c * 8) =
          *reinterpret_cast<const uint4*>(so + swz<D>(warp * 16 + r, c));
  }
}

template <typename T, int D, int BM, int BN, int NW, int MINB, bool kQreg = false>
cudaError_t launch(const PrefillParams& p, cudaStream_t st) {
  if (p.total_tokens == 0 || p.batch == 0) return cudaSuccess;
  using C = Cfg<D, BM, BN, NW>;
  const size_t smem = (size_t)C::kSmemElems * sizeof(T);
  auto kern = prefill_kernel<T, D, BM, BN, NW, MINB, kQreg>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  // upper bound on query tiles over all sequences: sum ceil(L_i / BM) <= T / BM + batch
  const long long tiles = (long long)p.total_tokens / BM + p.batch;
  if (tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(p.heads, (unsigned)tiles);
  kern<<<grid, C::kThreads, smem, st>>>(p);
  return cudaGetLastError();
}

// Tile configurations, picked at run time (ANVIL_PREFILL_VARIANT, for tuning; defaults measured on H100):
//   0: 128 x 64 tiles, 8 warps, registers uncapped (1 block / SM for head_dim 128)
//   1: 128 x 64 tiles, 8 warps, 2 blocks / SM (registers capped at 128)
//   2:  64 x 64 tiles, 4 warps, 2 blocks / SM
//   3: as 1 with Q held in registers      4: as 2 with Q in registers
//   5: 128 x 128 tiles, 8 warps, 1 block / SM, Q in registers
inline int variant_from_env(int fallback) {
  const char* e = std::getenv("ANVIL_PREFILL_VARIANT");  // read per call so a benchmark can sweep it
  return e && *e ? std::atoi(e) : fallback;
}

template <typename T, int D>
cudaError_t launch_variant(const PrefillParams& p, cudaStream_t st) {
  switch (variant_from_env(D == 128 ? ANVIL_PREFILL_DEFAULT_HD128 : ANVIL_PREFILL_DEFAULT_HD64)) {
    case 1: return launch<T, D, 128, 64, 8, 2>(p, st);
    case 2: return launch<T, D, 64, 64, 4, 2>(p, st);
    case 3: return launch<T, D, 128, 64, 8, 2, true>(p, st);
    case 4: return launch<T, D, 64, 64, 4, 2, true>(p, st);
    case 5: return launch<T, D, 128, 128, 8, 1, true>(p, st);
    default: return launch<T, D, 128, 64, 8, 1>(p, st);
  }
}

}  // namespace prefill
}  // namespace anvil
