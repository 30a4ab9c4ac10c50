// Int4 (group-wise asymmetric) decode GEMV on the tensor cores: y[M, N] = x[M, K] @ W^T (+ bias) (+ residual),
// 1 <= M <= 8, W in Anvil's packed format (engine/quant/int4.py: qweight int32 [N, K/8], nibble j of word w =
// column 8w + j; scales / zeros [N, K/G] in x's dtype), K % 128 == 0, G % 128 == 0. int4_gemv's path for those
// shapes (launch_int4_gemv; env ANVIL_INT4_GEMV_TC=0 keeps the FMA kernel).
//
// Why: the FMA GEMV spends ~25 ALU instructions per 8 nibbles (unpack, 8 FMAs, its share of the x work) and is
// bound by issue (ncu: 0.73 issued warps per scheduler at 33% of DRAM); int4_mma (W as the MMA's B operand, one
// register double buffer) spends few ALU instructions but keeps too few bytes in flight at M = 1. This kernel
// needs about a third of the FMA kernel's instructions, yet is only 1.08-1.13x faster (H200): with 3x fewer
// instructions the time barely moved, so neither issue nor (P = 4 vs 2) loads in flight bound it now. A version
// with cp.async copies into a shared-memory ring (P - 1 stages in flight, no register scoreboards) was slower
// still (w13 36-45 µs, int4-kernels-tc-48f7472.json). Here:
// - W is the A operand of mma.m16n8k16 (16 rows x 16 columns: 256 nibbles per MMA, twice int4_mma's), the batch
//   the B operand's 8 columns (lane g = lane / 4 carries x row min(g, M - 1): one x load serves every M <= 8).
// - Lane (g, t = lane % 4) of a warp reads, per 128-column chunk and 16-row tile, 16 bytes of rows g and g + 8
//   (columns 32 t .. 32 t + 31); the K order inside an MMA is ours to choose, so those words are its A fragments
//   as they are (int4tc::unit_pair: one lop3 per nibble pair) and its B fragments two byte-permutes of x.
// - R tiles per warp, KS warps per block split the chunks (c = warp, warp + KS, ...) and sum through shared memory;
//   P stages of words / scales / zeros in flight per lane (a register ring, refilled as each is used), the first
//   ones loaded before griddepcontrol.wait under PDL (sm_90), x after it.
// - Values: the MMA sums d = sum (1 + q / S) x, an MMA against ones sum x; per group y += S s d - (S + z) s sum x
//   in fp32 (int4_mma.cu's algebra), then + bias, + residual (out_with_residual: HF's rounding order).
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

// Per A row of a chunk's group: ca = S * s and cb = (S + z) * s (both kernels).
template <typename T, int R>
__device__ __forceinline__ void group_coefs(const T (&s)[R][2], const T (&z)[R][2], float (&ca)[R][2],
                                            float (&cb)[R][2]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float sf = to_f<T>(s[r][e]);
      ca[r][e] = MmaType<T>::kS * sf;
      cb[r][e] = fmaf(to_f<T>(z[r][e]), sf, ca[r][e]);
    }
}

// x's 8 values of one 16-byte load as the B fragments chunk_mma takes, (b0, b1) for h = 0 then h = 1: the pairs
// (x[2h], x[2h + 4]) at k slots (2t, 2t + 1) and (x[2h + 1], x[2h + 5]) at (2t + 8, 2t + 9).
__device__ __forceinline__ uint4 b_frags(const uint4 v) {
  return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                    __byte_perm(v.y, v.w, 0x7632));
}

// One 128-column chunk of R tiles (both kernels): the MMA sums d = sum (1 + q / S) x and, against ones, sum x, then
// acc += ca d - cb sum x. B: each xv[i] as b_frags gives it (FRAGS: already so; else permuted here); A: the same
// columns of rows g (a0, a2) and g + 8 (a1, a3).
template <typename T, int R, bool FRAGS>
__device__ __forceinline__ void chunk_mma(const uint4 (&xv)[4], const uint4 (&q)[R][2], const float (&ca)[R][2],
                                          const float (&cb)[R][2], float (&acc)[R][4]) {
  using MT_ = MmaType<T>;
  const uint32_t ones[4] = {MT_::kOne, MT_::kOne, MT_::kOne, MT_::kOne};
  float d[R][4], xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) d[r][c] = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 bf = FRAGS ? xv[i] : b_frags(xv[i]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t b0 = h == 0 ? bf.x : bf.z, b1 = h == 0 ? bf.y : bf.w;
      MT_::mma(xs, ones, b0, b1);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t wg = word(q[r][0], i), w8 = word(q[r][1], i);
        const uint32_t a[4] = {h == 0 ? unit_pair<T, 0>(wg) : unit_pair<T, 2>(wg),
                               h == 0 ? unit_pair<T, 0>(w8) : unit_pair<T, 2>(w8),
                               h == 0 ? unit_pair<T, 1>(wg) : unit_pair<T, 3>(wg),
                               h == 0 ? unit_pair<T, 1>(w8) : unit_pair<T, 3>(w8)};
        MT_::mma(d[r], a, b0, b1);
      }
    }
  }
  // d[r][c]: row 16 r + g + 8 (c >> 1), batch row 2t + (c & 1); xs[c]: sum x of batch row 2t + (c & 1)
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(ca[r][c >> 1], d[r][c], fmaf(-cb[r][c >> 1], xs[c & 1], acc[r][c]));
}

// The K-split sum of a block's KS warps through shared memory, + bias, + residual, stored (both kernels).
template <typename T, int R, int KS>
__device__ __forceinline__ void block_sum_store(float (&red)[KS][R * 4][32], const float (&acc)[R][4],
                                                const T* __restrict__ bias, const T* __restrict__ residual,
                                                T* __restrict__ y, int m, int n, int nb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][r * 4 + c][lane] = acc[r][c];
  __syncthreads();
  for (int f = threadIdx.x; f < R * 4 * 32; f += KS * 32) {
    const int e = f >> 5, l = f & 31, c = e & 3, r = e >> 2;
    const int row = nb + 16 * r + (l >> 2) + 8 * (c >> 1), b = 2 * (l & 3) + (c & 1);
    if (row >= n || b >= m) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < KS; ++w) v += red[w][e][l];
    if (bias) v += to_f<T>(bias[row]);
    const int64_t o = (int64_t)b * n + row;
    y[o] = out_with_residual<T>(v, residual, o);
  }
}

template <typename T, int R, int KS, int P>
__global__ void __launch_bounds__(KS * 32) int4_tc_gemv_kernel(const T* __restrict__ x,
                                                               const uint32_t* __restrict__ qweight,
                                                               const T* __restrict__ scales,
                                                               const T* __restrict__ zeros,
                                                               const T* __restrict__ bias,
                                                               const T* __restrict__ residual, T* __restrict__ y,
                                                               int m, int n, int k, int group, int pdl) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kw = k >> 3, ng = k / group, chunks = k >> 7, nb = blockIdx.x * (16 * R);
  const int nj = (chunks - warp + KS - 1) / KS;  // this warp's chunks: warp + KS * j, j < nj
  const uint32_t* qrow[R][2];
  const T* srow[R][2];
  const T* zrow[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // A rows g and g + 8 of tile r (past the end: the last row, never written)
      const int row = min(nb + 16 * r + g + 8 * e, n - 1);
      qrow[r][e] = qweight + (int64_t)row * kw + 4 * t;
      srow[r][e] = scales + (int64_t)row * ng;
      zrow[r][e] = zeros + (int64_t)row * ng;
    }
  const T* xr = x + (int64_t)min(g, m - 1) * k + 32 * t;

  uint4 qs[P][R][2];
  T ss[P][R][2], zs[P][R][2];
  auto load = [&](int j, uint4 (&q)[R][2], T (&s)[R][2], T (&z)[R][2]) {
    const int c = warp + KS * j, grp = (c << 7) / group;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        q[r][e] = make_uint4(0, 0, 0, 0);
        s[r][e] = z[r][e] = from_f<T>(0.f);
        if (j < nj) {
          q[r][e] = __ldcs(reinterpret_cast<const uint4*>(qrow[r][e] + (c << 4)));
          s[r][e] = __ldg(srow[r][e] + grp);
          z[r][e] = __ldg(zrow[r][e] + grp);
        }
      }
  };
#pragma unroll
  for (int p = 0; p < P; ++p) load(p, qs[p], ss[p], zs[p]);
  pdl_enter(pdl);  // the weights are constants; x (and the residual, y) belong to the previous kernels

  float acc[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
  for (int j0 = 0; j0 < nj; j0 += P) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = j0 + p;
      if (j >= nj) break;
      const int c0 = (warp + KS * j) << 7;
      uint4 xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = __ldca(reinterpret_cast<const uint4*>(xr + c0 + 8 * i));
      uint4 q[R][2];
      float ca[R][2], cb[R][2];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) q[r][e] = qs[p][r][e];
      group_coefs<T, R>(ss[p], zs[p], ca, cb);
      load(j + P, qs[p], ss[p], zs[p]);
      chunk_mma<T, R, false>(xv, q, ca, cb, acc);
    }
  }

  __shared__ float red[KS][R * 4][32];
  block_sum_store<T, R, KS>(red, acc, bias, residual, y, m, n, nb);
}

// The x-in-shared-memory variant (ANVIL_INT4_TC_V=2; =3, the default, stores x as B fragments; m * 128-column
// chunks * 320 bytes of x within the shared-memory budget, else the kernel above). Same lanes, MMAs and values; what changes is the cost per chunk, from the sm_90
// SASS of the kernel above at R = 2, P = 2 (374 instructions per chunk, ~23 per 32-bit word of W; ncu: 2.2 cycles
// of long-scoreboard stall per issued instruction): x is copied into shared memory once per block after the PDL wait
// and read per chunk from there (its global loads were consumed at once, an L1 / L2 latency every chunk); each
// 64-byte quarter of a chunk's x sits at a stride of 80 bytes, so lanes t = 0..3 of a 16-byte read hit four bank
// groups; a ring stage is used in place and refilled after its MMAs (no register copy, P - 1 chunks ahead); row
// pointers are kept (not rematerialized) and advanced by one offset per chunk; the group index is a division only
// when G > 128.
constexpr int kXChunkU4 = 20;  // uint4 slots per 128-column chunk of x in shared memory (4 quarters x 5)

// Shared-memory slot of x's 16-byte unit u ((row, chunk, quarter, i) -> 80-byte quarters, see above).
__device__ __forceinline__ int x_slot(int u) { return (u >> 4) * kXChunkU4 + ((u >> 2) & 3) * 5 + (u & 3); }

// x [m, k] into shared memory (FRAGS: as B fragments). With norm_w, RMSNorm on the way, as engine/kernels/triton/
// fused.py's _rms_norm_kernel computes it: rstd = 1 / sqrt(sum x^2 / k + eps) per row (fp32; the sum in another
// order, so within an ulp of it, not bit for bit), then round(w * round(x * rstd)) in T. With act, x is [m, 2k] =
// [gate | up] and what is staged is round(round(silu(gate)) * up), _silu_mul_kernel's rounding.
template <typename T, int KS, bool FRAGS>
__device__ __forceinline__ void stage_x(uint4* xsm, const T* __restrict__ x, const T* __restrict__ norm_w,
                                        float eps, int act, int m, int k) {
  const int kw = k >> 3, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  if (act) {
    for (int row = 0; row < m; ++row)
      for (int u = threadIdx.x; u < kw; u += KS * 32) {
        const uint4 gv = __ldg(x4 + row * 2 * kw + u), uv = __ldg(x4 + row * 2 * kw + kw + u);
        const T* ge = reinterpret_cast<const T*>(&gv);
        const T* ue = reinterpret_cast<const T*>(&uv);
        uint32_t o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float g0 = to_f<T>(ge[2 * i]), g1 = to_f<T>(ge[2 * i + 1]);
          o[i] = pack2<T>(round_to<T>(g0 / (1.f + __expf(-g0))) * to_f<T>(ue[2 * i]),
                          round_to<T>(g1 / (1.f + __expf(-g1))) * to_f<T>(ue[2 * i + 1]));
        }
        const uint4 y = make_uint4(o[0], o[1], o[2], o[3]);
        xsm[x_slot(row * kw + u)] = FRAGS ? b_frags(y) : y;
      }
    __syncthreads();
    return;
  }
  if (norm_w == nullptr) {
    for (int u = threadIdx.x; u < m * kw; u += KS * 32) xsm[x_slot(u)] = FRAGS ? b_frags(__ldg(x4 + u)) : __ldg(x4 + u);
    __syncthreads();
    return;
  }
  __shared__ float part[kInt4GemvMaxM][KS], rstd[kInt4GemvMaxM];
  for (int row = 0; row < m; ++row) {
    float sq = 0.f;
    for (int u = threadIdx.x; u < kw; u += KS * 32) {
      const uint4 v = __ldg(x4 + row * kw + u);
      xsm[x_slot(row * kw + u)] = v;
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) sq = fmaf(to_f<T>(e[i]), to_f<T>(e[i]), sq);
    }
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (lane == 0) part[row][warp] = sq;
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float sq = 0.f;
    for (int w = 0; w < KS; ++w) sq += part[threadIdx.x][w];
    rstd[threadIdx.x] = 1.f / sqrtf(sq / (float)k + eps);
  }
  __syncthreads();
  const uint4* w4 = reinterpret_cast<const uint4*>(norm_w);
  for (int row = 0; row < m; ++row)
    for (int u = threadIdx.x; u < kw; u += KS * 32) {
      const uint4 v = xsm[x_slot(row * kw + u)], wv = __ldg(w4 + u);
      const T* e = reinterpret_cast<const T*>(&v);
      const T* we = reinterpret_cast<const T*>(&wv);
      uint32_t o[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        o[i] = pack2<T>(to_f<T>(we[2 * i]) * round_to<T>(to_f<T>(e[2 * i]) * rstd[row]),
                        to_f<T>(we[2 * i + 1]) * round_to<T>(to_f<T>(e[2 * i + 1]) * rstd[row]));
      const uint4 y = make_uint4(o[0], o[1], o[2], o[3]);
      xsm[x_slot(row * kw + u)] = FRAGS ? b_frags(y) : y;
    }
  __syncthreads();
}

// FRAGS (ANVIL_INT4_TC_V=3, the default since the H200 run of 3bb5e2c: qkv / wo / w13 / w2 at M = 1 in 6.1 / 4.9
// / 22.8 / 11.2 us vs 6.2 / 5.1 / 23.0 / 11.9 for V=2; decode b1 447.3 vs 435.8 tok/s in the same run): x is stored
// as B fragments (b_frags once per block instead of two byte-permutes per 16-byte read per chunk: 16 fewer
// instructions per chunk), and R = 1, P = 2 is built for 3 blocks per SM (80 registers, one spilled word; without the
// bound it takes 82 -> 2 blocks, and qkv's 384 blocks no longer fit one wave).
template <typename T, int R, int KS, int P, bool FRAGS>
__global__ void __launch_bounds__(KS * 32, FRAGS && R == 1 && P == 2 ? 3 : 0) int4_tc_gemv_sx_kernel(const T* __restrict__ x,
                                                                  const uint32_t* __restrict__ qweight,
                                                                  const T* __restrict__ scales,
                                                                  const T* __restrict__ zeros,
                                                                  const T* __restrict__ bias,
                                                                  const T* __restrict__ residual, T* __restrict__ y,
                                                                  int m, int n, int k, int group, int pdl,
                                                                  const T* __restrict__ norm_w, float eps, int act) {
  extern __shared__ uint4 xsm[];  // x [m, chunks, 4 quarters, 5 slots (4 used)] (FRAGS: as b_frags gives it)
  __shared__ float red[KS][R * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kw = k >> 3, ng = k / group, chunks = k >> 7, nb = blockIdx.x * (16 * R), gpc = group >> 7;
  const int nj = (chunks - warp + KS - 1) / KS;  // this warp's chunks: warp + KS * j, j < nj
  const uint4* qp[R][2];  // the next chunk's words / scale of A rows g and g + 8 of each tile (advanced per load)
  const T* sp[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // past the end: the last row, never written
      const int row = min(nb + 16 * r + g + 8 * e, n - 1);
      qp[r][e] = reinterpret_cast<const uint4*>(qweight + (int64_t)row * kw) + t + 4 * warp;
      sp[r][e] = scales + (int64_t)row * ng + (gpc == 1 ? warp : warp / gpc);
    }
  const int64_t zd = zeros - scales;
  const uint32_t magic = gpc == 1 ? 0u : 0xFFFFFFFFu / gpc + 1;  // c / gpc == umulhi(c, magic) for c, gpc < 2^16

  uint4 qs[P][R][2];
  T ss[P][R][2], zs[P][R][2];
  int cn = warp;  // the chunk of the next load
  auto load = [&](int j, int p) {
    if (j >= nj) return;
    const int step = gpc == 1 ? KS : (int)(__umulhi(cn + KS, magic) - __umulhi(cn, magic));
    cn += KS;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        qs[p][r][e] = __ldcs(qp[r][e]);
        ss[p][r][e] = __ldg(sp[r][e]);
        zs[p][r][e] = __ldg(sp[r][e] + zd);
        qp[r][e] += 4 * KS;
        sp[r][e] += step;
      }
  };
#pragma unroll
  for (int p = 0; p < P; ++p) load(p, p);
  pdl_enter(pdl);  // the weights are constants; x (and the residual, y) belong to the previous kernels
  stage_x<T, KS, FRAGS>(xsm, x, norm_w, eps, act, m, k);
  const uint4* xl = xsm + (int64_t)min(g, m - 1) * chunks * kXChunkU4 + 5 * t;

  float acc[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
  for (int j0 = 0; j0 < nj; j0 += P) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = j0 + p;
      if (j >= nj) break;
      const uint4* xc = xl + (warp + KS * j) * kXChunkU4;
      uint4 xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xc[i];
      float ca[R][2], cb[R][2];
      group_coefs<T, R>(ss[p], zs[p], ca, cb);
      chunk_mma<T, R, FRAGS>(xv, qs[p], ca, cb, acc);
      load(j + P, p);  // this stage's registers are free now
    }
  }
  block_sum_store<T, R, KS>(red, acc, bias, residual, y, m, n, nb);
}

size_t x_bytes(int m, int k) { return (size_t)m * (k >> 7) * kXChunkU4 * sizeof(uint4); }

// Whether the x-in-shared-memory kernel takes (m, k) at R tiles x KS warps: x and the K-split sums in 46 KB.
bool sx_fits(int m, int k, int r, int ks) { return x_bytes(m, k) + sizeof(float) * ks * r * 4 * 32 <= 46 * 1024; }

template <typename T, int R, int KS, int P>
cudaError_t launch_cfg(const Int4GemvParams& p, int variant, cudaStream_t st) {
  const int blocks = (p.n + 16 * R - 1) / (16 * R);
  const bool sx = variant >= 2 && sx_fits(p.m, p.k, R, KS);
  if (!sx && (p.norm_w || p.act)) return cudaErrorNotSupported;  // callers ask int4_tc_gemv_takes_prologue first
  if (!sx)
    return launch_kernel(int4_tc_gemv_kernel<T, R, KS, P>, blocks, KS * 32, 0, st, p.pdl != 0,
                         static_cast<const T*>(p.x), static_cast<const uint32_t*>(p.qweight),
                         static_cast<const T*>(p.scales), static_cast<const T*>(p.zeros),
                         static_cast<const T*>(p.bias), static_cast<const T*>(p.residual), static_cast<T*>(p.y),
                         p.m, p.n, p.k, p.group, p.pdl);
  return launch_kernel(variant == 3 ? int4_tc_gemv_sx_kernel<T, R, KS, P, true> : int4_tc_gemv_sx_kernel<T, R, KS, P, false>,
                       blocks, KS * 32, x_bytes(p.m, p.k), st, p.pdl != 0, static_cast<const T*>(p.x),
                       static_cast<const uint32_t*>(p.qweight), static_cast<const T*>(p.scales),
                       static_cast<const T*>(p.zeros), static_cast<const T*>(p.bias),
                       static_cast<const T*>(p.residual), static_cast<T*>(p.y), p.m, p.n, p.k, p.group, p.pdl,
                       static_cast<const T*>(p.norm_w), p.norm_eps, p.act);
}

template <typename T, int R, int KS>
cudaError_t launch_p(const Int4GemvParams& p, int stages, int variant, cudaStream_t st) {
  return stages >= 4 ? launch_cfg<T, R, KS, 4>(p, variant, st) : launch_cfg<T, R, KS, 2>(p, variant, st);
}

template <typename T, int R>
cudaError_t launch_ks(const Int4GemvParams& p, int ks, int stages, int variant, cudaStream_t st) {
  if (ks <= 2) return launch_p<T, R, 2>(p, stages, variant, st);
  if (ks <= 4) return launch_p<T, R, 4>(p, stages, variant, st);
  return launch_p<T, R, 8>(p, stages, variant, st);
}

}  // namespace

// The default per shape: R tiles of 16 rows per warp, KS warps per block, P stages. From the H200 sweeps of every
// R x KS x P at M = 1, µs: the first kernel (int4-kernels-tc-7013384.json) up to N = 4,096 rows R = 1, KS = 8, P = 4
// (wo 5.5, w2 16.2; the FMA kernel 6.0 / 18.3), above R = 2, KS = 8, P = 2 (qkv 7.7, w13 28.7; FMA 8.3 / 31.4); fewer
// warps per block (KS = 2) are 1.2-2.9x slower. The x-in-shared-memory kernel (int4-kernels-tc2-3dd5891.json): P = 4
// up to N = 4,096 (wo 5.2, w2 11.9), R = 1, P = 2 up to 8,192 (qkv 6.1 against 6.6 at R = 2), R = 2, P = 2 above
// (w13 22.7 against 24.1 at R = 1); at M > 1 R = 2 above 4,096 as before (batch 8 measured 2,680 tok/s with it, 2,583
// with R = 1 for qkv: results/gpu/int4-h200/README.md).
void int4_tc_gemv_plan(int m, int n, int variant, int* r, int* ks, int* stages) {
  *r = n > (variant >= 2 && m == 1 ? 8192 : 4096) ? 2 : 1;
  *ks = 8;
  *stages = n > 4096 ? 2 : 4;
}

// Env ANVIL_INT4_TC_R (1 / 2), ANVIL_INT4_TC_KS (2 / 4 / 8) and ANVIL_INT4_TC_P (2 / 4), read per call, override
// the plan (tuning knobs for benchmarks/bench_int4.py); ANVIL_INT4_TC_V: 3 (the default) the x-in-shared-memory kernel
// with x stored as B fragments where x fits, 2 the same with x stored as loaded, 1 the first kernel.
struct TcChoice {
  int variant, r, ks, stages;
};
TcChoice tc_choice(int m, int n) {
  TcChoice c{env_int("ANVIL_INT4_TC_V", 3), 0, 0, 0};
  int4_tc_gemv_plan(m, n, c.variant, &c.r, &c.ks, &c.stages);
  c.r = env_int("ANVIL_INT4_TC_R", c.r) >= 2 ? 2 : 1;
  const int ks = env_int("ANVIL_INT4_TC_KS", c.ks);
  c.ks = ks <= 2 ? 2 : ks <= 4 ? 4 : 8;
  c.stages = env_int("ANVIL_INT4_TC_P", c.stages) >= 4 ? 4 : 2;
  return c;
}

bool int4_tc_gemv_takes_prologue(int m, int n, int k, int group) {
  if (m < 1 || m > kInt4GemvMaxM || k % 128 != 0 || group <= 0 || group % 128 != 0 || k % group != 0 ||
      env_int("ANVIL_INT4_GEMV_TC", 1) == 0)
    return false;
  const TcChoice c = tc_choice(m, n);
  return c.variant >= 2 && sx_fits(m, k, c.r, c.ks);
}

cudaError_t launch_int4_tc_gemv(const Int4GemvParams& p, DType dt, cudaStream_t st) {
  if (p.m < 1 || p.m > kInt4GemvMaxM || p.k % 128 != 0 || p.group % 128 != 0 || p.k % p.group != 0)
    return cudaErrorInvalidValue;
  const TcChoice c = tc_choice(p.m, p.n);
  return ANVIL_HALF_SWITCH(dt, T, [&] {
    return c.r == 2 ? launch_ks<T, 2>(p, c.ks, c.stages, c.variant, st)
                    : launch_ks<T, 1>(p, c.ks, c.stages, c.variant, st);
  });
}

}  // namespace anvil
