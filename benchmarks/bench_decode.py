"""Decode benchmark on the GPU: anvil's fast path (paged KV + Triton + CUDA graphs) vs HF transformers in one run.

Per (batch, prompt) cell: decode tok/s and ms/step (host clock at each step's tokens, as the adapters stamp),
device ms/step of back-to-back graph replays (CUDA events), TTFT, achieved weight bandwidth (GB/s and % of the
copy ceiling), KV bytes read per step, peak memory. Optional torch.profiler top kernels for batch-1 decode and
the 2k prefill. Writes one JSON (environment included) and prints a markdown table last.

Usage: python benchmarks/bench_decode.py --preset llama-3-8b --out results/gpu/decode-h100.json --profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COPY_TBS = 3.0  # measured device-to-device copy ceiling of the H100 (shared/GPU.md), TB/s


def environment() -> dict:
    from harness.envinfo import snapshot

    env = snapshot()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({type(e).__name__})"
    if not env.get("commit"):
        env["commit"] = os.environ.get("ANVIL_COMMIT", "unknown") + " (working tree, uncommitted changes)"
    env["time_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return env


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else 0.0


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (a row lookup), unless it is tied to
    the lm_head, which reads all of it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    return total - (emb.numel() * emb.element_size() if model.output is not None else 0)


def kv_bytes(config, batch: int, context: float, itemsize: int) -> float:
    return 2 * config.n_layers * config.kv_size * itemsize * batch * context


def _prompts(batch: int, n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g).tolist()


def _top_kernels(prof, n: int = 12) -> list[dict]:
    """Device kernels by self device time (CPU-side ops, which only launch them, are left out)."""
    events = list(prof.key_averages())
    dev = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    rows = []
    for e in dev or events:
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and e.key:
            rows.append({"name": e.key[:120], "device_us": round(t, 1), "count": e.count})
    rows.sort(key=lambda r: -r["device_us"])
    total = sum(r["device_us"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = round(100 * r["device_us"] / total, 1)
    return rows[:n]


@torch.inference_mode()
def graph_step_ms(fg, prompts: list[list[int]], steps: int = 48) -> float:
    """Device ms per decode step: `steps` back-to-back replays between two CUDA events (no host in the loop)."""
    bs, _ = fg.begin(prompts, steps + 2, lambda lg: lg.argmax(-1))
    fg._run_step(bs)
    if fg.device.type != "cuda":  # CPU smoke runs: host clock
        t0 = time.perf_counter()
        for _ in range(steps):
            fg._run_step(bs)
        fg.kv.release_all()
        return (time.perf_counter() - t0) * 1e3 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fg._run_step(bs)
    end.record()
    end.synchronize()
    fg.kv.release_all()
    return start.elapsed_time(end) / steps


def run_anvil(args, out: dict) -> None:
    from engine.fast_decode import FastGenerator
    from engine.presets import synthetic

    t0 = time.perf_counter()
    lm = synthetic(args.preset, args.dtype, args.device)
    _sync()
    out["load_s"] = round(time.perf_counter() - t0, 2)
    model, cfg = lm.model, lm.config
    wb = weight_bytes(model)
    out["weight_gb_per_step"] = round(wb / 1e9, 3)
    t0 = time.perf_counter()
    fg = FastGenerator(lm, max(args.batches), max(args.prompts) + max(args.new, 64), buckets=args.batches)
    _sync()
    out["init_s"] = round(time.perf_counter() - t0, 2)
    out["report"] = fg.report
    print(f"anvil init {out['init_s']} s; graphs {fg.report['graphs']} fallback {fg.report['graph_fallback']}",
          flush=True)  # fmt: skip
    for g in fg.report["gemv"]:
        print(f"  gemv {g['role']:8s} m={g['m']:<3d} best {g['best']:22s} {g['us'][g['best']]:8.1f} us "
              f"{g['gbs'][g['best']]:7.1f} GB/s | cublas {g['us'].get('cublas', 0):8.1f} us", flush=True)  # fmt: skip
    cells = out["cells"] = []
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    for prompt in args.prompts:
        for batch in args.batches:
            cell = {"engine": "anvil", "batch": batch, "prompt": prompt, "new": args.new}
            try:
                prompts = _prompts(batch, prompt, cfg.vocab_size)
                fg.generate(prompts, 4)  # warm-up of this prefill shape
                _reset_peak()
                ttft, step = [], []
                for _ in range(args.repeats):
                    times: list[float] = []
                    _sync()
                    t_sub = time.perf_counter()
                    fg.generate(prompts, args.new, on_token=lambda s, t, ts=times: ts.append(time.perf_counter()))
                    ttft.append(times[0] - t_sub)
                    step.append((times[-1] - times[0]) / (len(times) - 1))
                st = fg.last_stats
                ms = statistics.median(step) * 1e3
                dev_ms = graph_step_ms(fg, prompts)
                ctx = prompt + args.new / 2
                cell.update(
                    ttft_ms=round(statistics.median(ttft) * 1e3, 2),
                    ms_per_step=round(ms, 3),
                    decode_tok_s=round(batch / ms * 1e3, 1),
                    graph_ms_per_step=round(dev_ms, 3),
                    weight_gbs=round(wb / (ms * 1e-3) / 1e9, 1),
                    weight_pct_of_copy=round(100 * wb / (ms * 1e-3) / (COPY_TBS * 1e12), 1),
                    kv_gb_per_step=round(kv_bytes(cfg, batch, ctx, itemsize) / 1e9, 3),
                    total_gbs=round((wb + kv_bytes(cfg, batch, ctx, itemsize)) / (ms * 1e-3) / 1e9, 1),
                    peak_mem_gb=_peak_gb(),
                    kv_cache_gb=round(fg.kv.nbytes() / 1e9, 2),
                    graph=st.get("graph"),
                    host_overhead_us_per_step=round(1e6 * st["host_overhead_s"] / max(1, st["decode_steps"]), 1),
                    raw={"ttft_s": ttft, "step_s": step},
                )
            except Exception as e:
                cell["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            cells.append(cell)
            print("anvil", {k: v for k, v in cell.items() if k != "raw"}, flush=True)
    if args.profile:
        out["profile"] = profile_anvil(fg, cfg, args)
    if args.host_overhead and fg.device.type == "cuda":
        from benchmarks.host_overhead import measure

        try:
            ho = measure(fg, args.batches, prompt_len=min(args.prompts))
            ho["environment"] = args.env
            Path(args.host_overhead).parent.mkdir(parents=True, exist_ok=True)
            Path(args.host_overhead).write_text(json.dumps(ho, indent=1, default=str))
            out["host_overhead"] = ho["summary"]
            print("host overhead", json.dumps(ho["summary"]), flush=True)
        except Exception as e:
            out["host_overhead"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    del fg, lm, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def profile_anvil(fg, cfg, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    res = {}
    try:
        prompts = _prompts(1, min(args.prompts), cfg.vocab_size)
        bs, _ = fg.begin(prompts, 40, lambda lg: lg.argmax(-1))
        fg._run_step(bs)
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fg._run_step(bs)
            _sync()
        res[f"decode_b1_p{min(args.prompts)}_20_graph_replays"] = _top_kernels(prof)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):  # the same step uncaptured: per-kernel device times even if graph kernels are not traced
                fg._step(bs)
            _sync()
        fg.kv.release_all()
        res[f"decode_b1_p{min(args.prompts)}_3_eager_steps"] = _top_kernels(prof, n=16)
        prompts = _prompts(1, max(args.prompts), cfg.vocab_size)
        fg.kv.reserve(0, len(prompts[0]))
        fg.kv.sync_tables()
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fg._prefill(prompts)
            _sync()
        fg.kv.release_all()
        res[f"prefill_b1_p{max(args.prompts)}"] = _top_kernels(prof)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    for k, rows in res.items():
        if isinstance(rows, list):
            print(f"profile {k}:")
            for r in rows:
                print(f"  {r['pct']:5.1f}%  {r['device_us']:10.1f} us  x{r['count']:<5d} {r['name'][:90]}")
    return res


def run_hf(args, out: dict) -> None:
    from adapters.base import GenRequest, ModelSpec, get

    ad = get("hf")
    t0 = time.perf_counter()
    ad.load(ModelSpec(f"synthetic:{args.preset}", None, args.dtype, args.device))
    out["load_s"] = round(time.perf_counter() - t0, 2)
    cells = out["cells"] = []
    vocab = ad.model.config.vocab_size
    for prompt in args.prompts:
        for batch in args.batches:
            cell = {"engine": "hf", "batch": batch, "prompt": prompt, "new": args.new}
            try:
                prompts = _prompts(batch, prompt, vocab)
                ad.generate([GenRequest(p, 2) for p in prompts])  # warm-up
                _reset_peak()
                res = ad.generate([GenRequest(p, args.new) for p in prompts])
                r = res[0]
                n = len(r.token_times)
                ms = (r.token_times[-1] - r.token_times[0]) / (n - 1) * 1e3
                cell.update(
                    ttft_ms=round(r.ttft * 1e3, 2),
                    ms_per_step=round(ms, 3),
                    decode_tok_s=round(batch / ms * 1e3, 1),
                    peak_mem_gb=_peak_gb(),
                    tokens=n,
                )
            except Exception as e:
                cell["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            cells.append(cell)
            print("hf", cell, flush=True)
    ad.close()
    gc.collect()


def table(results: dict) -> str:
    lines = [
        "| engine | batch | prompt | decode tok/s | ms/step | graph ms/step | TTFT ms | weight GB/s | % of 3.0 TB/s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for eng in ("anvil", "hf"):
        for c in results.get(eng, {}).get("cells", []):
            if "error" in c:
                lines.append(f"| {eng} | {c['batch']} | {c['prompt']} | error: {c['error'][:60]} | | | | | | |")
                continue
            lines.append(
                f"| {eng} | {c['batch']} | {c['prompt']} | {c['decode_tok_s']:,.1f} | {c['ms_per_step']:.2f} | "
                f"{c.get('graph_ms_per_step', '-')} | {c['ttft_ms']:.1f} | {c.get('weight_gbs', '-')} | "
                f"{c.get('weight_pct_of_copy', '-')} | {c['peak_mem_gb']} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tiny presets)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="hf,anvil", help="hf first: the profiler run at the end of anvil slows eager engines")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host-overhead", default="", help="also write the host-overhead JSON here")
    ap.add_argument("--out", default="results/gpu/decode-h100.json")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    results: dict = {"version": 1, "environment": environment(), "args": vars(args).copy(),
                     "targets": {"b1_tok_s": 170, "b8_tok_s": 1200, "b32_tok_s": 3500, "ttft_2k_ms": 55}}  # fmt: skip
    args.env = results["environment"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for eng in args.engines.split(","):
        results[eng] = {}
        try:
            (run_anvil if eng == "anvil" else run_hf)(args, results[eng])
        except Exception as e:
            results[eng]["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        results["table"] = table(results)
        out.write_text(json.dumps(results, indent=1, default=str))  # after each engine: a crash keeps the rest
    print(results["table"])


if __name__ == "__main__":
    main()
