// anvil_bench: times the anvil CUDA kernels without Python or torch, on the shapes of benchmarks/bench_kernels.py
// (bf16). Inputs from cudaMalloc + a deterministic init kernel; CUDA events, warm-up, median of N samples (each
// sample = `inner` back-to-back calls lasting >= ~1 ms, as bench_kernels.py does). Prints a table, --json writes
// the environment and every sample. --check compares each kernel with a CPU reference (exit 1 on a mismatch).
// Exit codes: 0 ok, 1 check mismatch, 2 no CUDA device / bad arguments, 3 CUDA error in the harness.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "bench_util.cuh"

#ifndef ANVIL_CONFIGURE_COMMIT
#define ANVIL_CONFIGURE_COMMIT "unknown"
#endif
#define ANVIL_STR2(...) #__VA_ARGS__
#define ANVIL_STR(...) ANVIL_STR2(__VA_ARGS__)
#ifndef ANVIL_CUDA_ARCHS  // set by CMake; a plain nvcc build reports nvcc's own list (90a shows as 900)
#ifdef __CUDA_ARCH_LIST__
#define ANVIL_CUDA_ARCHS "nvcc " ANVIL_STR(__CUDA_ARCH_LIST__)
#else
#define ANVIL_CUDA_ARCHS "unknown"
#endif
#endif

namespace bench {
namespace {

using BF16 = __nv_bfloat16;
constexpr anvil::DType kBF16 = anvil::DType::BF16;
constexpr double kLog2e = 1.4426950408889634;

struct Opts {
  std::string json, only = "prefill,decode,elementwise,copy", variants;
  int warmup = 5, reps = 0, device = 0;  // reps 0: per-kernel default (prefill 20, decode 50, elementwise 30)
  bool check = false;
};

struct Row {
  std::string kernel, metric;  // metric: "tflops" or "gbps"
  double median_ms = 0, value = 0;
  int inner = 1;
  std::vector<double> samples;
};

void usage(FILE* f) {
  std::fprintf(f,
               "usage: anvil_bench [--json PATH] [--only prefill,decode,elementwise,copy] [--reps N] [--warmup N]\n"
               "                   [--variants 0,1,5] [--device N] [--check] [--help]\n"
               "  times the anvil CUDA kernels (bf16, shapes of benchmarks/bench_kernels.py) with CUDA events\n"
               "  --json PATH   also write GPU name, driver/runtime versions and every sample as JSON\n"
               "  --variants    prefill tile variants (ANVIL_PREFILL_VARIANT) to sweep at seq 4096\n"
               "  --check       compare every kernel against a CPU reference on small sizes; exit 1 on mismatch\n"
               "  knobs read by the kernels: ANVIL_PREFILL_VARIANT, ANVIL_DECODE_PREFETCH, ANVIL_DECODE_WAVES\n"
               "  exit: 0 ok, 1 check mismatch, 2 no CUDA device or bad arguments, 3 CUDA error\n");
}

bool parse(int argc, char** argv, Opts& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](std::string& dst) {
      if (i + 1 >= argc) return false;
      dst = argv[++i];
      return true;
    };
    std::string v;
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (a == "--check") {
      o.check = true;
    } else if (a == "--json" || a == "--only" || a == "--variants") {
      if (!val(a == "--json" ? o.json : a == "--only" ? o.only : o.variants)) return false;
    } else if (a == "--reps" || a == "--warmup" || a == "--device") {
      if (!val(v)) return false;
      (a == "--reps" ? o.reps : a == "--warmup" ? o.warmup : o.device) = std::atoi(v.c_str());
    } else {
      std::fprintf(stderr, "anvil_bench: unknown argument %s\n", a.c_str());
      return false;
    }
  }
  return true;
}

bool wants(const Opts& o, const char* part) {
  return ("," + o.only + ",").find("," + std::string(part) + ",") != std::string::npos;
}

// Median over `reps` samples; `inner` is chosen from one timed call so a sample lasts >= ~1 ms (at most 50 calls).
Row time_it(const std::string& name, const std::function<cudaError_t()>& fn, int warmup, int reps, cudaStream_t st) {
  for (int i = 0; i < warmup; ++i) BENCH_CUDA(fn());
  BENCH_CUDA(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  float ms = 0;
  BENCH_CUDA(cudaEventRecord(a, st));
  BENCH_CUDA(fn());
  BENCH_CUDA(cudaEventRecord(b, st));
  BENCH_CUDA(cudaEventSynchronize(b));
  BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
  Row r;
  r.kernel = name;
  r.inner = std::max(1, std::min(50, (int)(1.0 / std::max((double)ms, 1e-3))));
  for (int s = 0; s < reps; ++s) {
    BENCH_CUDA(cudaEventRecord(a, st));
    for (int i = 0; i < r.inner; ++i) BENCH_CUDA(fn());
    BENCH_CUDA(cudaEventRecord(b, st));
    BENCH_CUDA(cudaEventSynchronize(b));
    BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    r.samples.push_back((double)ms / r.inner);
  }
  std::vector<double> sorted = r.samples;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  r.median_ms = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  BENCH_CUDA(cudaEventDestroy(a));
  BENCH_CUDA(cudaEventDestroy(b));
  return r;
}

Row with_gbps(Row r, double bytes) {
  r.metric = "gbps";
  r.value = bytes / r.median_ms / 1e6;
  return r;
}

void run_prefill(const Opts& o, std::vector<Row>& rows, cudaStream_t st) {
  const int h = 32, hkv = 8, d = 128;
  for (int s : {1024, 4096, 16384}) {
    const size_t qm = (size_t)s * h * d, km = (size_t)s * hkv * d;
    DevBuf q(qm * 2), k(km * 2), v(km * 2), out(qm * 2), cu(2 * sizeof(int));
    fill_random(q.as<BF16>(), qm, 1, st);
    fill_random(k.as<BF16>(), km, 2, st);
    fill_random(v.as<BF16>(), km, 3, st);
    upload(cu.as<int>(), std::vector<int>{0, s});
    anvil::PrefillParams p{};
    p.q = q.p; p.k = k.p; p.v = v.p; p.o = out.p;
    p.q_tok = p.o_tok = (int64_t)h * d; p.q_head = p.o_head = d;
    p.k_tok = p.v_tok = (int64_t)hkv * d; p.k_head = p.v_head = d;
    p.cu_seqlens = cu.as<int>();
    p.batch = 1; p.heads = h; p.kv_heads = hkv; p.total_tokens = s;
    p.scale_log2 = (float)(1.0 / std::sqrt((double)d) * kLog2e);
    p.causal = true;
    const double flops = 4.0 * s * s * d * h / 2;  // causal: half of the score matrix
    std::vector<std::string> variants = {""};
    if (s == 4096 && !o.variants.empty()) {
      std::stringstream ss(o.variants);
      for (std::string t; std::getline(ss, t, ',');) variants.push_back(t);
    }
    for (const auto& var : variants) {
      if (!var.empty()) setenv("ANVIL_PREFILL_VARIANT", var.c_str(), 1);
      Row r = time_it("prefill seq=" + std::to_string(s) + (var.empty() ? "" : " v" + var),
                      [&] { return anvil::launch_prefill_attention(p, d, kBF16, st); }, o.warmup, o.reps ? o.reps : 20,
                      st);
      if (!var.empty()) unsetenv("ANVIL_PREFILL_VARIANT");
      r.metric = "tflops";
      r.value = flops / r.median_ms / 1e9;
      rows.push_back(r);
    }
  }
}

void run_decode(const Opts& o, std::vector<Row>& rows, cudaStream_t st, int sms) {
  const int b = 8, h = 32, hkv = 8, d = 128;
  for (int ctx : {4096, 8192, 16384, 32768}) {
    const size_t qm = (size_t)b * h * d, cm = (size_t)b * hkv * ctx * d;
    int ns = 1, chunk = 64;
    anvil::decode_split_plan(b, hkv, ctx, sms, &ns, &chunk);
    DevBuf q(qm * 2), kc(cm * 2), vc(cm * 2), out(qm * 2), sl(b * sizeof(int));
    DevBuf op((size_t)b * h * ns * d * sizeof(float)), lp((size_t)b * h * ns * sizeof(float));
    fill_random(q.as<BF16>(), qm, 4, st);
    fill_random(kc.as<BF16>(), cm, 5, st);
    fill_random(vc.as<BF16>(), cm, 6, st);
    upload(sl.as<int>(), std::vector<int>(b, ctx));
    anvil::DecodeParams p{};
    p.q = q.p; p.k = kc.p; p.v = vc.p; p.o = out.p;
    p.o_part = op.as<float>(); p.lse_part = lp.as<float>();
    p.q_b = p.o_b = (int64_t)h * d; p.q_h = p.o_h = d;
    p.k_b = p.v_b = (int64_t)hkv * ctx * d; p.k_h = p.v_h = (int64_t)ctx * d; p.k_s = p.v_s = d;
    p.seq_lens = sl.as<int>();
    p.batch = b; p.heads = h; p.kv_heads = hkv; p.s_max = ctx; p.num_splits = ns; p.chunk = chunk;
    p.scale_log2 = (float)(1.0 / std::sqrt((double)d) * kLog2e);
    Row r = time_it("decode ctx=" + std::to_string(ctx) + " b=" + std::to_string(b),
                    [&] { return anvil::launch_decode_attention(p, d, kBF16, st); }, o.warmup, o.reps ? o.reps : 50, st);
    rows.push_back(with_gbps(r, 2.0 * cm * 2));  // K and V once
  }
}

void run_elementwise(const Opts& o, std::vector<Row>& rows, cudaStream_t st) {
  const int t = 16384, n = 4096, f = 14336, h = 32, hkv = 8, d = 128;
  const int reps = o.reps ? o.reps : 30;
  const size_t xm = (size_t)t * n, es = 2;
  {
    DevBuf x(xm * es), r(xm * es), w(n * es), out(xm * es), rout(xm * es);
    fill_random(x.as<BF16>(), xm, 7, st);
    fill_random(r.as<BF16>(), xm, 8, st);
    fill_random(w.as<BF16>(), n, 9, st);
    rows.push_back(with_gbps(
        time_it("rms_norm [16384x4096]",
                [&] { return anvil::launch_rms_norm(x.p, nullptr, w.p, out.p, nullptr, t, n, 1e-5f, kBF16, st); },
                o.warmup, reps, st),
        2.0 * xm * es));
    rows.push_back(with_gbps(
        time_it("fused_add_rms_norm [16384x4096]",
                [&] { return anvil::launch_rms_norm(x.p, r.p, w.p, out.p, rout.p, t, n, 1e-5f, kBF16, st); },
                o.warmup, reps, st),
        4.0 * xm * es));
  }
  {
    const size_t gm = (size_t)(t / 2) * 2 * f;
    DevBuf gu(gm * es), out(gm / 2 * es);
    fill_random(gu.as<BF16>(), gm, 10, st);
    rows.push_back(with_gbps(time_it("silu_and_mul [8192x2x14336]",
                                     [&] { return anvil::launch_silu_and_mul(gu.p, out.p, t / 2, f, kBF16, st); },
                                     o.warmup, reps, st),
                             gm * es * 3.0 / 2));
  }
  {
    const int max_pos = 8192;
    const size_t qm = (size_t)t * h * d, km = (size_t)t * hkv * d;
    DevBuf q(qm * es), k(km * es), pos(t * sizeof(int64_t)), cs((size_t)max_pos * d * sizeof(float));
    fill_random(q.as<BF16>(), qm, 11, st);
    fill_random(k.as<BF16>(), km, 12, st);
    std::vector<int64_t> hp(t);
    for (int i = 0; i < t; ++i) hp[i] = (int64_t)(mix64(1000 + i) % max_pos);
    std::vector<float> hcs((size_t)max_pos * d);
    for (int p = 0; p < max_pos; ++p)
      for (int i = 0; i < d / 2; ++i) {
        const double fr = p * std::pow(500000.0, -2.0 * i / d);
        hcs[(size_t)p * d + i] = (float)std::cos(fr);
        hcs[(size_t)p * d + d / 2 + i] = (float)std::sin(fr);
      }
    upload(pos.as<int64_t>(), hp);
    upload(cs.as<float>(), hcs);
    anvil::RopeParams p{};
    p.q = q.p; p.k = k.p;
    p.q_tok = (int64_t)h * d; p.q_head = d; p.k_tok = (int64_t)hkv * d; p.k_head = d;
    p.positions = pos.as<int64_t>(); p.cos_sin = cs.as<float>();
    p.tokens = t; p.heads = h; p.kv_heads = hkv; p.head_dim = d; p.vec = true;
    rows.push_back(with_gbps(time_it("rope q+k [16384x(32+8)x128]", [&] { return anvil::launch_rope(p, kBF16, st); },
                                     o.warmup, reps, st),
                             2.0 * (qm + km) * es));
  }
  {
    const int bsz = 16, s_max = 4096;
    const size_t cm = (size_t)bsz * hkv * s_max * d, km = (size_t)t * hkv * d;
    DevBuf kc(cm * es), vc(cm * es), kv(km * es), bi(t * sizeof(int64_t)), ps(t * sizeof(int64_t));
    BENCH_CUDA(cudaMemsetAsync(kc.p, 0, kc.bytes, st));
    BENCH_CUDA(cudaMemsetAsync(vc.p, 0, vc.bytes, st));
    fill_random(kv.as<BF16>(), km, 13, st);
    std::vector<int64_t> hb(t), hps(t);
    for (int i = 0; i < t; ++i) {
      hb[i] = i / (t / bsz);
      hps[i] = i % (t / bsz);
    }
    upload(bi.as<int64_t>(), hb);
    upload(ps.as<int64_t>(), hps);
    anvil::WriteKVParams p{};
    p.k_cache = kc.p; p.v_cache = vc.p; p.k = kv.p; p.v = kv.p;
    p.c_b = (int64_t)hkv * s_max * d; p.c_h = (int64_t)s_max * d; p.c_s = d;
    p.k_tok = p.v_tok = (int64_t)hkv * d; p.k_head = p.v_head = d;
    p.batch_idx = bi.p; p.positions = ps.p; p.idx64 = true;
    p.tokens = t; p.kv_heads = hkv; p.head_dim = d; p.batch = bsz; p.s_max = s_max;
    p.elem_size = 2; p.vec = true;
    rows.push_back(with_gbps(time_it("write_kv [16384x8x128] x2", [&] { return anvil::launch_write_kv(p, st); },
                                     o.warmup, reps, st),
                             2.0 * 2 * km * es));
  }
}

// device-to-device cudaMemcpy of 512 MiB: the copy ceiling the GB/s numbers above are read against
void run_copy(const Opts& o, std::vector<Row>& rows, cudaStream_t st) {
  const size_t bytes = (size_t)512 << 20;
  DevBuf a(bytes), b(bytes);
  BENCH_CUDA(cudaMemsetAsync(a.p, 1, bytes, st));
  rows.push_back(with_gbps(time_it("memcpy d2d [512 MiB]",
                                   [&] { return cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, st); },
                                   o.warmup, o.reps ? o.reps : 30, st),
                           2.0 * bytes));
}

std::string esc(const std::string& s) {
  std::string r;
  for (char c : s) {
    if (c == '"' || c == '\\') r += '\\';
    if ((unsigned char)c >= 0x20) r += c;
  }
  return r;
}

std::string ver(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// the kernel module's version string ("580.159.04"), from /proc; "unknown" elsewhere
std::string nvidia_driver() {
  std::ifstream f("/proc/driver/nvidia/version");
  std::string line;
  if (!std::getline(f, line)) return "unknown";
  std::istringstream ss(line);
  for (std::string w; ss >> w;)
    if (w.size() > 2 && std::isdigit((unsigned char)w[0]) && w.find('.') != std::string::npos) return w;
  return "unknown";
}

std::string environment_json(int dev, const cudaDeviceProp& prop) {
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  char when[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  const char* commit = std::getenv("ANVIL_COMMIT");
  std::ostringstream j;
  j << "{\"gpu\": \"" << esc(prop.name) << "\", \"device\": " << dev << ", \"sm_count\": " << prop.multiProcessorCount
    << ", \"capability\": \"" << prop.major << "." << prop.minor << "\", \"l2_bytes\": " << prop.l2CacheSize
    << ", \"memory_bytes\": " << prop.totalGlobalMem << ", \"driver\": \"" << esc(nvidia_driver())
    << "\", \"driver_cuda\": \"" << ver(drv) << "\", \"runtime_cuda\": \"" << ver(rt) << "\", \"nvcc\": \""
    << __CUDACC_VER_MAJOR__ << "." << __CUDACC_VER_MINOR__ << "\", \"archs\": \"" << ANVIL_CUDA_ARCHS
    << "\", \"commit\": \"" << esc(commit && *commit ? commit : ANVIL_CONFIGURE_COMMIT) << "\", \"time_utc\": \""
    << when << "\", \"tool\": \"anvil_bench (engine/kernels/bench, no torch)\"}";
  return j.str();
}

void write_json(const std::string& path, const std::string& env, const std::vector<Row>& rows) {
  std::ofstream f(path);
  f << "{\"format\": 1,\n \"environment\": " << env << ",\n \"results\": [";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    f << (i ? ",\n  " : "\n  ") << "{\"kernel\": \"" << esc(r.kernel) << "\", \"impl\": \"anvil\", \"median_ms\": "
      << r.median_ms << ", \"inner\": " << r.inner << ", \"" << r.metric << "\": " << r.value << ", \"samples_ms\": [";
    for (size_t s = 0; s < r.samples.size(); ++s) f << (s ? ", " : "") << r.samples[s];
    f << "]}";
  }
  f << "\n ]}\n";
  if (!f) {
    std::fprintf(stderr, "anvil_bench: could not write %s\n", path.c_str());
    std::exit(3);
  }
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
  using namespace bench;
  Opts o;
  if (!parse(argc, argv, o)) {
    usage(stderr);
    return 2;
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    std::fprintf(stderr, "anvil_bench: no CUDA device (cudaGetDeviceCount: %s%s%s); nothing to run\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "0 devices",
                 err == cudaErrorInsufficientDriver ? " - no NVIDIA driver loaded, or one older than CUDA runtime "
                                                    : "",
                 err == cudaErrorInsufficientDriver ? ver(rt).c_str() : "");
    return 2;
  }
  if (o.device < 0 || o.device >= count) {
    std::fprintf(stderr, "anvil_bench: --device %d out of range (%d devices)\n", o.device, count);
    return 2;
  }
  BENCH_CUDA(cudaSetDevice(o.device));
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, o.device));
  const std::string env = environment_json(o.device, prop);
  std::printf("%s\n", env.c_str());
  if (o.check) {
    const int failed = run_checks(o.device);
    return failed ? 1 : 0;
  }
  cudaStream_t st;
  BENCH_CUDA(cudaStreamCreate(&st));  // blocking: ordered with the synchronous cudaMemcpy uploads
  std::vector<Row> rows;
  if (wants(o, "prefill")) run_prefill(o, rows, st);
  if (wants(o, "decode")) run_decode(o, rows, st, prop.multiProcessorCount);
  if (wants(o, "elementwise")) run_elementwise(o, rows, st);
  if (wants(o, "copy")) run_copy(o, rows, st);
  BENCH_CUDA(cudaStreamDestroy(st));
  std::printf("\n%-36s %10s %6s %9s %8s\n", "kernel (bf16)", "median ms", "inner", "TFLOP/s", "GB/s");
  for (const Row& r : rows) {
    char tf[32] = "", gb[32] = "";
    if (r.metric == "tflops") std::snprintf(tf, sizeof tf, "%.1f", r.value);
    if (r.metric == "gbps") std::snprintf(gb, sizeof gb, "%.0f", r.value);
    std::printf("%-36s %10.4f %6d %9s %8s\n", r.kernel.c_str(), r.median_ms, r.inner, tf, gb);
  }
  if (!o.json.empty()) {
    write_json(o.json, env, rows);
    std::printf("wrote %s\n", o.json.c_str());
  }
  return 0;
}
