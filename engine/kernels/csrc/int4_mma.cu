// Int4 (group-wise asymmetric) weight-only matmul on the tensor cores for decode and small batches:
// y[M, N] = x[M, K] @ W^T (+ bias), 1 <= M <= 64, W in Anvil's packed format (engine/quant/int4.py): qweight int32
// [N, K/8] (nibble j of word w = column 8w + j), scales / zeros [N, K/G] in x's dtype, W[n, k] = (q - z) * s.
// fp16 / bf16, K % 128 == 0, G % 128 == 0. No repacking: it reads the same buffers as the reference.
//
// Why: the FMA GEMV (int4_gemv.cu) is bound by instruction issue (ncu: 0.73 issued warps per scheduler at 33%
// DRAM), two thirds of it the multiply-adds and the x work per nibble. Here mma.sync m16n8k16 does the
// multiply-add (Marlin's way), so a nibble costs under one ALU instruction, and M = 1..16 cost the same.
// - A warp owns NT * 8 rows of W (a tile); the KS warps of a block split K (iteration it = one 128-column chunk,
//   the warps take it = warp, warp + KS, ...) and sum through shared memory: no workspace, one kernel. One block
//   per tile, or (env ANVIL_INT4_MMA_BLOCKS_PER_SM = b, read per call) b blocks per SM that loop over the tiles.
// - Per iteration lane (g = lane / 4, t = lane % 4) loads 16 bytes of row 8 nt + g: columns c0 + 32 t .. + 31
//   (four words); the next iteration's words, scales and zeros are loaded before this one is used (register double
//   buffer), and for M <= 8 all of an iteration's x before its first MMA.
// - The K order inside an MMA is ours to choose (the sum does not care), so each lane's own words are its B
//   fragment: for word i and half h the MMA's k pairs (2t, 2t+1) / (2t+8, 2t+9) are the nibbles (2h, 2h+4) /
//   (2h+1, 2h+5), and the A fragment is the same columns of x, two byte-permutes of a 16-byte x load.
// - Unpack: nibbles j and j + 4 sit at bits 4j and 4j + 16; shifted down by 4j and OR-ed under the exponent of
//   1.0 (one lop3) they are the pair (1 + q_j / S, 1 + q_j+4 / S), S = 128 (bf16) / 1024 (fp16), exact. The MMA
//   sums d = sum u x; an extra MMA against ones gives sum x per row; per group and output
//   y += s * (S * (d - sum x) - z * sum x), in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common.cuh"
#include "int4_mma.cuh"

namespace anvil {
namespace {

using int4tc::MmaType;
using int4tc::unit_pair;
using int4tc::word;

constexpr int kKS = 8;  // warps per block (K split)

// HI: rows g + 8 of an M tile may be live (M > 8); OCC: blocks per SM the registers must allow
template <typename T, int MT, int NT, bool HI, int OCC>
__global__ void __launch_bounds__(kKS * 32, OCC) int4_mma_kernel(const T* __restrict__ x,
                                                           const uint32_t* __restrict__ qweight,
                                                           const T* __restrict__ scales,
                                                           const T* __restrict__ zeros,
                                                           const T* __restrict__ bias,
                                                           const T* __restrict__ residual, T* __restrict__ y,
                                                           int m, int n, int k, int group) {
  using MT_ = MmaType<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kw = k >> 3, ng = k / group, iters = k >> 7, tiles = (n + NT * 8 - 1) / (NT * 8);
  const T* xrow[MT][2];
  bool xlive[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = mt * 16 + g + 8 * e;
      xlive[mt][e] = r < m && (e == 0 || HI);
      xrow[mt][e] = x + (int64_t)(xlive[mt][e] ? r : 0) * k + 32 * t;
    }

  // A block runs tiles blockIdx.x, + gridDim.x, ... (NT * 8 rows each); the next (tile, iteration)'s words, scales
  // and zeros are loaded before this one is used (register double buffer), across tile boundaries too.
  uint4 qn[NT];
  T sn[NT][2], zn[NT][2];
  auto load_q = [&](int tile, int it) {
    const int grp = (it << 7) / group, rb = tile * (NT * 8);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = rb + nt * 8 + g;
      qn[nt] = r < n ? __ldcs(reinterpret_cast<const uint4*>(qweight + (int64_t)r * kw + 4 * t + (it << 4)))
                     : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // this lane's output columns 2t, 2t + 1 of each n8 tile
        const int rs = rb + nt * 8 + 2 * t + e;
        sn[nt][e] = rs < n ? scales[rs * ng + grp] : from_f<T>(0.f);
        zn[nt][e] = rs < n ? zeros[rs * ng + grp] : from_f<T>(0.f);
      }
    }
  };
  constexpr int E = MT * NT * 4;
  __shared__ float red[kKS][E][32];
  if (blockIdx.x < tiles && warp < iters) load_q(blockIdx.x, warp);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int nb = tile * (NT * 8);
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
    for (int it = warp; it < iters; it += kKS) {
      uint4 q[NT];
      float ca[NT][2], cb[NT][2];  // per output column: S * s and (S + z) * s
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        q[nt] = qn[nt];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float s = to_f<T>(sn[nt][e]);
          ca[nt][e] = MT_::kS * s;
          cb[nt][e] = fmaf(to_f<T>(zn[nt][e]), s, ca[nt][e]);
        }
      }
      if (it + kKS < iters) load_q(tile, it + kKS);
      else if (tile + gridDim.x < tiles) load_q(tile + gridDim.x, warp);
      const int c0 = it << 7;

      float d[MT][NT][4], xs[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) xs[mt][c] = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) d[mt][nt][c] = 0.f;
      }
      constexpr int XI = HI ? 1 : 4;  // M <= 8: all of the iteration's x first (L1 / L2 latency off the MMAs)
      uint4 xall[XI][MT][2];
      auto load_x = [&](int i) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            xall[i % XI][mt][e] = xlive[mt][e] ? __ldg(reinterpret_cast<const uint4*>(xrow[mt][e] + c0 + 8 * i))
                                               : make_uint4(0, 0, 0, 0);
      };
      if (XI == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) load_x(i);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (XI == 1) load_x(i);
        const uint4 (&xv)[MT][2] = xall[i % XI];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b[NT][2];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint32_t w = word(q[nt], i);
            b[nt][0] = h == 0 ? unit_pair<T, 0>(w) : unit_pair<T, 2>(w);  // columns (2h, 2h + 4)
            b[nt][1] = h == 0 ? unit_pair<T, 1>(w) : unit_pair<T, 3>(w);  // columns (2h + 1, 2h + 5)
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t a[4];
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // x pairs (x[c], x[c + 1]): lo = columns (2h, 2h + 1), hi = (2h + 4, 2h + 5)
              const uint32_t lo = h == 0 ? xv[mt][e].x : xv[mt][e].y, hi = h == 0 ? xv[mt][e].z : xv[mt][e].w;
              a[e] = __byte_perm(lo, hi, 0x5410);      // (x[2h], x[2h + 4])
              a[e + 2] = __byte_perm(lo, hi, 0x7632);  // (x[2h + 1], x[2h + 5])
            }
            MT_::mma(xs[mt], a, MT_::kOne, MT_::kOne);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) MT_::mma(d[mt][nt], a, b[nt][0], b[nt][1]);
          }
        }
      }
      // y += s * (S * (d - sum x) - z * sum x) = A * d - B * sum x per output column (W row) of this lane
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            acc[mt][nt][c] = fmaf(ca[nt][c & 1], d[mt][nt][c], fmaf(-cb[nt][c & 1], xs[mt][c], acc[mt][nt][c]));
    }

    // the KS warps' partial sums -> y (one thread per output element of the tile)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp][(mt * NT + nt) * 4 + c][lane] = acc[mt][nt][c];
    __syncthreads();
    for (int f = threadIdx.x; f < E * 32; f += kKS * 32) {
      const int e = f >> 5, l = f & 31, c = e & 3, nt = (e >> 2) % NT, mt = (e >> 2) / NT;
      const int row = mt * 16 + (l >> 2) + 8 * (c >> 1), col = nb + nt * 8 + 2 * (l & 3) + (c & 1);
      if (row >= m || col >= n) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kKS; ++w) v += red[w][e][l];
      if (bias) v += to_f<T>(bias[col]);
      const int64_t o = (int64_t)row * n + col;
      y[o] = out_with_residual<T>(v, residual, o);
    }
    __syncthreads();  // red is rewritten by the next tile
  }
}

template <typename T, int MT, int NT, bool HI, int OCC = 1>
cudaError_t launch_cfg(const Int4GemvParams& p, cudaStream_t st) {
  const int tiles = (p.n + NT * 8 - 1) / (NT * 8), per_sm = env_int("ANVIL_INT4_MMA_BLOCKS_PER_SM", 0);
  const int blocks = per_sm > 0 ? std::min(tiles, per_sm * p.num_sms) : tiles;
  int4_mma_kernel<T, MT, NT, HI, OCC><<<blocks, kKS * 32, 0, st>>>(
      static_cast<const T*>(p.x), static_cast<const uint32_t*>(p.qweight), static_cast<const T*>(p.scales),
      static_cast<const T*>(p.zeros), static_cast<const T*>(p.bias), static_cast<const T*>(p.residual),
      static_cast<T*>(p.y), p.m, p.n, p.k, p.group);
  return cudaGetLastError();
}

// One M tile: two blocks per SM (<= 128 registers; NT = 4 then spills a little: env ANVIL_INT4_MMA_OCC=1 lets
// it use ~160 registers at one block per SM instead, a tuning knob like ANVIL_INT4_MMA_NT).
template <typename T, int NT>
cudaError_t launch_nt(const Int4GemvParams& p, cudaStream_t st) {
  if constexpr (NT == 4) {
    if (p.m <= 16 && env_int("ANVIL_INT4_MMA_OCC", 2) == 1)
      return p.m <= 8 ? launch_cfg<T, 1, 4, false, 1>(p, st) : launch_cfg<T, 1, 4, true, 1>(p, st);
  }
  if (p.m <= 8) return launch_cfg<T, 1, NT, false, 2>(p, st);
  if (p.m <= 16) return launch_cfg<T, 1, NT, true, 2>(p, st);
  if (p.m <= 32) return launch_cfg<T, 2, NT, true>(p, st);
  return launch_cfg<T, 4, 2, true>(p, st);  // 64 rows: 2 n8 tiles keep the accumulators in registers
}

// NT (n8 tiles per warp): 4 above 16 rows or when N / 32 blocks still give ~1.4 per SM, else 2 (the H200's
// fastest per shape, results/gpu/int4-h200/); env ANVIL_INT4_MMA_NT (2 / 4, read per call) overrides it.
template <typename T>
cudaError_t launch_t(const Int4GemvParams& p, cudaStream_t st) {
  int nt = env_int("ANVIL_INT4_MMA_NT", 0);
  if (nt != 2 && nt != 4) nt = p.m > 16 || 10 * ((p.n + 31) / 32) >= 14 * p.num_sms ? 4 : 2;
  return nt == 4 ? launch_nt<T, 4>(p, st) : launch_nt<T, 2>(p, st);
}

}  // namespace

cudaError_t launch_int4_mma(const Int4GemvParams& p, DType dt, cudaStream_t st) {
  if (p.m < 1 || p.m > kInt4MmaMaxM || p.k % 128 != 0 || p.group % 128 != 0 || p.k % p.group != 0)
    return cudaErrorInvalidValue;
  return ANVIL_HALF_SWITCH(dt, T, [&] { return launch_t<T>(p, st); });
}

}  // namespace anvil
