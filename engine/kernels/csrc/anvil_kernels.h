// Host-side launcher declarations and parameter structs shared by the .cu files and the torch binding (no torch here).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace anvil {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---- elementwise (contiguous rows) ----
// out = rms_norm(x (+ residual)); when residual != nullptr, res_out receives x + residual (rounded to dtype).
cudaError_t launch_rms_norm(const void* x, const void* residual, const void* weight, void* out, void* res_out,
                            int64_t rows, int n, float eps, DType dt, cudaStream_t st);
// x [rows, 2f] -> out [rows, f]
cudaError_t launch_silu_and_mul(const void* x, void* out, int64_t rows, int f, DType dt, cudaStream_t st);

// ---- RoPE in place: q [T, H, D], k [T, Hkv, D] with arbitrary token/head strides (elements), last dim contiguous ----
struct RopeParams {
  void* q;
  void* k;
  int64_t q_tok, q_head, k_tok, k_head;
  const int64_t* positions;  // [T]
  const float* cos_sin;      // [max_pos, D]
  int tokens, heads, kv_heads, head_dim;
  bool vec;  // 16-byte path allowed (strides and pointers aligned)
};
cudaError_t launch_rope(const RopeParams& p, DType dt, cudaStream_t st);

// ---- write_kv: scatter k/v [T, Hkv, D] into cache [B, Hkv, S_max, D] ----
struct WriteKVParams {
  void* k_cache;
  void* v_cache;
  const void* k;
  const void* v;
  int64_t c_b, c_h, c_s;        // cache strides (elements), shared by k and v caches
  int64_t k_tok, k_head, v_tok, v_head;
  const void* batch_idx;  // int32 or int64 [T]
  const void* positions;  // int32 or int64 [T]
  bool idx64;
  int tokens, kv_heads, head_dim, batch, s_max;  // out-of-range (batch, position) pairs are skipped
  int elem_size;  // bytes per element
  bool vec;       // 16-byte path allowed
};
cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t st);

// ---- prefill attention (varlen packed, causal / sliding window, GQA) ----
struct PrefillParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head;  // strides in elements
  const int* cu_seqlens;  // [batch + 1]
  int batch, heads, kv_heads, total_tokens;
  float scale_log2;  // softmax scale * log2(e)
  bool causal;
  int window;  // > 0: sliding window
};
cudaError_t launch_prefill_attention(const PrefillParams& p, int head_dim, DType dt, cudaStream_t st);
// per (head_dim, dtype) instantiations, one .cu each so the build parallelises
cudaError_t launch_prefill_hd64_f16(const PrefillParams& p, cudaStream_t st);
cudaError_t launch_prefill_hd64_bf16(const PrefillParams& p, cudaStream_t st);
cudaError_t launch_prefill_hd128_f16(const PrefillParams& p, cudaStream_t st);
cudaError_t launch_prefill_hd128_bf16(const PrefillParams& p, cudaStream_t st);

// ---- decode attention: split-KV (flash-decoding) then reduce ----
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* o_part;    // [B, H, num_splits, D] workspace
  float* lse_part;  // [B, H, num_splits] workspace (log2 domain)
  int64_t q_b, q_h, o_b, o_h;
  int64_t k_b, k_h, k_s, v_b, v_h, v_s;
  const int* seq_lens;  // [B]
  int batch, heads, kv_heads, s_max, num_splits, chunk;
  float scale_log2;
  int window;
};
// number of splits and keys per split for this shape (host-side heuristic); chunk is a multiple of 64
void decode_split_plan(int batch, int kv_heads, int s_max, int num_sms, int* num_splits, int* chunk);
cudaError_t launch_decode_attention(const DecodeParams& p, int head_dim, DType dt, cudaStream_t st);

// ---- int4 weight-only GEMV (decode): y [M, N] = x [M, K] @ dequant(W)^T (+ bias), 1 <= M <= kInt4GemvMaxM ----
// qweight int32 [N, K/8] (nibble j of word w = column 8w + j), scales / zeros [N, K/G] in x's dtype (fp16 / bf16);
// K % 32 == 0, G % 32 == 0, 16-byte aligned x and qweight.
constexpr int kInt4GemvMaxM = 8;
struct Int4GemvParams {
  const void* x;
  const void* qweight;
  const void* scales;
  const void* zeros;
  const void* bias;      // [N] or nullptr
  const void* residual;  // [M, N] added to the rounded product (y = round(x W^T + b) + r, HF's order) or nullptr
  void* y;
  int m, n, k, group;
  int num_sms;  // the device's SM count (int4_mma's tile choice)
  int pdl;      // 0 plain launch; 1 PDL (sm_90+; the kernel waits before reading x, then triggers); 2 trigger first
  const void* norm_w = nullptr;  // [K]: x is RMSNorm-ed in the kernel (int4_gemv_norm; the tensor-core path only)
  float norm_eps = 0.f;
  int act = 0;  // 1: x is [M, 2K] = [gate | up], the kernel stages silu(gate) * up (int4_gemv_swiglu; the same path)
};
cudaError_t launch_int4_gemv(const Int4GemvParams& p, DType dt, cudaStream_t st);
// int4_gemv's tensor-core path (int4_tc_gemv.cu) for K % 128 == 0 and G % 128 == 0, which launch_int4_gemv takes
// unless env ANVIL_INT4_GEMV_TC=0 (then the FMA kernel of int4_gemv.cu runs every shape)
cudaError_t launch_int4_tc_gemv(const Int4GemvParams& p, DType dt, cudaStream_t st);
// Whether launch_int4_gemv fuses a prologue (Int4GemvParams::norm_w, ::act) for this shape under the current env: the
// tensor-core path's x-in-shared-memory kernel (ANVIL_INT4_TC_V >= 2, x and its K-split sums in 46 KB of shared memory)
bool int4_tc_gemv_takes_prologue(int m, int n, int k, int group);

// ---- int4 weight-only matmul on the tensor cores (decode, small batches): the same buffers and math as
// int4_gemv, 1 <= M <= kInt4MmaMaxM, K % 128 == 0, G % 128 == 0 (int4_mma.cu) ----
constexpr int kInt4MmaMaxM = 64;
cudaError_t launch_int4_mma(const Int4GemvParams& p, DType dt, cudaStream_t st);

}  // namespace anvil
