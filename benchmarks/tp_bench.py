"""Tensor-parallel scaling: TP=1 vs TP=2 (or any sizes) in one run, through public APIs (engine.distributed.launch,
EngineConfig, synthetic presets). Per model shape and TP size, in fresh processes (one per rank, spawned):
decode tok/s at batch 1/8/32 (128-token prompts; step = the median gap between tokens, as benchmarks/core_bench.py),
TTFT of a 2,048-token prompt, and the all-reduce / all-gather time per decode step from torch.profiler (NCCL
kernels' device time on GPUs, gloo's host time on the CPU). Then the check that greedy tokens under TP=k equal
TP=1's on the trained tiny model (float32), with the max |logit difference|. Writes one JSON.

2 GPUs (NVLink multicast stays off; the launcher sets these where unset, they are spelled out here anyway):
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
    python3 benchmarks/tp_bench.py --tp 1,2 --models llama-3-8b,llama-3-70b:40 --out results/gpu/tp-h200x2.json
CPU dry run (TP=1 only, tiny preset):
  PYTHONPATH=. python benchmarks/tp_bench.py --device cpu --dtype float32 --tp 1 --models tiny-test \\
    --batches 1,8 --prompt-ttft 256 --gen 16 --profile-tp1 --threads 1 --out results/cpu/tp-dryrun.json

A model is PRESET or PRESET:LAYERS (the preset's shapes with fewer layers: llama-3-70b:40 is 35B parameters, 70 GB
in bf16, so TP=1 fits on one 141 GB GPU while every layer has the 70B's shapes). A case whose weights do not fit
(bytes per rank > 90% of the GPU) is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.config import EngineConfig  # noqa: E402
from engine.distributed import launch, state  # noqa: E402

COMM_KEYS = {"all_reduce": ("allreduce", "all_reduce"), "all_gather": ("allgather", "all_gather")}


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _comm_profile(llm, prompts, gen: int, device: str) -> dict:
    """torch.profiler over one decode run: communication time per engine step (device time of NCCL kernels on
    CUDA, host time of gloo's ops on the CPU), split into all-reduce and all-gather."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    steps0 = llm.core.stats["steps"]
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        llm.generate(prompts, max_tokens=gen)
        _sync(device)
    wall = time.perf_counter() - t0
    steps = llm.core.stats["steps"] - steps0
    out: dict = {"steps": steps, "wall_s_profiled": wall}
    cuda = device.startswith("cuda")
    for kind, needles in COMM_KEYS.items():
        us = calls = 0.0
        for e in prof.key_averages():
            k = e.key.lower()
            if not any(n in k for n in needles):
                continue
            if cuda:  # NCCL kernels (a CUDA-graph replay shows only these): summed device time
                d = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
                if "nccl" in k and d:
                    us, calls = us + d, calls + e.count
            else:  # gloo's op and its record_function nest: the outermost (largest) one
                if e.cpu_time_total > us:
                    us, calls = e.cpu_time_total, e.count
        out[kind] = {"ms_per_step": us / 1e3 / max(1, steps), "calls_per_step": calls / max(1, steps),
                     "measured_as": "NCCL kernel device time" if cuda else "gloo host time"}
    return out


def bench_rank(model: str, n_layers: int | None, a: dict) -> dict | None:
    """One (model, TP) case on every rank; rank 0 returns the numbers."""
    world = state.world_size()
    cfg = EngineConfig(max_num_seqs=max(a["batches"]), max_model_len=max(a["prompt_ttft"], 128 + a["gen"]) + 16,
                       tensor_parallel_size=world, gemv=a["gemv"], cuda_graphs=a["graphs"],
                       graph_buckets=tuple(a["batches"]) if a["graphs"] else None)  # fmt: skip
    t0 = time.perf_counter()
    llm = launch.build_llm(model, a["dtype"], a["device"], cfg, synthetic=True, n_layers=n_layers)
    load_s = time.perf_counter() - t0
    dev = launch.rank_device(a["device"])
    c = llm.lm.config
    res: dict = {"model": model, "n_layers": c.n_layers, "tp": world, "params": c.num_params, "load_s": load_s,
                 "info": llm.info(), "decode": {}}  # fmt: skip
    for b in a["batches"]:
        prompts = _prompts(b, 128, c.vocab_size, b)
        llm.generate(prompts, max_tokens=4)  # warm-up
        runs = []
        for _ in range(a["repeats"]):
            _sync(dev)
            t = time.perf_counter()
            outs = llm.generate(prompts, max_tokens=a["gen"])
            wall = time.perf_counter() - t
            itl = [y - x for o in outs for x, y in zip(o.token_times[1:], o.token_times[2:], strict=False)]
            step = statistics.median(itl) if itl else wall
            runs.append({"step_ms": step * 1e3, "decode_tok_s": b / step, "wall_s": wall})
        best = dict(max(runs, key=lambda r: r["decode_tok_s"]))
        best["runs"] = runs
        best["comm"] = None
        if world > 1 or a["profile_tp1"]:
            try:
                best["comm"] = _comm_profile(llm, prompts, min(a["gen"], 16), dev)
            except Exception as e:  # the profiler must not cost the case its numbers
                best["comm_error"] = f"{type(e).__name__}: {e}"
        res["decode"][str(b)] = best
        if state.rank() == 0:
            cm = best["comm"]
            ar = f", all-reduce {cm['all_reduce']['ms_per_step']:.3f} ms/step" if cm else best.get("comm_error", "")
            print(f"  {model}:{c.n_layers} TP={world} b{b}: {best['decode_tok_s']:.1f} tok/s, "
                  f"step {best['step_ms']:.3f} ms{ar}", flush=True)  # fmt: skip
    p = _prompts(1, a["prompt_ttft"], c.vocab_size, 7)
    llm.generate(p, max_tokens=1)
    ttft = []
    for _ in range(a["repeats"] + 1):
        _sync(dev)
        t = time.perf_counter()
        (o,) = llm.generate(p, max_tokens=1)
        ttft.append((o.token_times[0] - t) * 1e3)
    res["ttft_ms"] = {"prompt_len": a["prompt_ttft"], "median": statistics.median(ttft), "all": ttft}
    if state.rank() == 0:
        print(f"  {model}:{c.n_layers} TP={world} TTFT {a['prompt_ttft']}: {statistics.median(ttft):.2f} ms", flush=True)
    return res if state.rank() == 0 else None


def tiny_rank(device: str, n_new: int, graphs: bool) -> dict:
    """Greedy tokens (decode through CUDA graphs when `graphs`) and logits of the trained tiny model (float32)."""
    cfg = EngineConfig(max_num_seqs=4, max_model_len=256, tensor_parallel_size=state.world_size(), cuda_graphs=graphs)
    llm = launch.build_llm("tiny", "float32", device, cfg)
    prompts = [_prompts(1, n, 4096, n)[0] for n in (5, 17, 40, 64)]
    return {"tokens": [o.tokens for o in llm.generate(prompts, max_tokens=n_new)],
            "logits": [llm.logits(p) for p in prompts]}  # fmt: skip


def fits(model: str, n_layers: int | None, tp: int, a: dict) -> str | None:
    """Why the case cannot run (fewer GPUs than ranks; weights per rank past 90% of the GPU), or None."""
    if not a["device"].startswith("cuda"):
        return None
    if torch.cuda.device_count() < tp:
        return f"needs {tp} GPUs, {torch.cuda.device_count()} visible"
    from dataclasses import replace

    from engine.presets import PRESETS

    c = PRESETS[model] if n_layers is None else replace(PRESETS[model], n_layers=n_layers)
    per_rank = c.num_params * torch.empty((), dtype=getattr(torch, a["dtype"])).element_size() / tp
    total = torch.cuda.get_device_properties(0).total_memory
    if per_rank > 0.9 * total:
        return f"weights {per_rank / 1e9:.1f} GB per rank > 90% of the GPU's {total / 1e9:.1f} GB"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", default="1,2", help="TP sizes, comma-separated (each <= GPUs)")
    ap.add_argument("--models", default="llama-3-8b,llama-3-70b:40", help="PRESET[:LAYERS], comma-separated")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--gen", type=int, default=64, help="tokens per decode run")
    ap.add_argument("--prompt-ttft", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gemv", default="tune", choices=["tune", "cublas", "triton"])
    ap.add_argument("--profile-tp1", action="store_true", help="profile TP=1 too (no collectives: a 0 baseline)")
    ap.add_argument("--tiny-tokens", type=int, default=32, help="greedy tokens of the tiny TP check (0: skip it)")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (every collective under the watchdog)")
    ap.add_argument("--case-timeout", type=float, default=540.0, help="kill a case's ranks after this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank on the CPU (default cores / TP)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    state.multicast_off()
    from harness.envinfo import snapshot

    a = {"batches": [int(x) for x in args.batches.split(",")], "gen": args.gen, "prompt_ttft": args.prompt_ttft,
         "repeats": args.repeats, "device": args.device, "dtype": args.dtype, "gemv": args.gemv,
         "profile_tp1": args.profile_tp1, "graphs": args.device.startswith("cuda") and not args.no_graphs}  # fmt: skip
    tps = [int(x) for x in args.tp.split(",")]
    out: dict = {"argv": sys.argv, "args": a, "tp": tps, "env": snapshot(),
                 "env_vars": {k: os.environ.get(k) for k in state.NO_MULTICAST}, "cases": []}  # fmt: skip
    if args.device.startswith("cuda"):
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpus"] = torch.cuda.device_count()
    t_all = time.perf_counter()
    for spec in args.models.split(","):
        model, _, layers = spec.partition(":")
        n_layers = int(layers) if layers else None
        for tp in tps:
            why = fits(model, n_layers, tp, a)
            print(f"{spec} TP={tp}" + (f": skipped ({why})" if why else ""), flush=True)
            if why:
                out["cases"].append({"model": model, "n_layers": n_layers, "tp": tp, "skipped": why})
                continue
            try:
                out["cases"].append(launch.spawn(bench_rank, tp, (model, n_layers, a), device=args.device,
                                             threads=args.threads, deadline_s=args.case_timeout)[0])
            except launch.TPLaunchError as e:
                print(f"  failed: {e}", flush=True)
                out["cases"].append({"model": model, "n_layers": n_layers, "tp": tp, "failed": str(e)})
    ok = {(c["model"], c["n_layers"], c["tp"]): c for c in out["cases"] if "decode" in c}
    out["scaling"] = []
    for (m, nl, tp), c in ok.items():
        base = ok.get((m, nl, 1))
        if tp == 1 or base is None:
            continue
        out["scaling"].append({"model": m, "n_layers": nl, "tp": tp, "ttft_speedup": base["ttft_ms"]["median"] / c["ttft_ms"]["median"],
                               "decode_speedup": {b: c["decode"][b]["decode_tok_s"] / base["decode"][b]["decode_tok_s"]
                                                  for b in c["decode"]}})  # fmt: skip
    if args.tiny_tokens:
        ref = None
        out["tiny_check"] = []
        for tp in sorted(set(tps) | {1}):
            try:
                r = launch.spawn(tiny_rank, tp, (args.device, args.tiny_tokens, a["graphs"]), device=args.device,
                                 threads=args.threads, deadline_s=args.case_timeout)
            except launch.TPLaunchError as e:
                print(f"tiny TP={tp} failed: {e}", flush=True)
                out["tiny_check"].append({"tp": tp, "failed": str(e), "greedy_tokens_equal_tp1_on_every_rank": False})
                continue
            if ref is None:
                ref = r[0]
            d = max((x - y).abs().max().item() for x, y in zip(r[0]["logits"], ref["logits"], strict=True))
            same = all(x["tokens"] == ref["tokens"] for x in r)
            out["tiny_check"].append({"tp": tp, "greedy_tokens_equal_tp1_on_every_rank": same, "max_abs_dlogit": d,
                                      "n_prompts": len(ref["tokens"]), "n_new": args.tiny_tokens})  # fmt: skip
            print(f"tiny TP={tp}: greedy {args.tiny_tokens} tokens equal TP=1 on every rank: {same}; "
                  f"max |dlogit| {d:.3g}", flush=True)  # fmt: skip
    out["wall_s"] = time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    bad = [c for c in out.get("tiny_check", []) if not c["greedy_tokens_equal_tp1_on_every_rank"]]
    return 1 if bad or any("failed" in c for c in out["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
