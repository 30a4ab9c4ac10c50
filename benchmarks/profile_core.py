"""Where the GPU time of the generation core goes: torch.profiler kernel tables (CUDA time per kernel name, per step)
for batch-1 decode (CUDA graphs on and off) and for a continuous-batching run, with GPU-busy time against wall
time (a host-bound run shows GPU idle). Public APIs only. Writes one JSON.

  python benchmarks/profile_core.py --out results/gpu/core-h200/profile.json [--parts b1,cb,host,prefill]
      [--cb-requests 128] [--quant rtn|nf4] [--prefill-len 2048]

prefill: one fresh prompt of --prefill-len tokens, one new token (TTFT), three times: the kernels of one prefill.

host: a cProfile of the host side of the continuous-batching run (where a host-bound step spends its time).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from engine import LLM, EngineConfig
from engine.presets import synthetic
from harness.envinfo import gpu_record


def is_kernel(e) -> bool:
    """A device-side event of the profile that is GPU work (kernel, copy, memset), not the GPU-side copy of a
    record_function range (`anvil.ttft.i`), which spans every kernel of its run and its idle gaps too."""
    return (e.device_type == torch.autograd.DeviceType.CUDA and e.device_resource_id is not None
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith("anvil."))  # fmt: skip


def kernel_table(prof, steps: int, top: int = 30) -> dict:
    """CUDA kernel time by name (us per step), the total, and the union of busy intervals (overlaps counted once).
    `critical_us_per_step` splits the busy time among the kernels: each kernel is charged from where the kernels
    before it ended (or its own start, if later) to its end. Under programmatic dependent launch a kernel starts
    while its predecessor runs and waits, so its plain duration overstates it; the critical shares sum to busy."""
    by = defaultdict(lambda: [0.0, 0, 0.0])
    spans = []
    for e in prof.events():
        if is_kernel(e):
            by[e.name][0] += e.time_range.elapsed_us()
            by[e.name][1] += 1
            spans.append((e.time_range.start, e.time_range.end, e.name))
    spans.sort()
    busy, end = 0.0, float("-inf")
    for s, e, name in spans:
        if e > end:
            busy += e - max(s, end)
            by[name][2] += e - max(s, end)
            end = e
    rows = sorted(by.items(), key=lambda kv: -kv[1][2])
    total = sum(v[0] for v in by.values())
    n = max(1, steps)
    return {"steps": steps, "kernel_us_total": total, "busy_us": busy, "kernel_us_per_step": total / n,
            "busy_us_per_step": busy / n,
            "top": [{"name": k[:120], "us_per_step": t / n, "critical_us_per_step": c / n, "calls_per_step": m / n,
                     "pct": 100 * t / max(total, 1e-9), "critical_pct": 100 * c / max(busy, 1e-9)}
                    for k, (t, m, c) in rows[:top]]}  # fmt: skip


def cpu_table(prof, steps: int, top: int = 30) -> list[dict]:
    """Host time by op / CUDA runtime call (self CPU us per step): where a host-bound step spends its time, and
    any call that blocks on the device (cudaStreamSynchronize, cudaHostAlloc, pageable cudaMemcpy...)."""
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"name": e.key[:120], "self_us_per_step": e.self_cpu_time_total / max(1, steps),
             "calls_per_step": e.count / max(1, steps)} for e in rows]  # fmt: skip


def b1(lm, graphs: bool, n_tok: int = 64) -> dict:
    """n_tok batch-1 decode steps after a 128-token prompt; the prefill (and its token) runs before the profile."""
    llm = LLM(lm, EngineConfig(max_num_seqs=8, max_model_len=1024, cuda_graphs=graphs))
    p = torch.randint(0, lm.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate(p, max_tokens=16)
    llm.add_request(p[0], max_tokens=n_tok + 1)
    while not any(o.new_token_ids for o in llm.step()):
        pass
    torch.cuda.synchronize()
    times: list[float] = []
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        while llm.has_unfinished():
            for o in llm.step():
                times += o.token_times
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    itl = sorted(y - x for x, y in zip(times, times[1:], strict=False))
    res = {"graphs": graphs, "wall_s": wall, "decode_steps": len(times), "median_step_ms": 1e3 * itl[len(itl) // 2],
           **kernel_table(prof, len(times))}  # fmt: skip
    del llm
    torch.cuda.empty_cache()
    return res


def prefill(lm, n: int, runs: int = 3) -> dict:
    """The kernels of one fresh prefill of n tokens (TTFT: max_tokens=1), averaged over `runs`, with wall TTFT and
    its timeline: `timeline` splits each TTFT into the host lead (generate called -> first kernel), the GPU-busy time,
    the idle gaps between kernels (the largest named by the kernels around them) and the tail (last kernel -> the
    token on the host); `forward_return_ms` is when the model's forward returned on the host (forward hooks),
    after the call: a value below the GPU's end means the host ran ahead of the GPU."""
    llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=n + 64, max_num_batched_tokens=max(8192, n)))
    p = torch.randint(0, lm.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).tolist()
    llm.generate(p, max_tokens=1)
    torch.cuda.synchronize()
    ttft, marks, fwd = [], [], []
    hooks = [lm.model.register_forward_hook(lambda *a: fwd.append(time.perf_counter()))]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(runs):
            t0 = time.perf_counter()
            with record_function(f"anvil.ttft.{i}"):
                (o,) = llm.generate(p, max_tokens=1)
            ttft.append(1e3 * (o.token_times[0] - t0))
            marks.append((t0, o.token_times[0], [f for f in fwd if f >= t0]))
            fwd.clear()
            torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    res = {"prompt": n, "ttft_ms": ttft, "median_step_ms": sorted(ttft)[len(ttft) // 2], "wall_s": sum(ttft) / 1e3,
           **kernel_table(prof, runs), "timeline": timeline(prof, marks)}  # fmt: skip
    del llm
    torch.cuda.empty_cache()
    return res


def timeline(prof, marks: list[tuple[float, float, list[float]]], top: int = 12) -> list[dict]:
    """Per run (the profiler range anvil.ttft.i opened at perf_counter time t0, the token at t1): lead, busy, idle
    gaps and tail in ms on the profiler's clock (t1 mapped through the range's start), and the largest gaps."""
    ranges = {e.name: e.time_range.start for e in prof.events() if e.name.startswith("anvil.ttft.")}
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if is_kernel(e))
    out = []
    for i, (t0, t1, fwd) in enumerate(marks):
        start = ranges.get(f"anvil.ttft.{i}")
        if start is None:
            continue
        end = start + (t1 - t0) * 1e6
        ks = [k for k in kernels if start <= k[0] and k[1] <= end]
        if not ks:
            continue
        busy, idle, last, gaps = 0.0, 0.0, ks[0][0], []
        prev = ks[0][2]
        for s, e, name in ks:
            if s > last:
                idle += s - last
                gaps.append((s - last, prev[:60], name[:60]))
            busy += max(0.0, e - max(s, last))
            if e > last:
                last, prev = e, name
        gaps.sort(reverse=True)
        out.append({"ttft_ms": (end - start) / 1e3, "lead_ms": (ks[0][0] - start) / 1e3, "busy_ms": busy / 1e3,
                    "idle_ms": idle / 1e3, "tail_ms": (end - last) / 1e3, "kernels": len(ks),
                    "gaps_over_20us": sum(1 for g in gaps if g[0] > 20),
                    "forward_return_ms": [(f - t0) * 1e3 for f in fwd], "gpu_end_ms": (last - start) / 1e3,
                    "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps[:top]]})  # fmt: skip
    return out


def _cb_workload(lm, n: int, max_seqs: int, budget: int):
    """(a warmed-up LLM, n prompts of U(32, 2048) random tokens, their U(16, 512) output lengths), seeded."""
    c = lm.config
    rnd = random.Random(0)
    lens = [(rnd.randint(32, 2048), rnd.randint(16, 512)) for _ in range(n)]
    prompts = [torch.randint(0, c.vocab_size, (pl,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, (pl, _) in enumerate(lens)]  # fmt: skip
    llm = LLM(lm, EngineConfig(max_num_seqs=max_seqs, max_model_len=2560, max_num_batched_tokens=budget))
    llm.generate(prompts[:4], max_tokens=[4] * 4)
    return llm, prompts, [ol for _, ol in lens]


def cb(lm, n: int, max_seqs: int = 256, budget: int = 8192) -> dict:
    llm, prompts, max_tokens = _cb_workload(lm, n, max_seqs, budget)
    sched = llm.core.scheduler
    real = sched.schedule
    kinds = defaultdict(lambda: [0, 0, 0.0])  # kind -> [steps, tokens, host s in schedule]

    def schedule():
        t = time.perf_counter()
        s = real()
        k = "decode-only" if s.num_tokens == len(s.requests) else "mixed"
        kinds[k][0] += 1
        kinds[k][1] += s.num_tokens
        kinds[k][2] += time.perf_counter() - t
        return s

    sched.schedule = schedule
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, max_tokens=max_tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    del sched.schedule
    steps = sum(v[0] for v in kinds.values())
    out_tok = sum(len(o.tokens) for o in outs)
    res = {"requests": n, "wall_s": wall, "output_tok_s": out_tok / wall, "steps": steps,
           "kinds": {k: {"steps": v[0], "tokens": v[1], "schedule_ms_per_step": 1e3 * v[2] / max(1, v[0])}
                     for k, v in kinds.items()},
           **kernel_table(prof, steps, top=40), "cpu_top": cpu_table(prof, steps),
           "graphs": llm.info().get("graphs"), "graph_fallback": llm.info().get("graph_fallback")}  # fmt: skip
    res["gpu_busy_pct_of_wall"] = 100 * res["busy_us"] / 1e6 / wall
    del llm
    torch.cuda.empty_cache()
    return res


def host(lm, n: int, max_seqs: int = 256, budget: int = 8192, top: int = 45) -> dict:
    """cProfile of the host side of a continuous-batching run (the same workload as cb): Python functions and the C
    calls they block in (a sync inside a launch shows up as time in torch's copy / tensor / replay calls)."""
    import cProfile
    import io
    import pstats

    llm, prompts, max_tokens = _cb_workload(lm, n, max_seqs, budget)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    outs = llm.generate(prompts, max_tokens=max_tokens)
    torch.cuda.synchronize()
    pr.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).sort_stats("tottime")
    st.print_stats(top)
    rows = [{"func": f"{f[0].split('/')[-1]}:{f[1]}:{f[2]}", "calls": v[1], "tottime_s": round(v[2], 4),
             "cumtime_s": round(v[3], 4)} for f, v in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]]  # fmt: skip
    out_tok = sum(len(o.tokens) for o in outs)
    info = llm.info()
    res = {"requests": n, "wall_s": wall, "output_tok_s": out_tok / wall, "steps": llm.core.stats["steps"],
           "graphs": info.get("graphs"), "graph_fallback": info.get("graph_fallback"), "top_tottime": rows,
           "note": "cProfile slows Python code (not the GPU): wall is longer than an unprofiled run"}  # fmt: skip
    print(buf.getvalue()[:6000])
    del llm
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--parts", default="b1,cb")
    ap.add_argument("--cb-requests", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--quant", default=None, choices=["rtn", "nf4"], help="quantize the Linears first (int4 g128 / NF4)")
    args = ap.parse_args()
    lm = synthetic(args.preset, "bfloat16", "cuda", seed=0)
    if args.quant:
        from engine.quant import quantize_model

        quantize_model(lm.model, args.quant)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "env": gpu_record(),
                 "preset": args.preset, "quant": args.quant}  # fmt: skip
    for part in args.parts.split(","):
        try:
            if part == "b1":
                res["b1_graphs"] = b1(lm, True)
                res["b1_eager"] = b1(lm, False)
            elif part == "cb":
                res["cb"] = cb(lm, args.cb_requests)
            elif part == "host":
                res["host"] = host(lm, args.cb_requests)
            elif part == "prefill":
                res["prefill"] = prefill(lm, args.prefill_len)
        except Exception as e:  # keep the other parts
            import traceback

            traceback.print_exc()
            res[part + "_error"] = f"{type(e).__name__}: {e}"
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for k, v in res.items():
        if isinstance(v, dict) and "top" in v:
            print(f"== {k}: kernel {v['kernel_us_per_step']:.0f} us/step, busy {v['busy_us'] / 1e3:.0f} ms, "
                  f"wall {v['wall_s'] * 1e3:.0f} ms", {kk: vv for kk, vv in v.items() if kk in ("median_step_ms", "kinds", "output_tok_s")})
            print(f"  {'critical':>9}    {'duration':>9}    calls  share  (us per step; busy {v.get('busy_us_per_step', 0):.0f})")
            for r in v["top"][:25]:
                print(f"  {r.get('critical_us_per_step', 0):9.1f} us {r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x "
                      f"{r.get('critical_pct', r['pct']):5.1f}%  {r['name'][:80]}")
            for t in v.get("timeline", []):
                print(f"  timeline: ttft {t['ttft_ms']:.2f} ms = lead {t['lead_ms']:.2f} + busy {t['busy_ms']:.2f} + idle "
                      f"{t['idle_ms']:.2f} ({t['gaps_over_20us']} gaps > 20 us) + tail {t['tail_ms']:.2f}; forward returned at "
                      f"{[round(f, 2) for f in t['forward_return_ms']]} ms, GPU done at {t['gpu_end_ms']:.2f}")
                for g in t["largest_gaps"][:6]:
                    print(f"    gap {g['us']:8.1f} us after {g['after']} before {g['before']}")
            for r in v.get("cpu_top", [])[:20]:
                print(f"  host {r['self_us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['name'][:90]}")


if __name__ == "__main__":
    main()
