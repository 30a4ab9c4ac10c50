#!/usr/bin/env bash
# usage: bash scripts/gpu_session.sh core|int4|spec|serve OUT_DIR
# The lent-GPU runs behind results/gpu/*-h200/: one part per device call, results under OUT_DIR. Run from a checkout
# (or a `git archive` of a commit, with ANVIL_COMMIT naming it); caches stay under /tmp.
set -u
part=$1
out=$2
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
case "$part" in
core)
  timeout 170 python3 -m pytest -q tests/engine/test_core_gpu.py tests/engine/test_triton_kernels.py 2>&1 \
    | tail -20 > "$out/gpu-tests.log"
  timeout 360 python3 benchmarks/core_bench.py --parts decode,cb,long --long-len 131008 --out "$out/core-bench.json" \
    2>&1 | tail -40 > "$out/core-bench.log"
  ;;
*)
  echo "unknown part $part" >&2
  exit 2
  ;;
esac
tail -n 25 "$out"/*.log
