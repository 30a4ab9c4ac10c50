"""GPU benchmark of the int4 g128 Triton kernels (GEMV for M <= 8, GEMM above) and the NF4 GEMV on Llama-3-8B
linear shapes, against bf16 cuBLAS F.linear on the same shape.

    python benchmarks/bench_int4.py --out results/gpu/int4-h200.json [--iters 200] [--dtype bfloat16] [--sweep]

Per (shape, M, kernel): median time over CUDA-event-timed runs (after warm-up; weights larger than L2 are read
from HBM, rotating through enough copies to exceed 2x L2 for the small shapes), achieved GB/s of the bytes the
kernel must read (packed weights + scales + zeros (+ absmax) + x + y), the bf16 cuBLAS time on the dense weight
and the speed-up, and the max |error| vs the torch reference (dequantize to float32, matmul) relative to max |ref|.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.kernels.triton.int4_gemm import int4_gemm  # noqa: E402
from engine.kernels.triton.int4_gemv import int4_gemv  # noqa: E402
from engine.kernels.triton.nf4_gemv import nf4_gemv  # noqa: E402
from engine.quant.int4 import dequantize, quantize_rtn  # noqa: E402
from engine.quant.nf4 import code_table, dequantize_nf4, quantize_nf4  # noqa: E402

SHAPES = {  # name: (N, K) of Llama-3-8B's fused linears
    "qkv": (6144, 4096),
    "wo": (4096, 4096),
    "w13": (28672, 4096),
    "w2": (4096, 14336),
}
MS = (1, 8, 32, 128)
# --sweep: launch configs to try beside the defaults. GEMV (BLOCK_M is set from M): (BLOCK_N, BLOCK_K, warps);
# GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
GEMV_SWEEP = [(8, 128, 4), (16, 128, 4), (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (4, 512, 4)]
GEMM_SWEEP = [(16, 64, 64, 4, 4), (32, 128, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 8, 3),
              (128, 128, 64, 8, 3), (64, 256, 32, 8, 3)]


def time_ms(fn, iters: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def copies_for(nbytes: int) -> int:
    """How many weight copies to rotate through so the working set exceeds 2x L2 (no L2-resident reruns)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, -(-2 * l2 // nbytes))


def rotating(make, n: int):
    items = [make() for _ in range(n)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % n
        return items[state["i"]]

    return items, next_item


def bench_shape(name: str, n: int, k: int, dtype: torch.dtype, iters: int, sweep: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    q = quantize_rtn(w, 128).to("cuda", dtype)
    nf = quantize_nf4(w)
    nf_q, nf_a, code = nf.qweight.cuda(), nf.absmax.cuda(), code_table("cuda")
    dense = w.to("cuda", dtype)
    int4_bytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.zeros))
    nf4_bytes = nf_q.numel() + nf_a.numel() * 4
    dense_bytes = dense.numel() * dense.element_size()
    ref_int4 = dequantize(q).cuda()  # float32 [N, K]
    ref_nf4 = dequantize_nf4(nf).cuda()
    _, next_int4 = rotating(lambda: (q.qweight.clone(), q.scales.clone(), q.zeros.clone()),
                                      copies_for(int4_bytes))
    _, next_dense = rotating(lambda: dense.clone(), copies_for(dense_bytes))
    _, next_nf4 = rotating(lambda: (nf_q.clone(), nf_a.clone()), copies_for(nf4_bytes))
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        io = x.numel() * x.element_size() + m * n * x.element_size()
        t_dense = statistics.median(time_ms(lambda x=x: F.linear(x, next_dense()), iters))
        kernels = {"int4_gemm": lambda qw, s, z, x=x: int4_gemm(x, qw, s, z, 128)}
        if m <= 8:
            kernels["int4_gemv"] = lambda qw, s, z, x=x: int4_gemv(x, qw, s, z, 128)
        if sweep:
            for c in GEMM_SWEEP:
                kernels[f"int4_gemm{list(c)}"] = lambda qw, s, z, c=c, x=x: int4_gemm(x, qw, s, z, 128, config=c)
            bm = triton.next_power_of_2(m)
            for c in GEMV_SWEEP if m <= 8 else []:
                cfg = (bm, *c)
                kernels[f"int4_gemv{list(cfg)}"] = lambda qw, s, z, cfg=cfg, x=x: int4_gemv(x, qw, s, z, 128, config=cfg)
        ref = x.float() @ ref_int4.T
        for kname, fn in kernels.items():
            out = fn(q.qweight, q.scales, q.zeros)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            t = statistics.median(time_ms(lambda fn=fn: fn(*next_int4()), iters))
            rows.append(_row(name, n, k, m, kname, t, int4_bytes + io, t_dense, err))
        if m <= 8:
            ref = x.float() @ ref_nf4.T
            out = nf4_gemv(x, nf_q, nf_a, code)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            t = statistics.median(time_ms(lambda x=x: nf4_gemv(x, *next_nf4(), code), iters))
            rows.append(_row(name, n, k, m, "nf4_gemv", t, nf4_bytes + io, t_dense, err))
        rows.append(_row(name, n, k, m, "bf16_cublas", t_dense, dense_bytes + io, t_dense, 0.0))
    return rows


def _row(name, n, k, m, kernel, t_ms, nbytes, t_dense, rel_err) -> dict:
    return {"shape": name, "N": n, "K": k, "M": m, "kernel": kernel, "median_ms": round(t_ms, 5),
            "gb_s": round(nbytes / t_ms / 1e6, 1), "bytes": nbytes, "dense_ms": round(t_dense, 5),
            "speedup_vs_dense": round(t_dense / t_ms, 3), "max_rel_err": rel_err}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time the GEMV / GEMM launch configs of *_SWEEP")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_int4.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'shape':5s} {'M':>4s} {'kernel':28s} {'ms':>9s} {'GB/s':>8s} {'x dense':>8s} {'rel err':>9s}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for r in bench_shape(name, n, k, dtype, args.iters, args.sweep):
            rows.append(r)
            print(f"{r['shape']:5s} {r['M']:4d} {r['kernel']:28s} {r['median_ms']:9.4f} {r['gb_s']:8.1f} "
                  f"{r['speedup_vs_dense']:8.2f} {r['max_rel_err']:9.2e}", flush=True)
    out = {"schema": "anvil-bench-int4/1", "dtype": args.dtype, "group_size": 128, "iters": args.iters,
           "rows": rows,
           "env": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                   "cuda": torch.version.cuda, "python": platform.python_version(),
                   "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
