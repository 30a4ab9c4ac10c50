#!/usr/bin/env bash
# usage: bash scripts/peers_gpu.sh decode|serve|serve-vllm|decode-sglang|serve-sglang OUT_DIR      on the lent GPU
#   decode: suites/gpu-decode-peers.toml (anvil, vLLM, HF in one run)
#   serve-vllm: only the `vllm serve` half of serve
#   serve:  anvil's server under suites/serving-gpu.toml (scripts/serve_gpu.sh), then `vllm serve` of the same
#           synthetic Llama-3-8B (load_format dummy) on the same port under the same suite, right after it.
#   vLLM parts: after the vLLM kit is installed (../shared/tools/vllm-kit: carry .vk/part* to /tmp/vk, then
#   `eval "$(sh /tmp/vk/reassemble.sh)"`).
#   decode-sglang: suites/gpu-decode-sglang.toml (anvil and SGLang 0.5.11 in one run); serve-sglang:
#           `sglang.launch_server` of the same synthetic model (its default radix cache on, as vLLM's prefix cache
#           was) under suites/serving-gpu.toml. The SGLang kit (scripts/sglang-kit): carry .sk/part* to /tmp/sk;
#           the first of these parts runs /tmp/sk/reassemble.sh (it installs into /tmp/ssite, kept while warm).
set -u
part=$1
out=$2
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton TORCH_EXTENSIONS_DIR=/tmp/anvil-ext
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1 || true
versions() {  # versions.txt: the peer's and torch's version
  python3 -c "import $1, torch; print('$1', $1.__version__, 'torch', torch.__version__)" > "$out/versions.txt" 2>&1
}
decode_suite() {  # decode_suite SUITE: bench run it, the table and records into $out
  rm -rf /tmp/peers-run  # bench run refuses a used run folder (an earlier part on this warm machine)
  timeout 560 python3 -m harness run "$1" --out /tmp/peers-run 2>&1 | tail -30 > "$out/decode.log"
  cp /tmp/peers-run/records.jsonl /tmp/peers-run/table.md "$out/" 2>/dev/null
}
serve_suite() {  # serve_suite NAME SUITE WAIT_S CMD...: start the server CMD on 127.0.0.1:8000, run SUITE against it
  local name=$1 suite=$2 wait_s=$3 t0; shift 3
  t0=$(date +%s)
  "$@" > "$out/$name-server.log" 2>&1 &
  local pid=$!
  if ! python3 scripts/wait_http.py http://127.0.0.1:8000/health "$pid" "$wait_s"; then
    kill -TERM $pid 2>/dev/null; echo "$name did not start: $out/$name-server.log" | tee "$out/$name-startup.txt"
    return 1
  fi
  echo "$name ready after $(( $(date +%s) - t0 )) s" | tee "$out/$name-startup.txt"
  timeout 330 python3 -m harness run "$suite" --out "$out/$name-run" > "$out/$name.log" 2>&1
  kill -TERM $pid; wait $pid 2>/dev/null
}
synthetic() {  # the synthetic Llama-3-8B folder (config + word-level tokenizer) the servers load with dummy weights
  python3 -c "from adapters.vllm import synthetic_model_dir as d; print(d('llama-3-8b', 'bfloat16', '/tmp/vsyn'))"
}
case "$part" in
decode)
  versions vllm
  decode_suite suites/gpu-decode-peers.toml
  ;;
serve|serve-vllm)  # serve-vllm: vLLM's server only (anvil's ran in an earlier call: gpu_session.sh serve-long)
  versions vllm
  [ "$part" = serve ] && timeout 280 bash scripts/serve_gpu.sh "$out/anvil" > "$out/anvil.log" 2>&1
  syn=$(synthetic)
  serve_suite vllm suites/serving-gpu.toml 600 python3 -m vllm.entrypoints.openai.api_server --model "$syn" \
    --tokenizer "$syn" --load-format dummy --dtype bfloat16 --host 127.0.0.1 --port 8000 --max-model-len 4096 \
    --seed 0 --served-model-name synthetic:llama-3-8b
  ;;
decode-sglang|serve-sglang)
  if [ ! -s /tmp/sk/exports.sh ]; then  # the first call after the last part arrived: install, keep the exports
    sh /tmp/sk/reassemble.sh > /tmp/sk/exports.sh.new 2> "$out/sglang-install.log" && mv /tmp/sk/exports.sh.new \
      /tmp/sk/exports.sh || { echo "SGLang kit install failed: $out/sglang-install.log" >&2; exit 2; }
  fi
  . /tmp/sk/exports.sh
  versions sglang
  if [ "$part" = decode-sglang ]; then
    decode_suite suites/gpu-decode-sglang.toml
  else
    # SGLang refuses a ':' in the served name (LoRA syntax): the suite's requests name "llama-3-8b" instead; its
    # default piecewise CUDA graphs failed at start-up on the H200 (results/gpu/peers-h200/sglang-0.5.11/)
    syn=$(synthetic)
    sed 's|^base_url = "http://127.0.0.1:8000"|&\nmodel = "llama-3-8b"|' suites/serving-gpu.toml \
      > /tmp/serving-sglang.toml
    serve_suite sglang /tmp/serving-sglang.toml 150 python3 -m sglang.launch_server --model-path "$syn" \
      --tokenizer-path "$syn" --load-format dummy --dtype bfloat16 --host 127.0.0.1 --port 8000 \
      --context-length 4096 --random-seed 0 --served-model-name llama-3-8b --disable-piecewise-cuda-graph
  fi
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
tail -n 20 "$out"/*.log
