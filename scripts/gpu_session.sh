#!/usr/bin/env bash
# usage: bash scripts/gpu_session.sh kernels|core|int4|spec|serve-long|spec-gpu|first-call|serve-fresh|serve-mixed|nf4-bnb|int4-cuda|int4-profile|int4-mma|int4-mma-suite|int4-stages|int4-tc|int4-tc-ncu|decode-ab|int4-tc2|int4-prologue|decode-attn|ttft|skinny OUT_DIR
# The lent-GPU runs behind results/gpu/*-h200/: one part per device call, results under OUT_DIR. Run from a checkout
# (or a `git archive` of a commit, with ANVIL_COMMIT naming it); caches stay under /tmp.
set -u
part=$1
out=$2
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
poisson_suite() {  # /tmp/poisson.toml: the Poisson scenarios of suites/serving-gpu.toml alone
  python3 -c "t=open('suites/serving-gpu.toml').read(); h, *sc = t.split('[[scenarios]]'); \
open('/tmp/poisson.toml', 'w').write('[[scenarios]]'.join([h] + [x for x in sc if 'request_rate' in x]))"
}
int4_suite() {  # the int4 (RTN g128) model of suites/gpu-int4.toml alone through `bench run` (timeout $1 s)
  python3 -c "t=open('suites/gpu-int4.toml').read(); h, *ms = t.split('[[models]]'); sc = ms[-1].split('[[scenarios]]'); \
open('/tmp/int4-rtn.toml', 'w').write('[[models]]'.join([h.replace('gpu-int4', 'gpu-int4-rtn'), ms[0]]) + \
'[[scenarios]]' + sc[1])"
  rm -rf /tmp/int4-run  # a second run on the same machine (another env) starts clean
  timeout "$1" python3 -m harness run /tmp/int4-rtn.toml --out /tmp/int4-run 2>&1 | tail -20 > "$out/int4-suite.log"
  cp /tmp/int4-run/records.jsonl "$out/int4-records.jsonl" 2>/dev/null
  cp /tmp/int4-run/table.md "$out/int4-table.md" 2>/dev/null
}
gemv1_py() {  # /tmp/gemv1.py: four int4_gemv calls at M = 1 on an RTN-quantized [$1, 4,096] weight (for ncu)
  cat > /tmp/gemv1.py <<PY
import torch
from engine.kernels import ext
from engine.quant.int4 import quantize_rtn
p = quantize_rtn(torch.randn($1, 4096, device="cuda") * 0.02, 128).to("cuda", torch.bfloat16)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
for _ in range(4):
    ext.int4_gemv(x, p.qweight, p.scales, p.zeros, 128)
torch.cuda.synchronize()
PY
}
case "$part" in
kernels)  # the kernels' GPU tests, the prefill-attention and int4 sweeps, a profile of continuous batching
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/quant 2>&1 | tail -15 > "$out/int4-gpu-tests.log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_core_gpu.py tests/engine/test_triton_kernels.py \
    2>&1 | tail -15 > "$out/gpu-tests.log"
  timeout 110 python3 benchmarks/profile_core.py --parts cb --cb-requests 64 --out "$out/profile-cb.json" 2>&1 \
    | tail -50 > "$out/profile-cb.log"
  timeout 100 python3 benchmarks/bench_attention.py --sweep --budget 50 --out "$out/attention.json" 2>&1 | tail -40 \
    > "$out/attention.log"
  timeout 120 python3 benchmarks/bench_int4.py --sweep --budget-s 90 --iters 30 --out "$out/int4-sweep.json" \
    --configs-out "$out/int4_configs.json" 2>&1 | tail -40 > "$out/int4-sweep.log"
  ;;
core)
  timeout 170 python3 -m pytest -q tests/engine/test_core_gpu.py tests/engine/test_triton_kernels.py 2>&1 \
    | tail -20 > "$out/gpu-tests.log"
  timeout 360 python3 benchmarks/core_bench.py --parts decode,cb,long --long-len 131008 --out "$out/core-bench.json" \
    2>&1 | tail -40 > "$out/core-bench.log"
  ;;
int4)
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/quant 2>&1 | tail -12 > "$out/int4-gpu-tests.log"
  timeout 45 python3 benchmarks/bench_int4.py --out "$out/int4-kernels.json" --iters 30 2>&1 | tail -40 \
    > "$out/int4-kernels.log"
  # the int4 model of suites/gpu-int4.toml alone (its bf16 baseline is the gpu-decode suite's)
  python3 -c "import re,sys; t=open('suites/gpu-int4.toml').read(); \
print(re.sub(r'\[\[models\]\]\nname = \"synthetic:llama-3-8b\"\ndtype = \"bfloat16\"\ndevice = \"cuda\"\n(quant = \"nf4\"\n)?\n', \
lambda m: m.group(0) if False else '', t, count=0).replace('name = \"gpu-int4\"', 'name = \"gpu-int4-rtn\"'))" \
    > /tmp/int4-rtn.toml
  timeout 150 python3 -m harness run /tmp/int4-rtn.toml --out /tmp/int4-run 2>&1 | tail -20 > "$out/int4-suite.log"
  cp /tmp/int4-run/records.jsonl "$out/int4-records.jsonl" 2>/dev/null
  cp /tmp/int4-run/table.md "$out/int4-table.md" 2>/dev/null
  ;;
spec)
  timeout 150 python3 benchmarks/spec_bench.py --device cuda --out "$out/spec-tiny-h200.json" 2>&1 | tail -30 \
    > "$out/spec-tiny.log"
  timeout 120 python3 benchmarks/spec_bench.py --device cuda --verify-cost --from "$out/spec-tiny-h200.json" \
    --out "$out/spec-verify-8b-h200.json" 2>&1 | tail -30 > "$out/spec-verify.log"
  ;;
serve-long)  # anvil's server under suites/serving-gpu.toml (needs .whl/serve carried), then long_context.toml
  t0=$(date +%s)
  timeout 330 bash scripts/serve_gpu.sh "$out/serving" > "$out/serving.log" 2>&1
  left=$(( 570 - ($(date +%s) - t0) ))
  echo "long_context.toml with ${left} s left" > "$out/long.log"
  timeout "$left" python3 -m harness run suites/long_context.toml --out /tmp/long-run >> "$out/long.log" 2>&1
  cp /tmp/long-run/records.jsonl /tmp/long-run/table.md "$out/" 2>/dev/null
  ;;
spec-gpu)  # the graphed verify / draft-proposer GPU tests, then the 8B verify cost with graphed k+1 forwards
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/spec/test_verify_graphs_gpu.py 2>&1 | tail -15 \
    > "$out/spec-gpu-tests.log"
  timeout 150 python3 benchmarks/spec_bench.py --device cuda --verify-cost --from results/gpu/spec-h200/spec-tiny-h200-08c5c54.json --out "$out/spec-verify-8b-h200.json" \
    2>&1 | tail -30 > "$out/spec-verify.log"
  ;;
first-call)  # is a new prompt length's first SDPA call slow (cuDNN plan build)? then the fresh_attention GPU tests
  timeout 120 python3 benchmarks/bench_attention.py --first-call 301,517,733,1029,1555,2047,4099 \
    --out "$out/first-call.json" 2>&1 | tail -40 > "$out/first-call.log"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_core_gpu.py -k fresh_attention 2>&1 \
    | tail -8 > "$out/fresh-attention-tests.log"
  ;;
serve-fresh)  # the Poisson cells of suites/serving-gpu.toml against anvil's server per fresh-prompt attention path
  # (carry .whl/serve): SDPA's default (cuDNN), SDPA padded to 64-token buckets, flash, the paged Triton kernel
  poisson_suite
  t=230  # the first start builds the CUDA extension (~100 s)
  for v in fresh_attention=sdpa fresh_pad=64 fresh_attention=flash fresh_attention=triton; do
    SERVE_OPTIONS=$v SUITE=/tmp/poisson.toml timeout $t bash scripts/serve_gpu.sh "$out/${v#*=}" \
      > "$out/serve-${v#*=}.log" 2>&1
    grep -h "server ready" "$out/${v#*=}/startup.txt" >> "$out/serve-${v#*=}.log" 2>/dev/null
    cat "$out/${v#*=}/run/table.md" >> "$out/serve-${v#*=}.log" 2>/dev/null
    t=120
  done
  ;;
serve-mixed)  # EngineConfig.graph_mixed_tokens on the GPU: its test, then the Poisson cells against a server with it
  # (64, the default since this run: results/gpu/serving-h200/graph-mixed-d0000db/) and one without (0); carry .whl/serve
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_core_gpu.py -k mixed_steps 2>&1 | tail -8 \
    > "$out/mixed-tests.log"
  poisson_suite
  for v in 64 0; do
    SERVE_OPTIONS=graph_mixed_tokens=$v SUITE=/tmp/poisson.toml timeout 200 bash scripts/serve_gpu.sh "$out/mixed-$v" \
      > "$out/serve-mixed-$v.log" 2>&1
    grep -h "engine_steps" "$out/mixed-$v/metrics.txt" >> "$out/serve-mixed-$v.log" 2>/dev/null
    grep -h "^| serving" "$out/mixed-$v/run/table.md" >> "$out/serve-mixed-$v.log" 2>/dev/null
  done
  ;;
nf4-bnb)  # our NF4 beside bitsandbytes' (scripts/nf4_bnb_eval.py). Its 43 MB wheel travels in two calls: carry
  # .whl/bnb/partaa and copy it to /tmp/bnbparts/, then carry .whl/bnb/partab + .whl/bnb/whl.sha256 and run this part.
  # Make them here: pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64
  #   -d .whl/bnb bitsandbytes==0.50.2; cd .whl/bnb; sha256sum *.whl > whl.sha256; split -b 30M *.whl part; rm *.whl
  w=/tmp/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
  cat /tmp/bnbparts/part* .whl/bnb/part* 2>/dev/null > "$w"
  (cd /tmp && sha256sum -c "$OLDPWD/.whl/bnb/whl.sha256" --ignore-missing) > "$out/bnb-sha.txt" 2>&1
  python3 -m pip install -q --no-index --no-deps --target /tmp/bnb "$w" > "$out/bnb-install.log" 2>&1
  PYTHONPATH="/tmp/bnb:." timeout 300 python3 scripts/nf4_bnb_eval.py --device cuda --dtype bfloat16 --windows 64 \
    --seq 1024 --new-tokens 128 --out "$out/nf4-bnb-h200.json" 2>&1 | tail -8 > "$out/nf4-bnb.log"
  ;;
int4-cuda)  # the CUDA int4 GEMV (engine/kernels/csrc/int4_gemv.cu): its GPU tests, the kernel benchmark beside the
  # Triton kernels and cuBLAS, then the int4 (RTN g128) model of suites/gpu-int4.toml through the engine core
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/quant/test_kernels_int4.py -k "cuda_gemv or \
uses_cuda" 2>&1 | tail -12 > "$out/int4-cuda-tests.log"
  timeout 120 python3 benchmarks/bench_int4.py --out "$out/int4-kernels.json" --iters 50 2>&1 | tail -45 \
    > "$out/int4-kernels.log"
  int4_suite 300
  ;;
int4-mma)  # the tensor-core int4 kernel (engine/kernels/csrc/int4_mma.cu): build, its GPU tests, the kernel benchmark
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/engine/quant/test_kernels_int4_mma.py \
    tests/engine/quant/test_kernels_int4.py -k "mma or uses_cuda" 2>&1 | tail -15 > "$out/int4-mma-tests.log"
  timeout 150 python3 benchmarks/bench_int4.py --ms ${INT4_MS:-1,8,16,32,64} --no-nf4 --iters 50 --out "$out/int4-kernels-mma.json" \
    2>&1 | grep -vE "^\s*$" | tail -80 > "$out/int4-kernels-mma.log"
  ;;
int4-stages)  # the CUDA int4 GEMV's load stages at M = 1, the fused residual and PDL: GPU tests (every R x P),
  # the kernel rows (then int4-mma-suite: the int4 model through the engine)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/quant/test_kernels_int4_fused.py \
    tests/engine/quant/test_kernels_int4.py tests/engine/quant/test_kernels_int4_mma.py -k "cuda_gemv or uses_cuda or mma \
or fused or residual or pdl or dispatch" 2>&1 | tail -12 > "$out/int4-cuda-tests.log"
  timeout 90 python3 benchmarks/bench_int4.py --ms 1 --no-nf4 --iters 50 --out "$out/int4-kernels-stages.json" 2>&1 \
    | grep -E "int4_cuda|int4_mma |bf16" > "$out/int4-kernels-stages.log"
  ;;
int4-tc)  # int4_gemv's tensor-core path (int4_tc_gemv.cu): the kernel rows at M = 1 / 8 (every R x KS x P, the FMA
  # kernel and int4_mma beside it), then its GPU tests and the FMA kernel's (then int4-mma-suite: the model)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  timeout 220 python3 benchmarks/bench_int4.py --ms 1,8 --no-nf4 --iters 50 --out "$out/int4-kernels-tc.json" 2>&1 \
    | grep -E "int4_cuda|int4_tc|int4_mma |bf16" > "$out/int4-kernels-tc.log"
  timeout 280 python3 -m pytest -q -p no:cacheprovider tests/engine/quant/test_kernels_int4_tc.py \
    tests/engine/quant/test_kernels_int4_fused.py tests/engine/quant/test_kernels_int4.py -k "${INT4_TC_TESTS:-tc or \
cuda_gemv or uses_cuda or fused or residual or pdl}" 2>&1 | tail -15 > "$out/int4-tc-tests.log"
  ;;
int4-tc2)  # the x-in-shared-memory tensor-core GEMV (ANVIL_INT4_TC_V=2) against the first one: kernels at M = 1,
  # the int4 model's decode (core_bench --quant rtn) with each, then the tensor-core path's GPU tests with V = 2
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  timeout "${KERNEL_TIMEOUT:-150}" python3 benchmarks/bench_int4.py --ms 1 --no-nf4 --iters 50 --out "$out/int4-kernels-tc2.json" \
    2>&1 | grep -E "int4_cuda|int4_tc|bf16" > "$out/int4-kernels-tc2.log"
  for v in 2 1; do
    ANVIL_INT4_TC_V=$v timeout "${BENCH_TIMEOUT:-130}" python3 benchmarks/core_bench.py --parts decode --quant rtn \
      --out "$out/core-bench-rtn-v$v.json" 2>&1 | tail -8 > "$out/core-bench-rtn-v$v.log"
  done
  ANVIL_INT4_TC_V=2 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider --tb=short \
    tests/engine/quant/test_kernels_int4_tc.py tests/engine/quant/test_kernels_int4_fused.py 2>&1 | tail -15 \
    > "$out/int4-tc2-tests.log"
  ;;
int4-prologue)  # the RMSNorm / SwiGLU prologues in the int4 tensor-core GEMV (ANVIL_INT4_FUSED_NORM=1,
  # ANVIL_INT4_FUSED_ACT=1) and x stored as B fragments (ANVIL_INT4_TC_V=3): their GPU tests, the kernels at M = 1,
  # then the int4 model's decode once per VARIANTS entry (~470 s in all)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --tb=short -rf \
    tests/engine/quant/test_kernels_int4_prologue.py tests/engine/quant/test_kernels_int4_tc.py \
    tests/engine/quant/test_kernels_int4_fused.py 2>&1 | tail -15 > "$out/int4-prologue-tests.log"
  timeout "${KERNEL_TIMEOUT:-100}" python3 benchmarks/bench_int4.py --ms 1 --no-nf4 --iters 50 \
    --out "$out/int4-kernels-tc3.json" 2>&1 | grep -E "int4_cuda |int4_tc2|int4_tc3|bf16" > "$out/int4-kernels-tc3.log"
  i=0
  fp=ANVIL_INT4_FUSED_NORM=1,ANVIL_INT4_FUSED_ACT=1
  for v in ${VARIANTS:-- $fp ANVIL_INT4_TC_V=3 $fp,ANVIL_INT4_TC_V=3}; do
    i=$((i + 1)); tag=$(echo "$v" | tr ',=' '-_'); [ "$v" = "-" ] && tag=off
    ( [ "$v" = "-" ] || export ${v//,/ }; timeout "${BENCH_TIMEOUT:-110}" python3 benchmarks/core_bench.py --parts decode \
      --quant rtn --out "$out/core-bench-rtn-$i-$tag.json" 2>&1 | tail -6 > "$out/core-bench-rtn-$i-$tag.log" )
  done
  tail -n 5 "$out"/core-bench-rtn-*.log
  ;;
decode-ab)  # the core's GPU tests, then core_bench decode once per VARIANTS entry (comma-separated env settings, "-"
  # for none; default: off and each switch alone: ~175 s of tests (56 at 3dd5891) + 4 x 31-90 s, one call; then e.g.
  # TESTS=0 VARIANTS="- $all" for the three together), each with the step check of ANVIL_STEP_TUNE
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  [ "${TESTS:-1}" = 0 ] || timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --tb=line -rf \
    tests/engine/test_core_gpu.py ${TEST_EXTRA:-} 2>&1 | tail -15 > "$out/gpu-tests.log"
  i=0
  all=ANVIL_QKV_ROPE=1,ANVIL_DECODE_FUSED_MERGE=1,ANVIL_PREFETCH_WO=1
  for v in ${VARIANTS:-- ANVIL_QKV_ROPE=1 ANVIL_DECODE_FUSED_MERGE=1 ANVIL_PREFETCH_WO=1}; do
    t0=$(date +%s); i=$((i + 1)); tag=$(echo "$v" | tr ',=' '-_'); [ "$v" = "-" ] && tag=off
    ( [ "$v" = "-" ] || export ${v//,/ }; timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/core_bench.py --parts decode \
      --out "$out/core-bench-$i-$tag.json" 2>&1 | tail -12 > "$out/core-bench-$i-$tag.log" )
    echo "$v $(( $(date +%s) - t0 )) s" >> "$out/times.txt"
  done
  python3 - "$out" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/core-bench-*.json")):
    d = json.load(open(f))["decode"]
    print(f.split("/")[-1], {b: round(r["decode_tok_s"], 1) for b, r in d["decode"].items()},
          "ttft", round(d["ttft_2048_ms"]["median"], 2), "step-check",
          [(s["bs"], s["per_role_ms"], s["final_ms"]) for s in d["info"].get("gemv_step", [])],
          d["info"].get("gemv_step_s"))
PY
  ;;
int4-mma-suite)  # the int4 (RTN g128) model of suites/gpu-int4.toml through the engine core (int4_mma for M <= 64)
  int4_suite 400
  ;;
int4-profile)  # the CUDA int4 GEMV at M = 1: rows per warp 2 / 4 / 8 (ANVIL_INT4_GEMV_R), then ncu on w13 (default R)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  for r in 2 4 8; do
    ANVIL_INT4_GEMV_R=$r timeout 60 python3 benchmarks/bench_int4.py --ms 1 --iters 50 --out "$out/int4-r$r.json" \
      2>&1 | grep -E "int4_cuda|int4_gemv " > "$out/int4-r$r.log"
  done
  gemv1_py 28672
  timeout 120 ncu --kernel-name regex:int4_gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis python3 /tmp/gemv1.py > "$out/ncu-w13-m1.txt" 2>&1
  tail -80 "$out/ncu-w13-m1.txt" > "$out/ncu.log"
  ;;
int4-tc-ncu)  # ncu on int4_gemv's tensor-core kernel at M = 1, w13 and wo (the default plan): where its time goes
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  for shape in 28672 4096; do
    gemv1_py $shape
    timeout 150 ncu --kernel-name regex:int4_tc_gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section InstructionStats \
      --section ComputeWorkloadAnalysis python3 /tmp/gemv1.py > "$out/ncu-tc-n$shape-m1.txt" 2>&1
  done
  ;;
decode-attn)  # the split-KV decode kernel's knobs (ANVIL_DECODE_FUSED_MERGE / _MIN_CHUNK / _WARPS / _BLOCK_N): its GPU
  # tests, bench_decode_attention.py over batch x context, then core_bench decode (bf16, then QUANT=rtn's int4) once
  # per VARIANTS entry (comma-separated env settings, "-" for none)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  [ "${TESTS:-1}" = 0 ] || timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider --tb=short -rf \
    tests/engine/test_triton_kernels.py -k paged_attention 2>&1 | tail -8 > "$out/decode-attn-tests.log"
  timeout "${KERNEL_TIMEOUT:-150}" python3 benchmarks/bench_decode_attention.py --out "$out/decode-attn.json" \
    ${ATTN_ARGS:-} 2>&1 | tail -120 > "$out/decode-attn.log"
  i=0
  for q in ${QUANTS:-none rtn}; do
    for v in ${VARIANTS:--}; do
      i=$((i + 1)); tag=$(echo "$v" | tr ',=' '-_'); [ "$v" = "-" ] && tag=off
      ( [ "$v" = "-" ] || export ${v//,/ }; timeout "${BENCH_TIMEOUT:-120}" python3 benchmarks/core_bench.py --parts decode \
        $([ "$q" = none ] || echo --quant $q) --out "$out/core-bench-$q-$i-$tag.json" 2>&1 | tail -4 \
        > "$out/core-bench-$q-$i-$tag.log" )
    done
  done
  python3 - "$out" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/core-bench-*.json")):
    d = json.load(open(f))["decode"]
    print(f.split("/")[-1], {b: round(r["decode_tok_s"], 1) for b, r in d["decode"].items()},
          "ttft", round(d["ttft_2048_ms"]["median"], 2))
PY
  ;;
skinny)  # the TMA skinny GEMM (engine/kernels/triton/skinny_tma.py) as a GEMV-tuner candidate for decode buckets
  # 2..64: its GPU tests (TESTS=0 skips), then core_bench's decode part at BATCHES (default 1,8,32,64) without it
  # (ANVIL_GEMV_TMA=0) and with it (=1), in that order; prints tok/s per batch and, per (role, M), the tuner's best
  # config, cuBLAS and the best TMA config (us)
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  [ "${TESTS:-1}" = 0 ] || timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --tb=short -rfs \
    tests/engine/test_skinny_tma_gpu.py 2>&1 | tail -12 > "$out/skinny-tests.log"
  for tma in 0 1; do
    ANVIL_GEMV_TMA=$tma timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/core_bench.py --parts decode \
      --batches "${BATCHES:-1,8,32,64}" --out "$out/decode-tma$tma.json" 2>&1 | tail -8 > "$out/decode-tma$tma.log"
  done
  # EXTRA_TESTS="tests/engine/test_core_gpu.py -k fresh": more GPU tests in the same call, after the timings
  # shellcheck disable=SC2086
  [ -z "${EXTRA_TESTS:-}" ] || timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --tb=short \
    -rfs $EXTRA_TESTS 2>&1 | tail -12 > "$out/extra-tests.log"
  python3 - "$out" <<'PY'
import json, sys
for tma in (0, 1):
    try:
        d = json.load(open(f"{sys.argv[1]}/decode-tma{tma}.json"))["decode"]
    except (OSError, KeyError) as e:
        print("tma", tma, "no result:", e)
        continue
    print("tma", tma, {b: round(r["decode_tok_s"], 1) for b, r in d["decode"].items()})
    if tma:
        for r in d["info"].get("gemv", []):
            t = {k: v for k, v in r["us"].items() if k.startswith("tma")}
            bt = min(t, key=t.get) if t else None
            print(f"  {r['role']:7s} m={r['m']:2d} best {r['best']:18s} {r['us'][r['best']]:7.2f} us  cublas "
                  f"{r['us'].get('cublas', 0):7.2f}  tma {bt} {t.get(bt, 0):7.2f}  rejected {len(r['rejected'])}")
PY
  ;;
ttft)  # where a fresh prompt's TTFT goes: the TMA fresh kernel's GPU tests (TESTS=0 skips), prefill attention (our
  # paged and TMA fresh kernels vs SDPA's backends at ATTN_LENS; SWEEP=<seconds> adds the config sweeps), the prefill's
  # timeline under the profiler (host lead, GPU busy, idle gaps, tail), then core_bench's ttft part once per OPTIONS
  # entry (';'-separated EngineConfig JSON objects, "{}" for the defaults), in that order
  python3 -m engine.kernels.build > "$out/build.log" 2>&1
  [ "${TESTS:-1}" = 0 ] || timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider --tb=short -rfs \
    tests/engine/test_fresh_prefill_gpu.py 2>&1 | tail -12 > "$out/fresh-tests.log"
  timeout "${KERNEL_TIMEOUT:-90}" python3 benchmarks/bench_attention.py --lens "${ATTN_LENS:-1024,2048,4096}" --extend 0 \
    $([ -n "${SWEEP:-}" ] && echo --sweep --window 0 --budget "$SWEEP") --out "$out/attention.json" 2>&1 | tail -40 \
    > "$out/attention.log"
  timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_core.py --parts prefill --prefill-len "${PREFILL_LEN:-2048}" \
    --out "$out/profile-prefill.json" 2>&1 | tail -40 > "$out/profile-prefill.log"
  i=0
  IFS=';' read -ra opts <<< "${OPTIONS:-{\}}"
  for o in "${opts[@]}"; do
    i=$((i + 1))
    timeout "${BENCH_TIMEOUT:-90}" python3 benchmarks/core_bench.py --parts ttft --options "$o" \
      --ttft-lens "${TTFT_LENS:-1024,2048,4096}" --out "$out/ttft-$i.json" 2>&1 | tail -6 > "$out/ttft-$i.log"
  done
  python3 - "$out" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/ttft-*.json")):
    d = json.load(open(f))["ttft"]
    print(f.split("/")[-1], d["options"], {n: round(r["median"], 2) for n, r in d["ttft_ms"].items()})
PY
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
tail -n 25 "$out"/*.log
