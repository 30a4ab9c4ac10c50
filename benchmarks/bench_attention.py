"""Prefill / extend attention on the GPU: the Triton paged prefill kernel, and on fresh prompts the TMA fresh-prompt
kernel (engine/kernels/triton/fresh_prefill.py, `triton_fresh_*`: k contiguous, v a column slice of qkv, as the
engine calls it), against torch SDPA (cuDNN and flash backends, GQA through enable_gqa on strided views) on the
Llama-3-8B head layout (32 query / 8 KV heads, d128, bf16, causal), CUDA events, median.
TFLOP/s counts the causal half: 2 * 2 * H * D * sum over queries of the keys each attends.

  python benchmarks/bench_attention.py --out results/gpu/attention.json [--lens 4096,16384] [--extend 2048]
  python benchmarks/bench_attention.py --sweep --out OUT.json [--budget 75]

--sweep adds a sliding-window extend row (default config vs SDPA with a mask) and times the kernel under every launch
config of SWEEP (BLOCK_M rows = tokens x GQA group, BLOCK_N keys per tile, num_warps, num_stages, optional maxnreg)
on the fresh / extend cases; each config's output is first checked against the SDPA output (|err| <= 1e-2 +
2e-2 |ref|) and only timed when it matches. A config that fails to compile or launch (e.g. out of shared memory) is
recorded with its error. FRESH_SWEEP (the fresh kernel's configs, WS = warp-specialized key loop) runs first, on the
fresh cases, checked the same way. Configs stop being tried once --budget seconds have passed. The best config
per kernel and case and the default heuristic's time are printed and saved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.kernels.triton import fresh_prefill
from engine.kernels.triton.paged_prefill import clamp_config, default_config, paged_prefill_attention

H, HKV, D, PAGE = 32, 8, 128, 16
DEV = "cuda"

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]). num_stages 2 / 5 / 7 give 2 / 3 / 4 K/V buffers (the page-id
# load takes a stage: see paged_prefill.default_config); maxnreg 128: two 8-warp programs per SM; configs that spill
# registers on sm_90 (128 rows on 4 warps) are left out.
SWEEP = [  # the likeliest first: --budget cuts the tail
    (128, 64, 8, 5), (128, 128, 8, 5), (128, 32, 8, 5, 128), (128, 32, 8, 7, 128), (128, 64, 8, 7),
    (128, 32, 8, 7), (64, 64, 4, 5),
    (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 5), (64, 32, 4, 5), (256, 32, 16, 5),
    (256, 64, 16, 5), (64, 64, 4, 2), (64, 128, 4, 2),
]  # fmt: skip
# the TMA fresh-prompt kernel's configs (BLOCK_M, BLOCK_N, num_warps, num_stages, WS), timed on the fresh cases
FRESH_SWEEP = [
    (128, 64, 8, 3, False), (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 4, False),
    (128, 32, 8, 4, False), (256, 64, 16, 3, False), (256, 128, 16, 2, False), (64, 64, 4, 3, False),
    (128, 64, 8, 3, True), (128, 128, 8, 2, True),
]  # fmt: skip


def timed(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def make_case(n_ctx: int, q_len: int, window: int = 0, dtype=torch.bfloat16) -> dict:
    """q_len new queries at the end of an n_ctx-token sequence (q_len == n_ctx: a fresh prompt), its K/V in a
    paged cache with scattered pages, and the causal (windowed) FLOP count."""
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(q_len, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(n_ctx, HKV, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(n_ctx, HKV, D, device=dev, dtype=dtype, generator=g)
    nb = (n_ctx + PAGE - 1) // PAGE
    perm = torch.randperm(nb, device=dev, generator=g).to(torch.int32)  # scattered pages, as in a shared pool
    kc = torch.zeros(nb, HKV, PAGE, D, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.arange(n_ctx, device=dev)
    kc[perm[pos // PAGE].long(), :, pos % PAGE] = k
    vc[perm[pos // PAGE].long(), :, pos % PAGE] = v
    qpos = n_ctx - q_len + torch.arange(q_len)
    seen = qpos + 1 if window <= 0 else torch.clamp(qpos + 1, max=window)
    qkv = torch.zeros(n_ctx, (H + 2 * HKV) * D, device=dev, dtype=dtype)  # the engine's layout: v inside qkv
    v_rows = qkv[:, (H + HKV) * D :].view(n_ctx, HKV, D)
    v_rows.copy_(v)
    return {
        "n_ctx": n_ctx, "q_len": q_len, "window": window, "q": q, "k": k, "v": v, "kc": kc, "vc": vc, "v_rows": v_rows,
        "bt": perm[None, :], "cu": torch.tensor([0, q_len], device=dev, dtype=torch.int32),
        "lens": torch.tensor([n_ctx], device=dev, dtype=torch.int32), "scale": D**-0.5,
        "flops": 4 * H * D * int(seen.sum()),
    }  # fmt: skip


def run_kernel(c: dict, config: dict | None = None) -> torch.Tensor:
    return paged_prefill_attention(c["q"], c["kc"], c["vc"], c["bt"], c["cu"], c["lens"], c["scale"], c["window"],
                                   0, 1, c["q_len"], config=config)  # fmt: skip


def run_fresh(c: dict, config: dict | None = None) -> torch.Tensor:
    """The TMA fresh-prompt kernel as the engine calls it: rotated k contiguous, v a column slice of qkv."""
    return fresh_prefill.fresh_prefill_attention(c["q"], c["k"], c["v_rows"], c["cu"], c["scale"], 0, 1, c["q_len"],
                                                 config=config)  # fmt: skip


def fresh_ok(c: dict) -> bool:
    return c["q_len"] == c["n_ctx"] and c["window"] <= 0 and fresh_prefill.supported(H, HKV, D, c["q"].device) is None


def sdpa(c: dict, res: dict) -> torch.Tensor | None:
    """Times SDPA's cuDNN / flash / efficient backends into res; returns the first output ([q_len, H, D])."""
    n_ctx, q_len, window = c["n_ctx"], c["q_len"], c["window"]
    qq, kk, vv = (c[x].transpose(0, 1)[None] for x in "qkv")
    mask = None
    if q_len != n_ctx or window > 0:  # bottom-right causal: query i sees keys <= n_ctx - q_len + i
        i = n_ctx - q_len + torch.arange(q_len, device=DEV)[:, None]
        j = torch.arange(n_ctx, device=DEV)[None, :]
        mask = (j <= i) & ((i - j < window) if window > 0 else True)
    ref = None
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
        try:
            with sdpa_kernel(be):

                def f():
                    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                                          scale=c["scale"], enable_gqa=True)  # fmt: skip

                o = f()
                res[f"sdpa_{name}_ms"] = timed(f)
                ref = o[0].transpose(0, 1) if ref is None else ref
        except Exception as e:  # a backend that does not take this case
            res[f"sdpa_{name}_ms"] = None
            res[f"sdpa_{name}_why"] = f"{type(e).__name__}: {str(e)[:120]}"
    return ref


def add_tflops(res: dict, flops: int) -> dict:
    for key in [k for k in res if k.endswith("_ms") and res[k]]:
        res[key.replace("_ms", "_tflops")] = flops / (res[key] * 1e-3) / 1e12
    return res


def case(c: dict) -> tuple[dict, torch.Tensor | None]:
    res = {"n_ctx": c["n_ctx"], "q_len": c["q_len"], "window": c["window"],
           "default_config": default_config(c["q_len"], H // HKV, D, c["q"].dtype, c["q"].device)}  # fmt: skip
    out_t = run_kernel(c)
    res["triton_paged_ms"] = timed(lambda: run_kernel(c))
    out_f = None
    if fresh_ok(c):
        res["fresh_default_config"] = fresh_prefill.default_config(c["q_len"], H // HKV, D, c["q"].dtype, c["q"].device)
        out_f = run_fresh(c)
        res["triton_fresh_ms"] = timed(lambda: run_fresh(c))
    ref = sdpa(c, res)
    if ref is not None:
        res["triton_max_abs_err"] = (out_t.float() - ref.float()).abs().max().item()
        if out_f is not None:
            res["triton_fresh_max_abs_err"] = (out_f.float() - ref.float()).abs().max().item()
    return add_tflops(res, c["flops"]), ref


def sweep(cases: list[tuple[dict, torch.Tensor]], budget_s: float) -> list[dict]:
    """Every config of FRESH_SWEEP (the TMA fresh kernel) on the fresh cases, then every config of SWEEP (the paged
    kernel) on every case: check against the SDPA output, then time."""
    rows, t0 = [], time.time()
    fresh_cases = [(c, ref) for c, ref in cases if fresh_ok(c)]
    runs = [("fresh", run_fresh, fresh_prefill.clamp_config, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w,
                                                              "num_stages": s, "WS": ws}, fresh_cases)
            for bm, bn, w, s, ws in FRESH_SWEEP]  # fmt: skip
    runs += [("paged", run_kernel, clamp_config, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s,
                                                  **({"maxnreg": reg[0]} if reg else {})}, cases)
             for bm, bn, w, s, *reg in SWEEP]  # fmt: skip
    for kernel, run, clamp, cfg, todo in runs:
        for c, ref in todo:
            row = {"kernel": kernel, "n_ctx": c["n_ctx"], "q_len": c["q_len"], "window": c["window"], "config": cfg,
                   "launched": clamp(cfg, c["q_len"], H // HKV)}  # fmt: skip
            if time.time() - t0 > budget_s:
                row["skipped"] = "budget"
                rows.append(row)
                continue
            try:
                o = run(c, cfg)
                torch.cuda.synchronize()
                err = (o.float() - ref.float()).abs()
                row["max_abs_err"] = err.max().item()
                row["ok"] = bool((err <= 1e-2 + 2e-2 * ref.float().abs()).all().item())
                if row["ok"]:
                    row["ms"] = timed(lambda c=c, cfg=cfg, run=run: run(c, cfg))
                    row["tflops"] = c["flops"] / (row["ms"] * 1e-3) / 1e12
            except Exception as e:  # compile / launch failure (e.g. out of shared memory)
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def best_per_case(rows: list[dict]) -> list[dict]:
    best = {}
    for r in rows:
        key = (r["kernel"], r["n_ctx"], r["q_len"], r["window"])
        if r.get("ms") and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    return list(best.values())


def first_calls(lens: list[int], pad: int = 64) -> list[dict]:
    """Fresh causal prompts at lengths not seen before in this process: the wall time of the FIRST call at each new
    shape (synchronized), the first call at the next length (n + 1: new again, in the same pad bucket), and the
    median of later calls, for SDPA's default choice, SDPA limited to cuDNN or to flash, SDPA with the length padded
    to a multiple of `pad` (EngineConfig.fresh_pad), and our paged Triton kernel. A per-shape cost (cuDNN's plan
    build) shows as first >> steady; padding to buckets shows as next_first ~ steady."""
    rows = []
    methods = (("sdpa_default", None), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
               ("sdpa_flash", SDPBackend.FLASH_ATTENTION), (f"sdpa_pad{pad}", "pad"),
               ("triton_paged", "triton"))  # fmt: skip
    for i, (name, be) in enumerate(methods):
        for n in lens:
            n = n + 2 * i  # a length no method has seen (nor n + 1): each method meets new shapes
            row: dict = {"method": name, "len": n}
            for key, ln in (("first_ms", n), ("next_first_ms", n + 1)):
                f = _fresh_call(be, make_case(ln, ln), pad)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    f()
                    torch.cuda.synchronize()
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    break
                row[key] = (time.perf_counter() - t0) * 1e3
            if "error" not in row:
                row["steady_ms"] = timed(f, 5)
            rows.append(row)
            print(row, flush=True)
    return rows


def _fresh_call(be, c: dict, pad: int):
    """A zero-argument call of one fresh-prompt attention method on case c."""
    if be == "triton":
        return lambda: run_kernel(c)
    qq, kk, vv = (c[x].transpose(0, 1)[None] for x in "qkv")  # [1, H, n, D]
    if be == "pad":
        p = -(-qq.shape[2] // pad) * pad - qq.shape[2]
        qq, kk, vv = (F.pad(t, (0, 0, 0, p)) for t in (qq, kk, vv))

    def f():
        with sdpa_kernel(be) if isinstance(be, SDPBackend) else contextlib.nullcontext():
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=c["scale"], enable_gqa=True)

    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lens", default="4096,16384")
    ap.add_argument("--extend", type=int, default=2048, help="also a chunk of this many queries over each prefix")
    ap.add_argument("--sweep", action="store_true", help="also time every launch config of SWEEP")
    ap.add_argument("--first-call", default="", help="only: first-call vs steady time of fresh prompts at these "
                    "new lengths (e.g. 301,517,733,1029,2047), per SDPA backend and our kernel")
    ap.add_argument("--pad", type=int, default=64, help="--first-call: the padded-SDPA method's bucket (tokens)")
    ap.add_argument("--window", type=int, default=1024, help="--sweep: a sliding-window extend row (0: none)")
    ap.add_argument("--budget", type=float, default=75.0, help="--sweep: seconds to spend on configs")
    args = ap.parse_args()
    if args.first_call:
        from harness.envinfo import gpu_record

        rows = first_calls([int(x) for x in args.first_call.split(",")], args.pad)
        with open(args.out, "w") as f:
            json.dump({"env": gpu_record(), "first_call": rows}, f, indent=1)
        return
    specs = []
    for n in (int(x) for x in args.lens.split(",")):
        specs += [(n, ql, 0) for ql in ((n, min(args.extend, n)) if args.extend else (n,))]
    if args.sweep and args.window > 0:
        n = int(args.lens.split(",")[0])
        specs.append((n, min(args.extend or n, n), args.window))
    rows, cases = [], []
    for n, ql, w in specs:
        c = make_case(n, ql, w)
        r, ref = case(c)
        rows.append(r)
        if ref is not None and w == 0:  # the window row runs the default config only (one compile per config)
            cases.append((c, ref))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not k.endswith("_why")},
              flush=True)  # fmt: skip
    from harness.envinfo import gpu_record

    env = gpu_record()
    result = {"env": env, "rows": rows}
    if args.sweep:
        result["sweep"] = sweep(cases, args.budget)
        result["best"] = best_per_case(result["sweep"])
        default_ms = {(r["n_ctx"], r["q_len"], r["window"]): r["triton_paged_ms"] for r in rows}
        fresh_ms = {(r["n_ctx"], r["q_len"], r["window"]): r.get("triton_fresh_ms") for r in rows}
        for b in result["best"]:
            key = (b["n_ctx"], b["q_len"], b["window"])
            dflt = (fresh_ms if b["kernel"] == "fresh" else default_ms)[key]
            print("best", b["kernel"], *key, b["config"], round(b["ms"], 3), "ms", round(b["tflops"], 1),
                  "TFLOP/s; default config", dflt and round(dflt, 3), "ms")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
