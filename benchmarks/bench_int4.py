"""GPU benchmark of the int4 g128 kernels on Llama-3-8B linear shapes, against bf16 cuBLAS F.linear on the same
shape: Triton (decode kernel `int4_gemv`, GEMM `int4_gemm`), the CUDA GEMV (`int4_cuda`, M <= 8: int4_tc_gemv.cu's
tensor-core path for K, G multiples of 128, `int4_cuda_fma` the FMA kernel of int4_gemv.cu forced, and at M = 1 / 8
`int4_tc_rR_ksS_pP`: R 16-row tiles per warp x S warps splitting K x P load stages forced; `int4_tc2*`: the same with
x in shared memory, ANVIL_INT4_TC_V=2; `int4_tc3*`: x stored as B fragments, =3), the tensor-core kernel (`int4_mma`,
int4_mma.cu, M <= 64; `int4_mma_nt2` / `_nt4` / `_nt4_occ1` / `_bps1|2|4`: its tuning knobs forced),
the prefill path (`int4_dequant`: dequantize + cuBLAS, M > 32) and the NF4 GEMV.

    python benchmarks/bench_int4.py --out OUT.json [--iters 200] [--dtype bfloat16] [--shapes qkv,wo,w13,w2]
    python benchmarks/bench_int4.py --sweep --out OUT.json --iters 30 [--budget-s 60] [--configs-out T.json]

Timing: each measured call is captured (with the rotating weight copies below) in a CUDA graph, so Python launch
overhead does not count; the median over `--iters` graph replays (CUDA events) of the time per call. Weights
larger than L2 are read from HBM: enough copies rotate to exceed 2x L2 for the small shapes. Per row: median ms,
achieved GB/s of the bytes the kernel must read (packed weights + scales + zeros (+ absmax) + x + y), the bf16
cuBLAS time on the dense weight, the speed-up, and the max |error| vs the reference (dequantize to float32,
matmul) relative to max |ref|.

--sweep: for every (shape, M in 1, 2, 4, 8, 16, 32) every candidate config of SWEEP_GEMV / SWEEP_GEMM (and
SWEEP_NF4) is first checked against the reference (wrong or failing configs are skipped and recorded with the
reason), then timed with split_k = 1, the heuristic split and twice it. The JSON gets every row, the best config
per (M, N, K) ("best") and, under "configs_table", the same in the format of engine/kernels/triton/
int4_configs.json (--configs-out writes that file directly). Candidates stop being tried once --budget-s seconds
have passed (defaults and bf16 rows are always measured); compiled kernels are cached by Triton across shapes.
--cpu-smoke runs the sweep machinery on the CPU under Triton's interpreter (tiny shapes, wall-clock timing): a
test of this script, not a benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from engine.kernels import ext  # noqa: E402
from engine.kernels.triton.int4_dequant import int4_dequantize  # noqa: E402
from engine.kernels.triton.int4_gemm import GemmConfig, gemm_config, int4_gemm  # noqa: E402
from engine.kernels.triton.int4_gemv import GemvConfig, gemv_config, int4_gemv, pick_split  # noqa: E402
from engine.kernels.triton.nf4_gemv import nf4_gemv  # noqa: E402
from engine.quant.int4 import dequantize, quantize_rtn  # noqa: E402
from engine.quant.nf4 import code_table, dequantize_nf4, quantize_nf4  # noqa: E402

SHAPES = {  # name: (N, K) of Llama-3-8B's fused linears; --shapes also takes "NxK"
    "qkv": (6144, 4096),
    "wo": (4096, 4096),
    "w13": (28672, 4096),
    "w2": (4096, 14336),
}
MS = (1, 8, 32, 128)
SWEEP_MS = (1, 2, 4, 8, 16, 32)
G = 128
TOL = 2e-2  # max |err| / max |ref| above which a config counts as wrong (correct ones show ~3e-3 in bf16)
F_, T_ = False, True
# decode-kernel candidates, GemvConfig(block_n, block_k, split_k, warps, stages, dot, block_m, grouped, asm); split_k is
# replaced by 1 / the heuristic split / twice it. FMA configs (dot=False) run at M == 1 only; dot configs at
# M <= block_m.
SWEEP_GEMV = [
    GemvConfig(32, 512, 0, 4, 1, F_),
    GemvConfig(16, 512, 0, 4, 1, F_),
    GemvConfig(64, 256, 0, 4, 1, F_),
    GemvConfig(32, 1024, 0, 8, 1, F_),
    GemvConfig(64, 512, 0, 8, 1, F_),
    GemvConfig(128, 256, 0, 8, 1, F_),
    GemvConfig(32, 512, 0, 4, 2, F_),
    GemvConfig(32, 512, 0, 4, 1, F_, 16, F_),
    GemvConfig(64, 256, 0, 4, 1, T_, 16),
    GemvConfig(32, 512, 0, 4, 1, T_, 16),
    GemvConfig(64, 512, 0, 8, 1, T_, 16),
    GemvConfig(128, 256, 0, 8, 1, T_, 16),
    GemvConfig(16, 1024, 0, 4, 1, T_, 16),
    GemvConfig(64, 256, 0, 4, 3, T_, 16),
    GemvConfig(64, 256, 0, 4, 1, T_, 16, F_),
    GemvConfig(64, 256, 0, 4, 1, T_, 16, T_, F_),
    GemvConfig(32, 512, 0, 4, 1, F_, 16, T_, F_),
    GemvConfig(64, 256, 0, 4, 1, T_, 32),
    GemvConfig(32, 512, 0, 4, 1, T_, 32),
    GemvConfig(128, 256, 0, 8, 1, T_, 32),
]
# GEMM candidates for M >= 16, GemmConfig(block_m, block_n, block_k, warps, stages)
SWEEP_GEMM = [GemmConfig(16, 64, 256, 4, 3), GemmConfig(32, 64, 256, 4, 3), GemmConfig(32, 128, 128, 4, 3),
              GemmConfig(32, 64, 256, 4, 3, grouped=False)]  # fmt: skip
SWEEP_NF4 = [GemvConfig(32, 512, 0, 4, 1, F_), GemvConfig(64, 256, 0, 4, 1, F_), GemvConfig(64, 256, 0, 4, 1, T_, 16),
             GemvConfig(32, 512, 0, 4, 1, T_, 32)]  # fmt: skip


class Timer:
    """CUDA-graph timing on the GPU; wall clock under --cpu-smoke."""

    def __init__(self, cuda: bool, iters: int):
        self.cuda, self.iters = cuda, iters

    def __call__(self, calls: list) -> float:
        """Median ms per call of running the zero-argument callables `calls` (one per rotating copy)."""
        if not self.cuda:
            t = time.perf_counter()
            for f in calls:
                f()
            return (time.perf_counter() - t) * 1e3 / len(calls)
        reps = max(1, -(-16 // len(calls)))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compile) outside the capture
            for f in calls:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    for f in calls:
                        f()
            run, per = graph.replay, reps * len(calls)
        except Exception:  # no graph: time eager back-to-back launches
            torch.cuda.synchronize()

            def run():
                for f in calls:
                    f()

            per = len(calls)
        run()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / per for s, e in zip(starts, ends, strict=True))


def copies_for(nbytes: int, cuda: bool) -> int:
    """How many weight copies to rotate through so the working set exceeds 2x L2 (no L2-resident reruns)."""
    if not cuda:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, -(-2 * l2 // nbytes))


def cfg_str(kernel: str, c) -> str:
    if c is None:
        return "default"
    flags = ("" if c.grouped else " ng") + ("" if c.asm else " noasm")
    if isinstance(c, GemmConfig):
        return f"m{c.block_m} n{c.block_n} k{c.block_k} w{c.warps} st{c.stages} s{c.split_k}" + flags
    mode = f"dot{c.block_m}" if c.dot else "fma"
    return f"{mode} n{c.block_n} k{c.block_k} w{c.warps} st{c.stages} s{c.split_k}" + flags


def split_variants(c, m: int, n: int, k: int, device) -> list:
    """c with split_k = 1, the heuristic split, twice it (deduplicated, capped at the K tiles)."""
    bm = max(c.block_m, 16) if (isinstance(c, GemmConfig) or c.dot) else 16
    programs = triton.cdiv(m, bm) * triton.cdiv(n, c.block_n)
    tiles = triton.cdiv(k, c.block_k)
    auto = pick_split(0, programs, tiles, device)
    out = []
    for s in (1, auto, 2 * auto):
        s = min(s, tiles)
        if s not in [v.split_k for v in out]:
            out.append(c._replace(split_k=s))
    return out


class Bench:
    def __init__(self, dtype, iters: int, sweep: bool, budget_s: float, cuda: bool):
        self.dtype, self.sweep, self.budget_s, self.cuda = dtype, sweep, budget_s, cuda
        self.dev = torch.device("cuda" if cuda else "cpu")
        self.time = Timer(cuda, iters)
        self.t0 = time.monotonic()
        self.rows: list[dict] = []

    def over_budget(self) -> bool:
        return self.sweep and time.monotonic() - self.t0 > self.budget_s

    def measure(self, shape, n, k, m, kernel, config, fn, calls, ref, nbytes, t_dense) -> dict | None:
        """Check fn() against ref, then time `calls`; one row (status ok / wrong / error / skipped)."""
        row = {"shape": shape, "N": n, "K": k, "M": m, "kernel": kernel, "config": _cfg_dict(config),
               "label": cfg_str(kernel, config), "median_ms": None, "gb_s": None, "bytes": nbytes,
               "dense_ms": round(t_dense, 5), "speedup_vs_dense": None, "max_rel_err": None}  # fmt: skip
        if config is not None and self.over_budget():
            row["status"] = "skipped: time budget"
            self.rows.append(row)
            return row
        try:
            out = fn()
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            row["max_rel_err"] = err
            if not (err <= TOL):  # also catches NaN
                row["status"] = f"wrong: rel err {err:.3g} > {TOL}"
            else:
                t = self.time(calls)
                row.update(median_ms=round(t, 5), gb_s=round(nbytes / t / 1e6, 1),
                           speedup_vs_dense=round(t_dense / t, 3), status="ok")  # fmt: skip
        except Exception as e:  # a config that fails to compile or launch must not stop the sweep
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self.cuda:
                torch.cuda.synchronize()
        self.rows.append(row)
        _print_row(row)
        return row

    def shape(self, name: str, n: int, k: int, ms, nf4: bool = True) -> None:
        dt, dev = self.dtype, self.dev
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=gen) * 0.02
        q = quantize_rtn(w, G).to(dev, dt)
        nfw = quantize_nf4(w)
        nf_q, nf_a, code = nfw.qweight.to(dev), nfw.absmax.to(dev), code_table(dev)
        dense = w.to(dev, dt)
        int4_bytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.zeros))
        nf4_bytes = nf_q.numel() + nf_a.numel() * 4
        dense_bytes = dense.numel() * dense.element_size()
        ref_int4, ref_nf4 = dequantize(q).to(dev), dequantize_nf4(nfw).to(dev)  # float32 [N, K]
        int4_w = [(q.qweight, q.scales, q.zeros)] + [
            (q.qweight.clone(), q.scales.clone(), q.zeros.clone()) for _ in range(copies_for(int4_bytes, self.cuda) - 1)
        ]
        dense_w = [dense] + [dense.clone() for _ in range(copies_for(dense_bytes, self.cuda) - 1)]
        nf4_w = [(nf_q, nf_a)] + [(nf_q.clone(), nf_a.clone()) for _ in range(copies_for(nf4_bytes, self.cuda) - 1)]
        ctx = dict(name=name, n=n, k=k, gen=gen, int4_w=int4_w, dense_w=dense_w, nf4_w=nf4_w, code=code,
                   ref_int4=ref_int4, ref_nf4=ref_nf4, int4_bytes=int4_bytes, nf4_bytes=nf4_bytes,
                   dense_bytes=dense_bytes)  # fmt: skip
        for m in ms:
            self.one_m(m, nf4=nf4, **ctx)

    def one_m(self, m, *, name, n, k, gen, int4_w, dense_w, nf4_w, code, ref_int4, ref_nf4, int4_bytes, nf4_bytes,
              dense_bytes, nf4) -> None:  # fmt: skip
        """Rows of one (shape, M): the defaults, the sweep candidates, bf16 cuBLAS."""
        dev, dt = self.dev, self.dtype
        nf_q, nf_a = nf4_w[0]
        x = torch.randn(m, k, generator=gen).to(dev, dt)
        io = x.numel() * x.element_size() + m * n * x.element_size()
        t_dense = self.time([lambda d=d: F.linear(x, d) for d in dense_w])
        ref = x.float() @ ref_int4.T

        def add(kernel, config, call):
            return self.measure(name, n, k, m, kernel, config, lambda: call(*int4_w[0]),
                                [lambda ws=ws: call(*ws) for ws in int4_w], ref, int4_bytes + io, t_dense)  # fmt: skip

        if m <= 32:
            add("int4_gemv", None, lambda qw, s, z: int4_gemv(x, qw, s, z, G))
        if self.cuda and ext.int4_gemv_supported(x, G, None):  # the CUDA GEMV (M <= 8), beside the Triton kernels
            add("int4_cuda", None, lambda qw, s, z: ext.int4_gemv(x, qw, s, z, G))
            variants = [("int4_cuda_fma", {"ANVIL_INT4_GEMV_TC": "0"})]  # the FMA kernel beside the tensor-core path
            variants += [(f"int4_tc_r{r}_ks{ks}_p{p}", {"ANVIL_INT4_TC_R": str(r), "ANVIL_INT4_TC_KS": str(ks),
                          "ANVIL_INT4_TC_P": str(p)}) for r in (1, 2) for ks in (2, 4, 8) for p in (2, 4)]  # fmt: skip
            variants += [("int4_tc2", {"ANVIL_INT4_TC_V": "2"})]  # x in shared memory, at the plan and forced
            variants += [(f"int4_tc2_r{r}_ks8_p{p}", {"ANVIL_INT4_TC_V": "2", "ANVIL_INT4_TC_R": str(r),
                          "ANVIL_INT4_TC_KS": "8", "ANVIL_INT4_TC_P": str(p)}) for r in (1, 2) for p in (2, 4)]  # fmt: skip
            variants += [("int4_tc3", {"ANVIL_INT4_TC_V": "3"})]  # ... with x stored as B fragments
            variants += [(f"int4_tc3_r{r}_ks8_p{p}", {"ANVIL_INT4_TC_V": "3", "ANVIL_INT4_TC_R": str(r),
                          "ANVIL_INT4_TC_KS": "8", "ANVIL_INT4_TC_P": str(p)}) for r in (1, 2) for p in (2, 4)]  # fmt: skip
            for label, env in variants if m in (1, 8) else variants[:1]:
                add(label, None, lambda qw, s, z, env=env: _with_env(env, ext.int4_gemv, x, qw, s, z, G))
        if self.cuda and ext.int4_mma_supported(x, G, None):  # the tensor-core kernel (M <= 64), its NT variants
            variants = [("", "", "", "")] + ([("_nt2", "2", "2", ""), ("_nt4", "4", "2", "")] if m <= 32 else [])
            variants += [("_nt4_occ1", "4", "1", "")] if m <= 16 else []
            variants += [("_bps1", "", "", "1"), ("_bps2", "", "", "2"), ("_bps4", "", "", "4")]
            for label, nt, occ, bps in variants:
                env = {"ANVIL_INT4_MMA_NT": nt, "ANVIL_INT4_MMA_OCC": occ, "ANVIL_INT4_MMA_BLOCKS_PER_SM": bps}
                add("int4_mma" + label, None,
                    lambda qw, s, z, env=env: _with_env(env, ext.int4_mma, x, qw, s, z, G))  # fmt: skip
        add("int4_gemm", None, lambda qw, s, z: int4_gemm(x, qw, s, z, G))
        if m > 32:  # the prefill path: dequantize (Triton) + cuBLAS
            add("int4_dequant", None, lambda qw, s, z: F.linear(x, int4_dequantize(qw, s, z, G, None, dt)))
        if self.sweep:
            for base in SWEEP_GEMV:
                if (not base.dot and m > 1) or (base.dot and m > base.block_m):
                    continue
                for c in split_variants(base, m, n, k, dev):
                    add("int4_gemv", c, lambda qw, s, z, c=c: int4_gemv(x, qw, s, z, G, config=c))
            for base in SWEEP_GEMM if m >= 16 else []:
                if m > 2 * base.block_m:
                    continue
                for c in split_variants(base, m, n, k, dev):
                    add("int4_gemm", c, lambda qw, s, z, c=c: int4_gemm(x, qw, s, z, G, config=c))
        if nf4 and m <= 32:
            ref4 = x.float() @ ref_nf4.T
            cands = [None] + ([c for b in SWEEP_NF4 if (b.dot and m <= b.block_m) or (not b.dot and m == 1)
                               for c in split_variants(b, m, n, k, dev)] if self.sweep else [])  # fmt: skip
            for c in cands:
                self.measure(name, n, k, m, "nf4_gemv", c, lambda c=c: nf4_gemv(x, nf_q, nf_a, code, config=c),
                             [lambda qa=qa, c=c: nf4_gemv(x, *qa, code, config=c) for qa in nf4_w], ref4,
                             nf4_bytes + io, t_dense)  # fmt: skip
        row = {"shape": name, "N": n, "K": k, "M": m, "kernel": "bf16_cublas", "config": None, "label": "",
               "median_ms": round(t_dense, 5), "gb_s": round((dense_bytes + io) / t_dense / 1e6, 1),
               "bytes": dense_bytes + io, "dense_ms": round(t_dense, 5), "speedup_vs_dense": 1.0,
               "max_rel_err": 0.0, "status": "ok"}  # fmt: skip
        self.rows.append(row)
        _print_row(row)


def _with_env(env: dict, fn, *args):
    """fn(*args) with the environment variables `env` set (the CUDA kernels read their tuning knobs per call)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg_dict(c) -> dict | None:
    return None if c is None else dict(c._asdict())


def _print_row(r: dict) -> None:
    if r["status"] == "ok":
        print(f"{r['shape']:5s} {r['M']:4d} {r['kernel']:11s} {r['label']:30s} {r['median_ms']:9.4f} "
              f"{r['gb_s']:8.1f} {r['speedup_vs_dense']:8.2f} {r['max_rel_err']:9.2e}", flush=True)  # fmt: skip
    else:
        print(f"{r['shape']:5s} {r['M']:4d} {r['kernel']:11s} {r['label']:30s} {r['status']}", flush=True)


def best_configs(rows: list[dict]) -> list[dict]:
    """The fastest correct config per (format, M, N, K): int4 among int4_gemv / int4_gemm rows, nf4 among nf4_gemv
    rows. A default row (config None) wins as its resolved heuristic config."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] != "ok" or r["kernel"].startswith(("bf16_cublas", "int4_cuda", "int4_tc", "int4_mma")):  # Triton configs
            continue
        fmt = "nf4" if r["kernel"] == "nf4_gemv" else "int4"
        key = (fmt, r["M"], r["N"], r["K"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    out = []
    for (fmt, m, n, k), r in sorted(best.items()):
        cfg = r["config"]
        if cfg is None:  # the heuristic won: record what it resolves to
            heur = (
                gemm_config(m, n, k, G)
                if r["kernel"] == "int4_gemm"
                else gemv_config(m, n, k, 64 if fmt == "nf4" else G)
            )
            cfg = dict(heur._asdict())
        out.append({"format": fmt, "M": m, "N": n, "K": k, "shape": r["shape"],
                    "kernel": "gemm" if r["kernel"] == "int4_gemm" else "gemv", "config": cfg,
                    "median_ms": r["median_ms"], "dense_ms": r["dense_ms"],
                    "speedup_vs_dense": r["speedup_vs_dense"]})  # fmt: skip
    return out


def configs_table(best: list[dict], device_name: str, old: dict | None = None) -> dict:
    """The int4_configs.json document: {"schema", "devices": {name: {"int4": [...], "nf4": [...]}}}, merged into
    `old` (other devices kept)."""
    doc = {"schema": "anvil-int4-configs/1", "devices": dict((old or {}).get("devices", {}))}
    entries: dict[str, list] = {"int4": [], "nf4": []}
    for b in best:
        entries[b["format"]].append({k: b[k] for k in ("M", "N", "K", "kernel", "config", "median_ms")})
    doc["devices"][device_name] = entries
    return doc


def print_summary(rows: list[dict], best: list[dict]) -> None:
    dense = {(r["shape"], r["M"]): r["median_ms"] for r in rows if r["kernel"] == "bf16_cublas"}
    defaults = {(r["shape"], r["M"], r["kernel"]): r["median_ms"] for r in rows if r["config"] is None}
    print(f"\n{'fmt':4s} {'shape':5s} {'M':>3s} {'bf16 ms':>8s} {'default':>8s} {'best ms':>8s} {'x bf16':>7s}  best")
    for b in best:
        dk = "nf4_gemv" if b["format"] == "nf4" else ("int4_gemv" if b["M"] <= 32 else "int4_gemm")
        d = defaults.get((b["shape"], b["M"], dk))
        c = b["config"]
        lab = cfg_str(b["kernel"], GemmConfig(**c) if b["kernel"] == "gemm" else GemvConfig(**c))
        print(f"{b['format']:4s} {b['shape']:5s} {b['M']:3d} {dense.get((b['shape'], b['M']), 0):8.4f} "
              f"{d if d is not None else float('nan'):8.4f} {b['median_ms']:8.4f} {b['speedup_vs_dense']:7.2f}  "
              f"{b['kernel']} {lab}")  # fmt: skip
    bad = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    print(f"{len(bad)} configs wrong or failing, {skipped} skipped for the time budget")
    for r in bad[:20]:
        print(f"  {r['shape']} M={r['M']} {r['kernel']} {r['label']}: {r['status']}")


def _gpu_record() -> dict:
    if not torch.cuda.is_available():  # --cpu-smoke
        return {"torch": torch.__version__, "cuda": torch.version.cuda}
    from harness.envinfo import gpu_record

    return gpu_record()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="names of SHAPES or NxK, comma-separated")
    ap.add_argument("--sweep", action="store_true", help="time every candidate config (SWEEP_*) per (shape, M)")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,8,32,128; --sweep 1..32)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="--sweep: stop trying candidates after this")
    ap.add_argument("--no-nf4", action="store_true", help="skip the NF4 kernel")
    ap.add_argument("--configs-out", default=None, help="--sweep: also write the int4_configs.json table here")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU under the Triton interpreter (test)")
    args = ap.parse_args(argv)
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_int4.py needs a CUDA GPU (or --cpu-smoke)")
    dtype = torch.float32 if args.cpu_smoke else getattr(torch, args.dtype)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else list(SWEEP_MS if args.sweep else MS)
    bench = Bench(dtype, args.iters, args.sweep, args.budget_s, cuda)
    print(
        f"{'shape':5s} {'M':>4s} {'kernel':11s} {'config':30s} {'ms':>9s} {'GB/s':>8s} {'x dense':>8s} {'rel err':>9s}"
    )
    fatal = None
    for name in args.shapes.split(","):
        n, k = SHAPES[name] if name in SHAPES else (int(v) for v in name.split("x"))
        try:
            bench.shape(name, n, k, ms, nf4=not args.no_nf4)
        except Exception as e:  # e.g. a sticky CUDA error: keep what was measured, say why it stopped
            fatal = f"{name}: {type(e).__name__}: {e}"
            print(f"stopped: {fatal}", flush=True)
            break
    rows = bench.rows
    best = best_configs(rows)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu-interpreter"
    old = None
    if args.configs_out and Path(args.configs_out).is_file():
        try:
            old = json.loads(Path(args.configs_out).read_text())
        except ValueError:
            old = None
    table = configs_table(best, gpu, old)
    print_summary(rows, best)
    out = {"schema": "anvil-bench-int4/2", "dtype": str(dtype).removeprefix("torch."), "group_size": G,
           "iters": args.iters, "sweep": args.sweep, "elapsed_s": round(time.monotonic() - bench.t0, 1), "fatal": fatal,
           "rows": rows, "best": best, "configs_table": table,
           "env": {**_gpu_record(), "gpu": gpu, "triton": triton.__version__, "python": platform.python_version(),
                   "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['elapsed_s']} s)")
    if args.configs_out:
        Path(args.configs_out).write_text(json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.configs_out}")


if __name__ == "__main__":
    main()
