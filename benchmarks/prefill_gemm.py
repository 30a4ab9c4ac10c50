"""Short-prompt prefill on the GPU: where its time goes, and whether skinny-M Triton GEMMs beat cuBLAS there.

A T-token prefill of an 8B model multiplies [T, K] activations by every weight matrix; for small T it is bound by
reading the weights (15 GB, ~5 ms at 3 TB/s) like a decode step, for large T by the tensor cores. This script:
  1. per weight role (qkv, wo, w13, w2, lm_head) and M: cuBLAS and, for M <= 128, each Triton `dot` config,
     timed over all layers' matrices in a CUDA graph (engine/kernels/triton/tune.py), with GB/s and TFLOP/s;
  2. FastGenerator's whole prefill at batch 1 for T in --tokens (CUDA events, median): eager, and as generate()
     runs it (a captured graph per token bucket up to 512, engine/fast_decode.py PREFILL_GRAPH_TOKENS);
  3. torch.profiler top kernels of the T=128 prefill.
Writes one JSON (environment included) and prints a table last.

Usage: PYTHONPATH=. python3 benchmarks/prefill_gemm.py --out results/gpu/prefill-gemm-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_decode import _top_kernels, environment  # noqa: E402


def gemm_table(fg, ms: list[int]) -> list[dict]:
    from engine.kernels.triton.tune import GemvTuner

    rows = []
    tuner = GemvTuner()
    for role, ws, bs, act in fg._roles():
        n, k = ws[0].shape
        for m in ms:
            res = tuner.tune(ws, m, act=act, biases=bs, reps=5)
            us_cublas = res.us.get("cublas")
            flop = 2 * m * n * k
            rows.append({"role": role, "m": m, "n": n, "k": k, "best": res.best, "best_us": res.us[res.best],
                         "cublas_us": us_cublas, "speedup_vs_cublas": round(us_cublas / res.us[res.best], 3),
                         "best_gbs": res.gbs[res.best], "cublas_gbs": res.gbs.get("cublas"),
                         "cublas_tflops": round(flop / (us_cublas * 1e-6) / 1e12, 1) if us_cublas else None,
                         "us": res.us, "rejected": res.rejected})
            print(f"{role:8s} m={m:5d} best {res.best:24s} {res.us[res.best]:8.1f} us  cublas {us_cublas:8.1f} us "
                  f"({res.gbs.get('cublas')} GB/s)", flush=True)
    return rows


def prefill_ms(fg, t: int, reps: int = 7, write: bool = False) -> float:
    """Batch-1 prefill of t tokens, CUDA events around the host call (so host-bound launching counts).
    write=True takes the path generate() takes: K/V into slot 0, through the captured graph where there is one."""
    prompt = [[(7 * i + 3) % fg.config.vocab_size for i in range(t)]]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    if write:
        fg.kv.reserve(0, fg.max_seq_len)
        fg.kv.sync_tables()
    with torch.inference_mode():
        for r in range(reps + 2):
            start.record()
            fg._prefill(prompt, write=write)
            end.record()
            end.synchronize()
            if r >= 2:
                times.append(start.elapsed_time(end))
    if write:
        fg.kv.release_all()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 16, 32, 64, 128, 256, 512, 2048], help="GEMM widths (none: skip)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--out", default="results/gpu/prefill-gemm.json")
    args = ap.parse_args()
    from engine.fast_decode import FastGenerator
    from engine.presets import synthetic

    lm = synthetic(args.preset, "bfloat16", "cuda")
    fg = FastGenerator(lm, 1, max(args.tokens) + 16, buckets=[1], gemv="cublas")
    out: dict = {"environment": environment(), "preset": args.preset, "dtype": "bfloat16",
                 "prefill_graphs": fg.report["prefill_graphs"]}
    out["prefill_ms"] = {str(t): round(prefill_ms(fg, t), 3) for t in args.tokens}
    out["prefill_graph_ms"] = {str(t): round(prefill_ms(fg, t, write=True), 3) for t in args.tokens}
    print("prefill ms (batch 1), eager:", out["prefill_ms"], flush=True)
    print("prefill ms (batch 1), as generate() runs it (graphs up to", max(fg.report["prefill_graphs"] or [0]),
          "tokens):", out["prefill_graph_ms"], flush=True)
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fg._prefill([[5] * 128], write=False)
        torch.cuda.synchronize()
    out["prefill_128_top_kernels"] = _top_kernels(prof, 15)
    out["gemm"] = gemm_table(fg, args.ms) if args.ms else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n| role | M | best | best us | cuBLAS us | speed-up | cuBLAS GB/s | cuBLAS TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out["gemm"]:
        print(f"| {r['role']} | {r['m']} | {r['best']} | {r['best_us']} | {r['cublas_us']} | {r['speedup_vs_cublas']} "
              f"| {r['cublas_gbs']} | {r['cublas_tflops']} |")
    print("\ntop kernels, prefill T=128 x3:")
    for k in out["prefill_128_top_kernels"][:10]:
        print(" ", k)


if __name__ == "__main__":
    main()
