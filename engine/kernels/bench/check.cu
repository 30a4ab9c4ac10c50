// anvil_bench --check: every kernel against a plain CPU reference (engine/kernels/reference.py's contract) on small,
// awkward sizes. Outputs are poisoned (NaN bytes) before each call; inputs come from the deterministic init kernel.
#include <algorithm>
#include <cmath>
#include <string>

#include "bench_util.cuh"

namespace bench {
namespace {

struct Tol {
  float atol, rtol;
};
template <typename T> Tol tol_for();
template <> Tol tol_for<float>() { return {1e-5f, 1e-5f}; }
template <> Tol tol_for<__half>() { return {2e-3f, 4e-3f}; }
template <> Tol tol_for<__nv_bfloat16>() { return {1e-2f, 2e-2f}; }
template <typename T> Tol attn_tol() { return tol_for<T>(); }
template <> Tol attn_tol<__half>() { return {4e-3f, 8e-3f}; }

int g_failed = 0, g_cases = 0;

// |got - want| <= atol + rtol * |want| for every element (NaN fails); prints one line per case
void compare(const std::string& name, const std::vector<float>& got, const std::vector<float>& want, Tol t) {
  ++g_cases;
  size_t bad = 0, first = 0;
  double max_err = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs((double)got[i] - (double)want[i]);
    if (!(err <= t.atol + t.rtol * std::fabs((double)want[i]))) {
      if (!bad) first = i;
      ++bad;
    }
    if (err > max_err || std::isnan(err)) max_err = err;
  }
  if (bad) {
    ++g_failed;
    std::printf("[FAIL] %-52s %zu/%zu mismatches, first at %zu: got %g want %g\n", name.c_str(), bad, want.size(),
                first, got[first], want[first]);
  } else {
    std::printf("[ok]   %-52s max |err| %.3g over %zu values\n", name.c_str(), max_err, want.size());
  }
}

void ok(cudaError_t e, const std::string& name) {
  if (e != cudaSuccess) {
    std::printf("[FAIL] %s: launch returned %s\n", name.c_str(), cudaGetErrorString(e));
    ++g_failed;
  }
}

template <typename T>
void check_rms_norm(int rows, int n, bool with_res) {
  const std::string name = std::string(with_res ? "fused_add_rms_norm " : "rms_norm ") + dtype_name<T>() + " [" +
                           std::to_string(rows) + "x" + std::to_string(n) + "]";
  const size_t m = (size_t)rows * n;
  DevBuf x(m * sizeof(T)), r(m * sizeof(T)), w(n * sizeof(T)), out(m * sizeof(T)), rout(m * sizeof(T));
  fill_random(x.as<T>(), m, 11, 0);
  fill_random(r.as<T>(), m, 12, 0);
  fill_random(w.as<T>(), n, 13, 0);
  BENCH_CUDA(cudaMemset(out.p, 0xff, out.bytes));
  BENCH_CUDA(cudaMemset(rout.p, 0xff, rout.bytes));
  const float eps = 1e-5f;
  ok(anvil::launch_rms_norm(x.p, with_res ? r.p : nullptr, w.p, out.p, with_res ? rout.p : nullptr, rows, n, eps,
                            DTypeOf<T>::v, 0),
     name);
  BENCH_CUDA(cudaDeviceSynchronize());
  const auto hx = to_host(x.as<T>(), m), hr = to_host(r.as<T>(), m), hw = to_host(w.as<T>(), n);
  std::vector<float> want(m), want_res(m);
  for (int i = 0; i < rows; ++i) {
    double ss = 0.0;
    for (int j = 0; j < n; ++j) {
      const size_t k = (size_t)i * n + j;
      want_res[k] = with_res ? round_to<T>(hx[k] + hr[k]) : hx[k];
      ss += (double)want_res[k] * want_res[k];
    }
    const float inv = (float)(1.0 / std::sqrt(ss / n + eps));
    for (int j = 0; j < n; ++j) {
      const size_t k = (size_t)i * n + j;
      want[k] = round_to<T>(hw[j] * round_to<T>(want_res[k] * inv));
    }
  }
  compare(name, to_host(out.as<T>(), m), want, tol_for<T>());
  if (with_res) compare(name + " residual out", to_host(rout.as<T>(), m), want_res, {0.f, 0.f});
}

template <typename T>
void check_silu(int rows, int f) {
  const std::string name =
      std::string("silu_and_mul ") + dtype_name<T>() + " [" + std::to_string(rows) + "x2x" + std::to_string(f) + "]";
  DevBuf x((size_t)rows * 2 * f * sizeof(T)), out((size_t)rows * f * sizeof(T));
  fill_random(x.as<T>(), (size_t)rows * 2 * f, 21, 0, 4.f);
  BENCH_CUDA(cudaMemset(out.p, 0xff, out.bytes));
  ok(anvil::launch_silu_and_mul(x.p, out.p, rows, f, DTypeOf<T>::v, 0), name);
  BENCH_CUDA(cudaDeviceSynchronize());
  const auto hx = to_host(x.as<T>(), (size_t)rows * 2 * f);
  std::vector<float> want((size_t)rows * f);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < f; ++j) {
      const float g = hx[(size_t)i * 2 * f + j], u = hx[(size_t)i * 2 * f + f + j];
      want[(size_t)i * f + j] = round_to<T>(round_to<T>(g / (1.f + std::exp(-g))) * u);
    }
  compare(name, to_host(out.as<T>(), want.size()), want, tol_for<T>());
}

// q and k are strided views of one fused [T, H + 2 Hkv, D] qkv buffer; the v part must come back untouched
template <typename T>
void check_rope(int tokens, int heads, int kv_heads, int d, bool vec) {
  const std::string name = std::string("rope ") + dtype_name<T>() + " T=" + std::to_string(tokens) + " " +
                           std::to_string(heads) + "/" + std::to_string(kv_heads) + " d" + std::to_string(d) +
                           (vec ? " 16B" : " scalar");
  const int nh = heads + 2 * kv_heads, max_pos = 64;
  const size_t m = (size_t)tokens * nh * d;
  DevBuf qkv(m * sizeof(T)), pos(tokens * sizeof(int64_t)), cs((size_t)max_pos * d * sizeof(float));
  fill_random(qkv.as<T>(), m, 31, 0);
  std::vector<int64_t> hp(tokens);
  for (int t = 0; t < tokens; ++t) hp[t] = (int64_t)(mix64(t) % max_pos);
  std::vector<float> hcs((size_t)max_pos * d);
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < d / 2; ++i) {
      const float fr = (float)p * std::pow(500000.f, -2.f * i / d);
      hcs[(size_t)p * d + i] = std::cos(fr);
      hcs[(size_t)p * d + d / 2 + i] = std::sin(fr);
    }
  upload(pos.as<int64_t>(), hp);
  upload(cs.as<float>(), hcs);
  const auto before = to_host(qkv.as<T>(), m);
  anvil::RopeParams p{};
  p.q = qkv.p;
  p.k = qkv.as<T>() + (size_t)heads * d;
  p.q_tok = p.k_tok = (int64_t)nh * d;
  p.q_head = p.k_head = d;
  p.positions = pos.as<int64_t>();
  p.cos_sin = cs.as<float>();
  p.tokens = tokens;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = d;
  p.vec = vec;
  ok(anvil::launch_rope(p, DTypeOf<T>::v, 0), name);
  BENCH_CUDA(cudaDeviceSynchronize());
  std::vector<float> want = before;
  const int half = d / 2;
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads + kv_heads; ++h) {
      float* row = want.data() + ((size_t)t * nh + h) * d;
      const float* c = hcs.data() + (size_t)hp[t] * d;
      for (int i = 0; i < half; ++i) {
        const float x1 = row[i], x2 = row[half + i];
        row[i] = round_to<T>(x1 * c[i] - x2 * c[half + i]);
        row[half + i] = round_to<T>(x2 * c[i] + x1 * c[half + i]);
      }
    }
  compare(name, to_host(qkv.as<T>(), m), want, tol_for<T>());
}

// caches poisoned with random values; some (batch, position) pairs out of range (skipped by contract)
template <typename T, typename I>
void check_write_kv(bool vec) {
  const int b = 3, hkv = 2, s_max = 16, d = 64, tokens = 10;
  const std::string name = std::string("write_kv ") + dtype_name<T>() + (sizeof(I) == 8 ? " int64" : " int32") +
                           (vec ? " 16B" : " scalar");
  const size_t cm = (size_t)b * hkv * s_max * d, km = (size_t)tokens * hkv * d;
  DevBuf kc(cm * sizeof(T)), vc(cm * sizeof(T)), k(km * sizeof(T)), v(km * sizeof(T));
  DevBuf bi(tokens * sizeof(I)), ps(tokens * sizeof(I));
  fill_random(kc.as<T>(), cm, 41, 0);
  fill_random(vc.as<T>(), cm, 42, 0);
  fill_random(k.as<T>(), km, 43, 0);
  fill_random(v.as<T>(), km, 44, 0);
  const std::vector<I> hb = {0, 1, 2, 0, -1, 3, 1, 2, 2, 0}, hps = {0, 5, 15, 7, 3, 2, 16, 9, 0, 1};
  upload(bi.as<I>(), hb);
  upload(ps.as<I>(), hps);
  auto want_k = to_host(kc.as<T>(), cm), want_v = to_host(vc.as<T>(), cm);
  const auto hk = to_host(k.as<T>(), km), hv = to_host(v.as<T>(), km);
  anvil::WriteKVParams p{};
  p.k_cache = kc.p; p.v_cache = vc.p; p.k = k.p; p.v = v.p;
  p.c_b = (int64_t)hkv * s_max * d; p.c_h = (int64_t)s_max * d; p.c_s = d;
  p.k_tok = p.v_tok = (int64_t)hkv * d; p.k_head = p.v_head = d;
  p.batch_idx = bi.p; p.positions = ps.p; p.idx64 = sizeof(I) == 8;
  p.tokens = tokens; p.kv_heads = hkv; p.head_dim = d; p.batch = b; p.s_max = s_max;
  p.elem_size = (int)sizeof(T);
  p.vec = vec;
  ok(anvil::launch_write_kv(p, 0), name);
  BENCH_CUDA(cudaDeviceSynchronize());
  for (int t = 0; t < tokens; ++t) {
    if (hb[t] < 0 || hb[t] >= b || hps[t] < 0 || hps[t] >= s_max) continue;
    for (int h = 0; h < hkv; ++h)
      for (int e = 0; e < d; ++e) {
        const size_t c = (size_t)hb[t] * p.c_b + h * p.c_h + hps[t] * p.c_s + e, s = ((size_t)t * hkv + h) * d + e;
        want_k[c] = hk[s];
        want_v[c] = hv[s];
      }
  }
  compare(name + " k_cache", to_host(kc.as<T>(), cm), want_k, {0.f, 0.f});
  compare(name + " v_cache", to_host(vc.as<T>(), cm), want_v, {0.f, 0.f});
}

// softmax(q . k * scale) . v over the kept keys [lo, hi) of one query, in double
void attend_row(const float* q, const float* k, const float* v, int64_t kstride, int lo, int hi, int d, double scale,
                float* out) {
  std::vector<double> s(hi > lo ? hi - lo : 0), acc(d, 0.0);
  double mx = -INFINITY, sum = 0.0;
  for (int j = lo; j < hi; ++j) {
    double dot = 0.0;
    for (int e = 0; e < d; ++e) dot += (double)q[e] * k[j * kstride + e];
    s[j - lo] = dot * scale;
    mx = std::max(mx, s[j - lo]);
  }
  for (int j = lo; j < hi; ++j) {
    const double pj = std::exp(s[j - lo] - mx);
    sum += pj;
    for (int e = 0; e < d; ++e) acc[e] += pj * v[j * kstride + e];
  }
  for (int e = 0; e < d; ++e) out[e] = sum > 0 ? (float)(acc[e] / sum) : 0.f;
}

template <typename T>
void check_prefill(int d, int heads, int kv_heads, bool causal, int window) {
  const std::vector<int> cu = {0, 97, 98, 398};  // lengths 97, 1, 300
  const int tokens = cu.back(), batch = (int)cu.size() - 1;
  const std::string name = std::string("prefill ") + dtype_name<T>() + " d" + std::to_string(d) + " " +
                           std::to_string(heads) + "/" + std::to_string(kv_heads) + (causal ? " causal" : "") +
                           (window ? " window=" + std::to_string(window) : "") + " lens 97,1,300";
  const size_t qm = (size_t)tokens * heads * d, km = (size_t)tokens * kv_heads * d;
  DevBuf q(qm * sizeof(T)), k(km * sizeof(T)), v(km * sizeof(T)), o(qm * sizeof(T)), dcu(cu.size() * sizeof(int));
  fill_random(q.as<T>(), qm, 51, 0);
  fill_random(k.as<T>(), km, 52, 0);
  fill_random(v.as<T>(), km, 53, 0);
  upload(dcu.as<int>(), cu);
  BENCH_CUDA(cudaMemset(o.p, 0xff, o.bytes));
  const double scale = 1.0 / std::sqrt((double)d);
  anvil::PrefillParams p{};
  p.q = q.p; p.k = k.p; p.v = v.p; p.o = o.p;
  p.q_tok = p.o_tok = (int64_t)heads * d; p.q_head = p.o_head = d;
  p.k_tok = p.v_tok = (int64_t)kv_heads * d; p.k_head = p.v_head = d;
  p.cu_seqlens = dcu.as<int>();
  p.batch = batch; p.heads = heads; p.kv_heads = kv_heads; p.total_tokens = tokens;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.causal = causal;
  p.window = window;
  ok(anvil::launch_prefill_attention(p, d, DTypeOf<T>::v, 0), name);
  BENCH_CUDA(cudaDeviceSynchronize());
  const auto hq = to_host(q.as<T>(), qm), hk = to_host(k.as<T>(), km), hv = to_host(v.as<T>(), km);
  std::vector<float> want(qm);
  for (int s = 0; s < batch; ++s)
    for (int i = 0; i < cu[s + 1] - cu[s]; ++i)
      for (int h = 0; h < heads; ++h) {
        const int kvh = h / (heads / kv_heads), len = cu[s + 1] - cu[s];
        const int hi = causal ? i + 1 : len, lo = window > 0 ? std::max(0, i - window + 1) : 0;
        const size_t qi = ((size_t)(cu[s] + i) * heads + h) * d, k0 = ((size_t)cu[s] * kv_heads + kvh) * d;
        attend_row(&hq[qi], &hk[k0], &hv[k0], (int64_t)kv_heads * d, lo, hi, d, scale, &want[qi]);
        for (int e = 0; e < d; ++e) want[qi + e] = round_to<T>(want[qi + e]);
      }
  compare(name, to_host(o.as<T>(), qm), want, attn_tol<T>());
}

template <typename T>
void check_decode(int d, int heads, int kv_heads, int window, int num_sms) {
  const int b = 3, s_max = 700;
  const std::vector<int> lens = {700, 1, 333};
  const std::string name = std::string("decode ") + dtype_name<T>() + " d" + std::to_string(d) + " " +
                           std::to_string(heads) + "/" + std::to_string(kv_heads) +
                           (window ? " window=" + std::to_string(window) : "") + " lens 700,1,333";
  const size_t qm = (size_t)b * heads * d, cm = (size_t)b * kv_heads * s_max * d;
  int ns = 1, chunk = 64;
  anvil::decode_split_plan(b, kv_heads, s_max, num_sms, &ns, &chunk);
  DevBuf q(qm * sizeof(T)), kc(cm * sizeof(T)), vc(cm * sizeof(T)), o(qm * sizeof(T)), sl(b * sizeof(int));
  DevBuf op((size_t)b * heads * ns * d * sizeof(float)), lp((size_t)b * heads * ns * sizeof(float));
  fill_random(q.as<T>(), qm, 61, 0);
  fill_random(kc.as<T>(), cm, 62, 0);
  fill_random(vc.as<T>(), cm, 63, 0);
  upload(sl.as<int>(), lens);
  BENCH_CUDA(cudaMemset(o.p, 0xff, o.bytes));
  const double scale = 1.0 / std::sqrt((double)d);
  anvil::DecodeParams p{};
  p.q = q.p; p.k = kc.p; p.v = vc.p; p.o = o.p;
  p.o_part = op.as<float>(); p.lse_part = lp.as<float>();
  p.q_b = p.o_b = (int64_t)heads * d; p.q_h = p.o_h = d;
  p.k_b = p.v_b = (int64_t)kv_heads * s_max * d; p.k_h = p.v_h = (int64_t)s_max * d; p.k_s = p.v_s = d;
  p.seq_lens = sl.as<int>();
  p.batch = b; p.heads = heads; p.kv_heads = kv_heads; p.s_max = s_max; p.num_splits = ns; p.chunk = chunk;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.window = window;
  ok(anvil::launch_decode_attention(p, d, DTypeOf<T>::v, 0), name);
  BENCH_CUDA(cudaDeviceSynchronize());
  const auto hq = to_host(q.as<T>(), qm), hk = to_host(kc.as<T>(), cm), hv = to_host(vc.as<T>(), cm);
  std::vector<float> want(qm);
  for (int i = 0; i < b; ++i)
    for (int h = 0; h < heads; ++h) {
      const int kvh = h / (heads / kv_heads), lo = window > 0 ? std::max(0, lens[i] - window) : 0;
      const size_t qi = ((size_t)i * heads + h) * d, k0 = ((size_t)i * kv_heads + kvh) * s_max * d;
      attend_row(&hq[qi], &hk[k0], &hv[k0], d, lo, lens[i], d, scale, &want[qi]);
      for (int e = 0; e < d; ++e) want[qi + e] = round_to<T>(want[qi + e]);
    }
  compare(name + " (" + std::to_string(ns) + " splits)", to_host(o.as<T>(), qm), want, attn_tol<T>());
}

template <typename T>
void check_elementwise_dtype() {
  for (bool res : {false, true}) {
    check_rms_norm<T>(7, 4096, res);   // 16-byte path, one vector per thread
    check_rms_norm<T>(3, 16384, res);  // several vectors per thread
    check_rms_norm<T>(5, 999, res);    // generic two-pass path
  }
  check_silu<T>(5, 1024);
  check_silu<T>(3, 13);
  check_rope<T>(9, 4, 2, 128, sizeof(T) == 2);
  check_rope<T>(9, 4, 2, 64, false);
}

}  // namespace

int run_checks(int device) {
  int sms = 0;
  BENCH_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  check_elementwise_dtype<float>();
  check_elementwise_dtype<__half>();
  check_elementwise_dtype<__nv_bfloat16>();
  check_write_kv<__nv_bfloat16, int32_t>(true);
  check_write_kv<__nv_bfloat16, int64_t>(true);
  check_write_kv<__nv_bfloat16, int64_t>(false);
  check_write_kv<float, int32_t>(false);
  for (int d : {64, 128}) {
    check_prefill<__nv_bfloat16>(d, 4, 2, true, 0);
    check_prefill<__nv_bfloat16>(d, 4, 2, true, 50);
    check_prefill<__nv_bfloat16>(d, 4, 4, false, 0);
    check_prefill<__half>(d, 4, 1, true, 0);
    check_decode<__nv_bfloat16>(d, 8, 2, 0, sms);
    check_decode<__nv_bfloat16>(d, 32, 4, 100, sms);
    check_decode<__half>(d, 4, 4, 0, sms);
  }
  std::printf("check: %d/%d cases passed\n", g_cases - g_failed, g_cases);
  return g_failed;
}

}  // namespace bench
