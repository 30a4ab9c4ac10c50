// Torch op registration for the anvil CUDA kernels: schemas (TORCH_LIBRARY), input checks, output allocation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "anvil_kernels.h"

namespace {

using anvil::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "anvil: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16 only)");
  }
  return DType::F32;
}

// Messages are built from strings only: streaming an integer into an ostream from this library segfaulted with
// torch 2.11 on the H100 image (backtrace in basic_ostream::_M_insert<long>), so integers go through std::to_string.
std::string join(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}
std::string shape_str(const at::Tensor& t) { return join(t.sizes()); }
std::string stride_str(const at::Tensor& t) { return join(t.strides()); }

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "anvil: ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "anvil: ", an, " and ", bn, " are on different devices");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "anvil: ", an, " (", a.scalar_type(), ") and ", bn, " (",
              b.scalar_type(), ") must have the same dtype");
}

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "anvil: ", what, " launch failed: ", cudaGetErrorString(err));
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// PDL launches: sm_90+ and not disabled by ANVIL_PDL=0 (the switch of the Triton kernels' PDL too).
bool pdl_supported(int device) {
  static int cache[64] = {0};  // 0 unknown, 1 no, 2 yes
  if (device < 64 && cache[device]) return cache[device] == 2;
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  const char* e = std::getenv("ANVIL_PDL");
  const bool yes = major >= 9 && !(e && std::string(e) == "0");
  if (device < 64) cache[device] = yes ? 2 : 1;
  return yes;
}

// ANVIL_PDL_EARLY=1: PDL kernels trigger their dependents before their own wait (mode 2; engine/kernels/triton/pdl.py).
int pdl_mode(int device) {
  if (!pdl_supported(device)) return 0;
  static const int mode = [] {
    const char* e = std::getenv("ANVIL_PDL_EARLY");
    return e && std::string(e) == "1" ? 2 : 1;
  }();
  return mode;
}

int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device]) return cache[device];
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (device < 64) cache[device] = sms;
  return sms;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_same(x, weight, "x", "weight");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "anvil.rms_norm: weight must be [",
              std::to_string(x.size(-1)), "], got ", shape_str(weight));
  const at::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int n = (int)x.size(-1);
  const int64_t rows = n ? xc.numel() / n : 0;
  ok(anvil::launch_rms_norm(xc.data_ptr(), nullptr, wc.data_ptr(), out.data_ptr(), nullptr, rows, n, (float)eps,
                            dtype_of(x), at::cuda::getCurrentCUDAStream()),
     "rms_norm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_same(x, residual, "x", "residual");
  check_same(x, weight, "x", "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), "anvil.fused_add_rms_norm: x ", shape_str(x), " and residual ",
              shape_str(residual), " differ");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "anvil.fused_add_rms_norm: weight must be [", std::to_string(x.size(-1)), "], got ", shape_str(weight));
  const at::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto rc = residual.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  auto res_out = at::empty_like(xc);
  const int n = (int)x.size(-1);
  const int64_t rows = n ? xc.numel() / n : 0;
  ok(anvil::launch_rms_norm(xc.data_ptr(), rc.data_ptr(), wc.data_ptr(), out.data_ptr(), res_out.data_ptr(), rows, n,
                            (float)eps, dtype_of(x), at::cuda::getCurrentCUDAStream()),
     "fused_add_rms_norm");
  return {out, res_out};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "anvil.silu_and_mul: last dim must be even, got ", shape_str(x));
  const at::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto shape = x.sizes().vec();
  const int f = (int)(shape.back() / 2);
  shape.back() = f;
  auto out = at::empty(shape, x.options());
  const int64_t rows = f ? out.numel() / f : 0;
  ok(anvil::launch_silu_and_mul(xc.data_ptr(), out.data_ptr(), rows, f, dtype_of(x),
                                at::cuda::getCurrentCUDAStream()),
     "silu_and_mul");
  return out;
}

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin) {
  check_cuda(q, "q");
  check_same(q, k, "q", "k");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "anvil.rope: q [T, H, D] and k [T, Hkv, D] expected, got ", shape_str(q),
              " and ", shape_str(k));
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "anvil.rope: q ", shape_str(q), " and k ", shape_str(k),
              " disagree");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "anvil.rope: the last dim of q and k must be contiguous");
  TORCH_CHECK(positions.device() == q.device() && positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  positions.size(0) == q.size(0),
              "anvil.rope: positions must be int64 [T] on ", q.device());
  TORCH_CHECK(cos_sin.device() == q.device() && cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 &&
                  cos_sin.size(1) == q.size(2) && cos_sin.is_contiguous(),
              "anvil.rope: cos_sin must be contiguous float32 [max_pos, D] on ", q.device());
  TORCH_CHECK(q.size(2) % 2 == 0, "anvil.rope: head_dim must be even");
  const at::cuda::CUDAGuard guard(q.device());
  anvil::RopeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_tok = q.stride(0);
  p.q_head = q.stride(1);
  p.k_tok = k.stride(0);
  p.k_head = k.stride(1);
  p.positions = positions.data_ptr<int64_t>();
  p.cos_sin = cos_sin.data_ptr<float>();
  p.tokens = (int)q.size(0);
  p.heads = (int)q.size(1);
  p.kv_heads = (int)k.size(1);
  p.head_dim = (int)q.size(2);
  p.vec = aligned16(q) && aligned16(k) && aligned16(cos_sin) && p.q_tok % 8 == 0 && p.q_head % 8 == 0 &&
          p.k_tok % 8 == 0 && p.k_head % 8 == 0;
  ok(anvil::launch_rope(p, dtype_of(q), at::cuda::getCurrentCUDAStream()), "rope");
}

// q/k/v rows may be strided (e.g. views of a fused qkv projection); the last dim must be contiguous
void check_attn_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, "anvil: ", name, " must have a contiguous last dim");
  TORCH_CHECK(aligned16(t), "anvil: ", name, " must be 16-byte aligned");
  for (int i = 0; i < t.dim() - 1; ++i)
    TORCH_CHECK(t.stride(i) % 8 == 0, "anvil: ", name, " strides must be multiples of 8 elements, got ", stride_str(t));
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale, bool causal, int64_t window) {
  check_cuda(q, "q");
  check_same(q, k, "q", "k");
  check_same(q, v, "q", "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "anvil.prefill_attention: float16 or bfloat16 only, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "anvil.prefill_attention: q [T, H, D], k/v [T, Hkv, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "anvil.prefill_attention: k ", shape_str(k), " and v ", shape_str(v), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "anvil.prefill_attention: q ", shape_str(q),
              " and k ", shape_str(k), " disagree");
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 64 || d == 128, "anvil.prefill_attention: head_dim 64 or 128 only, got ", std::to_string(d));
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "anvil.prefill_attention: heads ", std::to_string(q.size(1)),
              " not a multiple of kv heads ", std::to_string(k.size(1)));
  TORCH_CHECK(cu_seqlens.device() == q.device() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 2 && cu_seqlens.is_contiguous(),
              "anvil.prefill_attention: cu_seqlens must be contiguous int32 [B+1] on ", q.device());
  check_attn_operand(q, "q");
  check_attn_operand(k, "k");
  check_attn_operand(v, "v");
  const at::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({q.size(0), q.size(1), d}, q.options());
  anvil::PrefillParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = out.data_ptr();
  p.q_tok = q.stride(0); p.q_head = q.stride(1);
  p.k_tok = k.stride(0); p.k_head = k.stride(1);
  p.v_tok = v.stride(0); p.v_head = v.stride(1);
  p.o_tok = out.stride(0); p.o_head = out.stride(1);
  p.cu_seqlens = cu_seqlens.data_ptr<int>();
  p.batch = (int)cu_seqlens.size(0) - 1;
  p.heads = (int)q.size(1);
  p.kv_heads = (int)k.size(1);
  p.total_tokens = (int)q.size(0);
  p.scale_log2 = (float)(scale * M_LOG2E);
  p.causal = causal;
  p.window = (int)window;
  ok(anvil::launch_prefill_attention(p, (int)d, dtype_of(q), at::cuda::getCurrentCUDAStream()), "prefill_attention");
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seq_lens, double scale, int64_t window) {
  check_cuda(q, "q");
  check_same(q, k_cache, "q", "k_cache");
  check_same(q, v_cache, "q", "v_cache");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "anvil.decode_attention: float16 or bfloat16 only, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "anvil.decode_attention: q [B, H, D], caches [B, Hkv, S_max, D] expected, got ", shape_str(q), ", ",
              shape_str(k_cache), ", ", shape_str(v_cache));
  const int64_t d = q.size(2);
  TORCH_CHECK(k_cache.size(0) == q.size(0) && k_cache.size(3) == d, "anvil.decode_attention: q ", shape_str(q),
              " and cache ", shape_str(k_cache), " disagree");
  TORCH_CHECK(d == 64 || d == 128, "anvil.decode_attention: head_dim 64 or 128 only, got ", std::to_string(d));
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "anvil.decode_attention: heads not a multiple of kv heads");
  TORCH_CHECK(seq_lens.device() == q.device() && seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == q.size(0) && seq_lens.is_contiguous(),
              "anvil.decode_attention: seq_lens must be contiguous int32 [B] on ", q.device());
  check_attn_operand(q, "q");
  check_attn_operand(k_cache, "k_cache");
  check_attn_operand(v_cache, "v_cache");
  const at::cuda::CUDAGuard guard(q.device());
  const int b = (int)q.size(0), h = (int)q.size(1), hkv = (int)k_cache.size(1), s_max = (int)k_cache.size(2);
  auto out = at::empty({b, h, d}, q.options());
  int ns = 1, chunk = 64;
  anvil::decode_split_plan(b, hkv, s_max, num_sms(q.get_device()), &ns, &chunk);
  auto o_part = at::empty({b, h, ns, d}, q.options().dtype(at::kFloat));
  auto lse_part = at::empty({b, h, ns}, q.options().dtype(at::kFloat));
  anvil::DecodeParams p{};
  p.q = q.data_ptr(); p.k = k_cache.data_ptr(); p.v = v_cache.data_ptr(); p.o = out.data_ptr();
  p.o_part = o_part.data_ptr<float>();
  p.lse_part = lse_part.data_ptr<float>();
  p.q_b = q.stride(0); p.q_h = q.stride(1); p.o_b = out.stride(0); p.o_h = out.stride(1);
  p.k_b = k_cache.stride(0); p.k_h = k_cache.stride(1); p.k_s = k_cache.stride(2);
  p.v_b = v_cache.stride(0); p.v_h = v_cache.stride(1); p.v_s = v_cache.stride(2);
  p.seq_lens = seq_lens.data_ptr<int>();
  p.batch = b; p.heads = h; p.kv_heads = hkv; p.s_max = s_max; p.num_splits = ns; p.chunk = chunk;
  p.scale_log2 = (float)(scale * M_LOG2E);
  p.window = (int)window;
  ok(anvil::launch_decode_attention(p, (int)d, dtype_of(q), at::cuda::getCurrentCUDAStream()), "decode_attention");
  return out;
}

void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& batch_idx, const at::Tensor& positions) {
  check_cuda(k_cache, "k_cache");
  check_same(k_cache, v_cache, "k_cache", "v_cache");
  check_same(k_cache, k, "k_cache", "k");
  check_same(k_cache, v, "k_cache", "v");
  dtype_of(k);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "anvil.write_kv: caches [B, Hkv, S_max, D] with equal shapes and strides expected");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(3),
              "anvil.write_kv: k/v [T, Hkv, D] matching the cache expected, got ", shape_str(k), " and ", shape_str(v));
  TORCH_CHECK(k_cache.stride(3) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "anvil.write_kv: the last dim of every tensor must be contiguous");
  for (const auto* t : {&batch_idx, &positions})
    TORCH_CHECK(t->device() == k.device() && (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong) &&
                    t->dim() == 1 && t->size(0) == k.size(0) && t->is_contiguous(),
                "anvil.write_kv: batch_idx and positions must be contiguous int32/int64 [T] on ", k.device());
  TORCH_CHECK(batch_idx.scalar_type() == positions.scalar_type(),
              "anvil.write_kv: batch_idx and positions must share a dtype");
  const at::cuda::CUDAGuard guard(k.device());
  anvil::WriteKVParams p{};
  p.k_cache = k_cache.data_ptr(); p.v_cache = v_cache.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.c_b = k_cache.stride(0); p.c_h = k_cache.stride(1); p.c_s = k_cache.stride(2);
  p.k_tok = k.stride(0); p.k_head = k.stride(1); p.v_tok = v.stride(0); p.v_head = v.stride(1);
  p.batch_idx = batch_idx.data_ptr();
  p.positions = positions.data_ptr();
  p.idx64 = batch_idx.scalar_type() == at::kLong;
  p.tokens = (int)k.size(0);
  p.kv_heads = (int)k.size(1);
  p.head_dim = (int)k.size(2);
  p.batch = (int)k_cache.size(0);
  p.s_max = (int)k_cache.size(2);
  p.elem_size = (int)k.element_size();
  const int per = 16 / p.elem_size;
  p.vec = aligned16(k_cache) && aligned16(k) && aligned16(v) && p.head_dim % per == 0 && p.c_b % per == 0 &&
          p.c_h % per == 0 && p.c_s % per == 0 && p.k_tok % per == 0 && p.k_head % per == 0 && p.v_tok % per == 0 &&
          p.v_head % per == 0;
  ok(anvil::launch_write_kv(p, at::cuda::getCurrentCUDAStream()), "write_kv");
}

// The checks and the launch shared by int4_gemv (FMA, 1 <= M <= 8, K / G multiples of 32) and int4_mma (tensor
// cores, 1 <= M <= 64, K / G multiples of 128).
at::Tensor int4_call(const char* name, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& residual, int max_m, int64_t align, bool pdl,
                     cudaError_t (*launch)(const anvil::Int4GemvParams&, anvil::DType, cudaStream_t),
                     const c10::optional<at::Tensor>& norm_weight = c10::nullopt, double eps = 0.0,
                     bool act = false) {
  const std::string op = std::string("anvil.") + name;
  check_cuda(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": float16 or bfloat16 x only, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [M, K] tensor, got ", shape_str(x));
  TORCH_CHECK(!act || x.size(1) % 2 == 0, op, ": x must be [M, 2K] = [gate | up], got ", shape_str(x));
  const int64_t m = x.size(0), k = act ? x.size(1) / 2 : x.size(1), n = qweight.dim() == 2 ? qweight.size(0) : -1;
  TORCH_CHECK(m >= 1 && m <= max_m, op, ": 1 <= M <= ", std::to_string(max_m), " rows, got ", std::to_string(m));
  TORCH_CHECK(qweight.device() == x.device() && qweight.scalar_type() == at::kInt && qweight.is_contiguous() &&
                  qweight.dim() == 2 && qweight.size(1) * 8 == k,
              op, ": qweight must be contiguous int32 [N, K/8] on x's device, got ", shape_str(qweight), " for x ",
              shape_str(x));
  TORCH_CHECK(k % align == 0 && group_size > 0 && group_size % align == 0 && k % group_size == 0, op, ": K (",
              std::to_string(k), ") and the group size (", std::to_string(group_size), ") must be multiples of ",
              std::to_string(align), ", K of the group size");
  for (const auto* t : {&scales, &zeros}) {
    check_same(x, *t, "x", "scales/zeros");
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == n && t->size(1) == k / group_size, op,
                ": scales / zeros must be contiguous [N, K/G] = [", std::to_string(n), ", ",
                std::to_string(k / group_size), "], got ", shape_str(*t));
  }
  if (bias) {
    check_same(x, *bias, "x", "bias");
    TORCH_CHECK(bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == n, op, ": bias [N] expected");
  }
  if (residual) {
    check_same(x, *residual, "x", "residual");
    TORCH_CHECK(residual->is_contiguous() && residual->dim() == 2 && residual->size(0) == m &&
                    residual->size(1) == n,
                op, ": residual must be contiguous [M, N] = [", std::to_string(m), ", ", std::to_string(n), "], got ",
                shape_str(*residual));
  }
  TORCH_CHECK(aligned16(x) && aligned16(qweight), op, ": x and qweight must be 16-byte aligned");
  if (norm_weight) {
    check_same(x, *norm_weight, "x", "norm_weight");
    TORCH_CHECK(norm_weight->is_contiguous() && norm_weight->dim() == 1 && norm_weight->size(0) == k &&
                    aligned16(*norm_weight),
                op, ": norm_weight must be a contiguous, 16-byte aligned [K] = [", std::to_string(k), "], got ",
                shape_str(*norm_weight));
  }
  if (norm_weight || act)
    TORCH_CHECK(anvil::int4_tc_gemv_takes_prologue((int)m, (int)n, (int)k, (int)group_size), op, ": M = ",
                std::to_string(m), ", K = ", std::to_string(k), ", group ", std::to_string(group_size),
                " is not a shape the fused prologues take (the tensor-core GEMV's x-in-shared-memory kernel: K and G "
                "multiples of 128, M <= 8, x and the K-split sums in 46 KB, ANVIL_INT4_TC_V >= 2, ANVIL_INT4_GEMV_TC "
                "not 0); ask int4_gemv_takes_prologue first, else run the norm / SwiGLU kernel, then int4_gemv");
  const at::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({m, n}, x.options());
  anvil::Int4GemvParams p{};
  p.x = x.data_ptr(); p.qweight = qweight.data_ptr(); p.scales = scales.data_ptr(); p.zeros = zeros.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.m = (int)m; p.n = (int)n; p.k = (int)k; p.group = (int)group_size;
  p.num_sms = num_sms(x.get_device());
  p.pdl = pdl ? pdl_mode(x.get_device()) : 0;
  p.norm_w = norm_weight ? norm_weight->data_ptr() : nullptr;
  p.norm_eps = (float)eps;
  p.act = act ? 1 : 0;
  ok(launch(p, dtype_of(x), at::cuda::getCurrentCUDAStream()), name);
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group_size, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& residual) {
  return int4_call("int4_gemv", x, qweight, scales, zeros, group_size, bias, residual, anvil::kInt4GemvMaxM, 32,
                   true, anvil::launch_int4_gemv);
}

// int4_gemv of rms_norm(x, norm_weight, eps), the norm inside the kernel (int4_tc_gemv.cu's stage_x).
at::Tensor int4_gemv_norm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group_size, const at::Tensor& norm_weight, double eps,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual) {
  return int4_call("int4_gemv_norm", x, qweight, scales, zeros, group_size, bias, residual, anvil::kInt4GemvMaxM,
                   128, true, anvil::launch_int4_gemv, norm_weight, eps);
}

// int4_gemv of silu(gate) * up for x [M, 2K] = [gate | up], the SwiGLU inside the kernel.
at::Tensor int4_gemv_swiglu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& residual) {
  return int4_call("int4_gemv_swiglu", x, qweight, scales, zeros, group_size, bias, residual, anvil::kInt4GemvMaxM,
                   128, true, anvil::launch_int4_gemv, c10::nullopt, 0.0, true);
}

bool int4_gemv_takes_prologue(int64_t m, int64_t n, int64_t k, int64_t group_size) {
  return anvil::int4_tc_gemv_takes_prologue((int)m, (int)n, (int)k, (int)group_size);
}

at::Tensor int4_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                    int64_t group_size, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual) {
  return int4_call("int4_mma", x, qweight, scales, zeros, group_size, bias, residual, anvil::kInt4MmaMaxM, 128,
                   false, anvil::launch_int4_mma);
}

}  // namespace

TORCH_LIBRARY(anvil, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rope_(Tensor! q, Tensor! k, Tensor positions, Tensor cos_sin) -> ()");
  m.def(
      "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, bool causal, int window) -> "
      "Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, int window) -> Tensor");
  m.def("write_kv(Tensor! k_cache, Tensor! v_cache, Tensor k, Tensor v, Tensor batch_idx, Tensor positions) -> ()");
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias, "
        "Tensor? residual=None) -> Tensor");
  m.def("int4_mma(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias, "
        "Tensor? residual=None) -> Tensor");
  m.def("int4_gemv_norm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor norm_weight, "
        "float eps, Tensor? bias, Tensor? residual=None) -> Tensor");
  m.def("int4_gemv_swiglu(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias, "
        "Tensor? residual=None) -> Tensor");
  m.def("int4_gemv_takes_prologue(int m, int n, int k, int group_size) -> bool", &int4_gemv_takes_prologue);
}

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_", &rope_);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("decode_attention", &decode_attention);
  m.impl("write_kv", &write_kv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_mma", &int4_mma);
  m.impl("int4_gemv_norm", &int4_gemv_norm);
  m.impl("int4_gemv_swiglu", &int4_gemv_swiglu);
}
