#!/usr/bin/env bash
# Usage: bash scripts/serve_gpu.sh [OUT_DIR]    on the lent GPU, from the repo root (OUT_DIR: $OUT, else
# results/gpu/serving-h200). Starts `bench serve synthetic:llama-3-8b --dtype bfloat16 --device cuda` on
# 127.0.0.1:8000, runs suites/serving-gpu.toml against it (prompt 512 / output 256 token ids; concurrency 1, 8, 32,
# 64; Poisson 8 and 32 req/s with lengths +-50%), saves the run, /metrics and the server log, stops the server.
# The GPU image has no fastapi / uvicorn / pydantic / httpx and no pip index: download the wheels here first
# (.whl/ is git-ignored) and carry them:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform any -d .whl/serve fastapi starlette uvicorn pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions h11 anyio sniffio idna httpx httpcore certifi opentelemetry-api \
#     httptools uvloop   (C event loop and HTTP parser: bench serve uses them where installed)
# device tool: run(command="bash scripts/serve_gpu.sh $OUT", carry=[".whl/serve"], kind="nvidia-h200")
# SERVE_OPTIONS="k=v ..." adds `--option k=v` per pair to the server (EngineConfig fields); SUITE picks another suite.
set -euo pipefail
OUT_DIR=${1:-${OUT:-results/gpu/serving-h200}}
mkdir -p "$OUT_DIR"
SITE=/tmp/anvil-serve-site
export PYTHONPATH="$SITE:${PYTHONPATH:-}"  # a second run on the same machine finds the first one's install
if ! python3 -c "import fastapi.applications, uvicorn, pydantic, httpx, opentelemetry" 2>/dev/null; then
  # shellcheck disable=SC2046
  python3 -m pip install -q --no-index --no-deps --target "$SITE" $(ls .whl/serve/*.whl | grep -v '/click-')
fi
export PYTHONPATH=".:${PYTHONPATH:-}" TORCH_EXTENSIONS_DIR=/tmp/anvil-ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/gpu.csv" 2>&1 || true
git rev-parse --short HEAD > "$OUT_DIR/commit.txt" 2>/dev/null || true

t0=$(date +%s)
python3 -m harness serve synthetic:llama-3-8b --dtype bfloat16 --device cuda --port 8000 --max-queue 4096 \
  --option max_model_len=4096 $(for kv in ${SERVE_OPTIONS:-}; do printf -- '--option %s ' "$kv"; done) \
  > "$OUT_DIR/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
python3 scripts/wait_http.py http://127.0.0.1:8000/health "$PID" 600 || exit 1
echo "server ready after $(( $(date +%s) - t0 )) s" | tee "$OUT_DIR/startup.txt"

python3 -m harness run "${SUITE:-suites/serving-gpu.toml}" --out "$OUT_DIR/run" || echo "bench run exit $?"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())" \
  > "$OUT_DIR/metrics.txt"
kill -TERM $PID; wait $PID || true
trap - EXIT
tail -5 "$OUT_DIR/server.log"
echo "total $(( $(date +%s) - t0 )) s"
