"""Does an L2 prefetch ahead of a decode GEMV pay? (engine/kernels/csrc/l2_prefetch.cu; GPU only, sm_90.)

At batch 1 the decode step's RoPE + KV write, split-KV attention and merge kernels leave HBM idle for several
microseconds per layer. The engine asks for wo's weights in L2 before them (engine/model/layers/attention.py).
This benchmark isolates the effect: per Llama-3-8B shape (qkv / wo / w13 / w2, M = 1) and kernel (the bf16 fma
GEMV at the tuner's choice, the int4 g128 CUDA GEMV), CUDA graphs of `reps` repetitions of

    cold: flush L2 (read 256 MB) -> spin gap_us (stands for the attention kernels) -> GEMV
    pf:   flush -> l2_prefetch(the GEMV's weights) -> spin gap_us -> GEMV
    base: flush -> spin gap_us (no GEMV; subtracted from both)

are replayed (median of --iters, CUDA events), for gaps 0 / 4 / 8 / 16 us and prefetch chunks of 16 KB .. 1 MB;
and `warm`: the GEMV alone, replayed back to back (weights that fit stay in L2). Times in microseconds per GEMV;
cold - pf is what the prefetch saves (the prefetch kernel's own cost included).

    python benchmarks/bench_l2_prefetch.py --out OUT.json [--iters 50] [--reps 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import torch

SHAPES = {"qkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
GAPS_US = (0, 4, 8, 16)
CHUNKS = (16384, 65536, 262144, 1048576)


def _graph_us(fn, iters: int, reps: int) -> float:
    """Median microseconds per repetition of fn (reps calls captured in one CUDA graph)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def _cycles_per_us() -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    a.record()
    torch.cuda._sleep(2_000_000)
    b.record()
    b.synchronize()
    return 2_000_000 / (a.elapsed_time(b) * 1e3)


def kernels(name: str, n: int, k: int, dev, dt) -> dict:
    """{kernel: (call, tensors to prefetch, bytes)} for one shape at M = 1."""
    from engine.kernels import ext
    from engine.kernels.triton import gemv
    from engine.kernels.triton.tune import GemvTuner

    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    x = torch.randn(1, k, device=dev, dtype=dt)
    tuner = GemvTuner()
    tuner.tune([w] + [torch.randn_like(w) for _ in range(max(1, int(2 * 60e6 // w.nbytes)))], 1, reps=3)
    cfg = tuner.get(1, n, k, False)
    out = {f"bf16_{cfg}": (lambda: gemv.linear(x, w, cfg=cfg), [w], w.nbytes)}
    qw = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32)
    sc = (torch.rand(n, k // 128, device=dev) * 0.01).to(dt)
    zr = torch.full((n, k // 128), 8.0, device=dev, dtype=dt)
    if ext.is_available():
        out["int4_cuda"] = (lambda: ext.int4_gemv(x, qw, sc, zr, 128), [qw, sc, zr], qw.nbytes + sc.nbytes + zr.nbytes)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    from engine.kernels import ext

    if not torch.cuda.is_available() or not ext.is_available():
        raise SystemExit(f"needs a GPU and the anvil extension ({ext.why_unavailable()})")
    dev, dt = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 * 2**20 // 4, device=dev, dtype=torch.float32).fill_(1.0)
    fo = torch.empty((), device=dev)
    cyc = _cycles_per_us()

    def run(call, tensors, gap_us: float, chunk: int | None, gemv: bool = True):
        def fn():
            torch.sum(flush, dim=0, out=fo)
            if chunk:
                for t in tensors:
                    ext.l2_prefetch(t, -1, chunk)
            if gap_us:
                torch.cuda._sleep(int(gap_us * cyc))
            if gemv:
                call()

        return fn

    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for kern, (call, tensors, nbytes) in kernels(name, n, k, dev, dt).items():
            warm = _graph_us(call, args.iters, args.reps)
            for gap in GAPS_US:
                base = _graph_us(run(call, tensors, gap, None, gemv=False), args.iters, args.reps)
                cold = _graph_us(run(call, tensors, gap, None), args.iters, args.reps) - base
                row = {"shape": name, "n": n, "k": k, "kernel": kern, "mbytes": round(nbytes / 1e6, 2),
                       "gap_us": gap, "warm_us": round(warm, 2), "cold_us": round(cold, 2),
                       "cold_gb_s": round(nbytes / cold / 1e3, 1)}  # fmt: skip
                for chunk in CHUNKS:
                    pf = _graph_us(run(call, tensors, gap, chunk), args.iters, args.reps) - base
                    row[f"pf{chunk // 1024}k_us"] = round(pf, 2)
                rows.append(row)
                best = min((v, c) for c, v in row.items() if c.startswith("pf"))
                print(f"{name:4} {kern:24} gap {gap:2} us: warm {warm:6.2f} cold {cold:6.2f} best pf {best[0]:6.2f}"
                      f" ({best[1]})", flush=True)  # fmt: skip
    p = torch.cuda.get_device_properties(0)
    rec = {"benchmark": "bench_l2_prefetch", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "commit": os.environ.get("ANVIL_COMMIT", "unknown"), "gpu": p.name, "sms": p.multi_processor_count,
           "l2_mb": round(p.L2_cache_size / 2**20, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "iters": args.iters, "reps": args.reps, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
