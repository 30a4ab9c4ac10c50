#!/usr/bin/env bash
# usage: bash scripts/peers_gpu.sh decode|serve|serve-vllm|decode-sglang|serve-sglang OUT_DIR      on the lent GPU, after the vLLM kit is installed
# (../shared/tools/vllm-kit: carry .vk/part* to /tmp/vk, then `eval "$(sh /tmp/vk/reassemble.sh)"`).
#   decode: suites/gpu-decode-peers.toml (anvil, vLLM, HF in one run)
#   serve-vllm: only the `vllm serve` half of serve
#   serve:  anvil's server under suites/serving-gpu.toml (scripts/serve_gpu.sh), then `vllm serve` of the same
#           synthetic Llama-3-8B (load_format dummy) on the same port under the same suite, right after it.
set -u
part=$1
out=$2
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton TORCH_EXTENSIONS_DIR=/tmp/anvil-ext
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1 || true
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" > "$out/versions.txt" 2>&1
case "$part" in
decode)
  timeout 560 python3 -m harness run suites/gpu-decode-peers.toml --out /tmp/peers-run 2>&1 | tail -30 > "$out/decode.log"
  cp /tmp/peers-run/records.jsonl /tmp/peers-run/table.md "$out/" 2>/dev/null
  ;;
serve|serve-vllm)  # serve-vllm: vLLM's server only (anvil's ran in an earlier call: gpu_session.sh serve-long)
  [ "$part" = serve ] && timeout 280 bash scripts/serve_gpu.sh "$out/anvil" > "$out/anvil.log" 2>&1
  dir=$(python3 -c "from adapters.vllm import synthetic_model_dir; print(synthetic_model_dir('llama-3-8b', 'bfloat16', '/tmp/vsyn'))")
  t0=$(date +%s)
  python3 -m vllm.entrypoints.openai.api_server --model "$dir" --tokenizer "$dir" --load-format dummy \
    --dtype bfloat16 --host 127.0.0.1 --port 8000 --max-model-len 4096 --seed 0 \
    --served-model-name synthetic:llama-3-8b > "$out/vllm-server.log" 2>&1 &
  pid=$!
  python3 scripts/wait_http.py http://127.0.0.1:8000/health "$pid" 600
  echo "vllm ready after $(( $(date +%s) - t0 )) s" | tee "$out/vllm-startup.txt"
  timeout 300 python3 -m harness run suites/serving-gpu.toml --out "$out/vllm-run" > "$out/vllm.log" 2>&1
  kill -TERM $pid; wait $pid 2>/dev/null
  ;;
decode-sglang|serve-sglang)  # SGLang 0.5.11 (scripts/sglang-kit: carry .sk/part* to /tmp/sk; the first of these parts
  # runs /tmp/sk/reassemble.sh, which installs it into /tmp/ssite; it stays while the machine is warm). decode-sglang: suites/gpu-decode-sglang.toml
  # (anvil and SGLang in one run); serve-sglang: `sglang.launch_server` of the synthetic Llama-3-8B (load_format dummy,
  # its default radix cache on, as vLLM's prefix cache was) under suites/serving-gpu.toml, as serve-vllm does.
  if [ ! -s /tmp/sk/exports.sh ]; then  # the first call after the last part arrived: install, keep the exports
    sh /tmp/sk/reassemble.sh > /tmp/sk/exports.sh.new 2> "$out/sglang-install.log" && mv /tmp/sk/exports.sh.new \
      /tmp/sk/exports.sh || { echo "SGLang kit install failed: $out/sglang-install.log" >&2; exit 2; }
  fi
  . /tmp/sk/exports.sh
  python3 -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)" \
    > "$out/versions.txt" 2>&1
  if [ "$part" = decode-sglang ]; then
    timeout 560 python3 -m harness run suites/gpu-decode-sglang.toml --out /tmp/sglang-run 2>&1 | tail -30 \
      > "$out/decode.log"
    cp /tmp/sglang-run/records.jsonl /tmp/sglang-run/table.md "$out/" 2>/dev/null
  else
    dir=$(python3 -c "from adapters.vllm import synthetic_model_dir; print(synthetic_model_dir('llama-3-8b', 'bfloat16', '/tmp/vsyn'))")
    t0=$(date +%s)
    python3 -m sglang.launch_server --model-path "$dir" --tokenizer-path "$dir" --load-format dummy \
      --dtype bfloat16 --host 127.0.0.1 --port 8000 --context-length 4096 --random-seed 0 \
      --served-model-name llama-3-8b --disable-piecewise-cuda-graph > "$out/sglang-server.log" 2>&1 &
    pid=$!
    python3 scripts/wait_http.py http://127.0.0.1:8000/health "$pid" 150
    echo "sglang ready after $(( $(date +%s) - t0 )) s" | tee "$out/sglang-startup.txt"
    # SGLang refuses a ':' in the served name (LoRA syntax): the suite's requests name "llama-3-8b" instead
    sed 's|^base_url = "http://127.0.0.1:8000"|&\nmodel = "llama-3-8b"|' suites/serving-gpu.toml > /tmp/serving-sglang.toml
    python3 scripts/wait_http.py http://127.0.0.1:8000/health "$pid" 5 || exit 1
    timeout 330 python3 -m harness run /tmp/serving-sglang.toml --out "$out/sglang-run" > "$out/sglang.log" 2>&1
    kill -TERM $pid; wait $pid 2>/dev/null
  fi
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
tail -n 20 "$out"/*.log
