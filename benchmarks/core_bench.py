"""The generation core on a GPU, through public APIs only (engine.LLM / EngineConfig / presets): decode tok/s at
batch 1/8/32 with weight bandwidth against the copy bandwidth measured in the same process, TTFT at a 2,048-token
prompt, host time per step, continuous vs static batching on a random workload, and long-context chunked prefill
peak memory. Writes one JSON.

  python benchmarks/core_bench.py --out results/gpu/core-h200.json [--parts decode,cb,long,ttft] [--preset llama-3-8b]
      [--quant rtn|nf4]   (the Linears quantized first: int4 g128 RTN / NF4; weight bytes as stored)
      [--options JSON]    (EngineConfig fields for the decode and ttft parts) [--ttft-lens 1024,2048,4096]
      [--batches 1,8,32]  (decode batch sizes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import time

import torch

import engine
from engine import LLM, EngineConfig
from engine.presets import synthetic
from harness.envinfo import copy_bandwidth_gb_s


def env() -> dict:
    import subprocess

    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    import os

    return {"gpu": torch.cuda.get_device_name(), "driver": drv, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": os.environ.get("ANVIL_COMMIT"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def timed_generate(llm: LLM, prompts, max_tokens) -> tuple[list, float, dict]:
    """Completions, wall seconds, and host-side step statistics: time in step() blocked on the GPU (`wait_s`) and
    host seconds per phase (schedule, build inputs, launch the forward or graph, sample + token copy, process the
    previous step's tokens), measured by wrapping the core's own methods."""
    core = llm.core
    phases = {"wait": 0.0, "schedule": 0.0, "inputs": 0.0, "graph": 0.0, "eager": 0.0, "sample": 0.0, "process": 0.0}
    calls = dict.fromkeys(phases, 0)
    steps = [0]
    wrapped = []

    def wrap(obj, name, key, count=False):
        real = getattr(obj, name)

        def f(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                phases[key] += time.perf_counter() - t
                calls[key] += 1
                if count:
                    steps[0] += 1

        setattr(obj, name, f)
        wrapped.append((obj, name))

    import engine.worker.model_runner as mr

    real_wait = mr.StepHandle.wait

    def w(self):
        t = time.perf_counter()
        r = real_wait(self)
        phases["wait"] += time.perf_counter() - t
        return r

    r = core.runner
    wrap(core.scheduler, "schedule", "schedule", count=True)
    wrap(r, "_inputs", "inputs")
    wrap(r, "sample", "sample")
    wrap(r.model, "forward", "eager")  # an eager forward (mixed steps, decode batches without a graph)
    if r.graphs is not None:
        wrap(r.graphs, "run", "graph")  # copy-in + replay of a captured decode step
    wrap(core, "_process", "process")
    mr.StepHandle.wait = w
    _sync()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, max_tokens=max_tokens)
    finally:
        mr.StepHandle.wait = real_wait
        for obj, name in wrapped:
            delattr(obj, name)
    _sync()
    wall = time.perf_counter() - t0
    phases["process"] -= phases["wait"]  # _process includes the wait
    calls.pop("wait")
    return outs, wall, {"wait_s": phases.pop("wait"), "steps": steps[0],
                        "host_ms_per_step": {k: 1e3 * v / max(1, steps[0]) for k, v in phases.items()},
                        "host_ms_per_call": {k: 1e3 * v / calls[k] for k, v in phases.items() if calls[k]},
                        "calls": calls}  # fmt: skip


def decode_part(lm, copy_gbs: float, quant: str | None = None, options: dict | None = None,
                batches: tuple[int, ...] = (1, 8, 32)) -> dict:  # fmt: skip
    c = lm.config
    weight_bytes = lm.model.decode_weight_bytes() if quant else c.decode_read_params * 2
    base = {"max_num_seqs": max(32, *batches), "max_model_len": 2304, "max_num_batched_tokens": 8192}
    llm = LLM(lm, EngineConfig.from_options({**base, **(options or {})}))
    out: dict = {"info": llm.info(), "weight_gb": weight_bytes / 1e9, "copy_gb_s": copy_gbs, "decode": {}}
    for b in batches:
        prompts = _prompts(b, 128, c.vocab_size, b)
        llm.generate(prompts, max_tokens=8)  # warm-up
        runs = []
        for _ in range(3):
            outs, wall, st = timed_generate(llm, prompts, 128)
            itl = [y - x for o in outs for x, y in zip(o.token_times[1:], o.token_times[2:], strict=False)]
            step = statistics.median(itl)
            host = (wall - st["wait_s"]) / max(1, st["steps"])
            runs.append({"step_ms": step * 1e3, "decode_tok_s": b / step, "wall_s": wall,
                         "host_ms_per_step_not_waiting": host * 1e3, "host_us_per_token": host * 1e6 / b,
                         "host_ms_per_step_by_phase": st["host_ms_per_step"]})  # fmt: skip
        best = dict(max(runs, key=lambda r: r["decode_tok_s"]))
        best["weight_gb_s"] = weight_bytes / (best["step_ms"] / 1e3) / 1e9
        best["pct_copy"] = 100 * best["weight_gb_s"] / copy_gbs
        best["runs"] = runs
        out["decode"][str(b)] = best
        print(f"b{b}: {best['decode_tok_s']:.1f} tok/s, step {best['step_ms']:.3f} ms, "
              f"{best['pct_copy']:.1f}% of copy, host {best['host_us_per_token']:.1f} us/token", flush=True)
    ttft = []
    p = _prompts(1, 2048, c.vocab_size, 7)
    llm.generate(p, max_tokens=1)
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (o,) = llm.generate(p, max_tokens=1)
        ttft.append((o.token_times[0] - t0) * 1e3)
    out["ttft_2048_ms"] = {"median": statistics.median(ttft), "all": ttft}
    print(f"TTFT 2048: {statistics.median(ttft):.2f} ms", flush=True)
    _release(llm)
    return out


def ttft_part(lm, lens: list[int], options: dict | None = None, runs: int = 7) -> dict:
    """TTFT (ms, wall: generate called -> the first token on the host) of one fresh prompt per length, alone in the
    engine: the median of `runs` after one warm-up call at that length (so one-time per-shape costs stay out)."""
    c = lm.config
    base = {"max_num_seqs": 4, "max_model_len": max(lens) + 64, "max_num_batched_tokens": max(8192, max(lens))}
    llm = LLM(lm, EngineConfig.from_options({**base, **(options or {})}))
    info = llm.info()
    out: dict = {"options": options or {}, "fresh_attention": info.get("fresh_attention"),
                 "fresh_pad": info.get("fresh_pad"), "ttft_ms": {}}  # fmt: skip
    for n in lens:
        p = _prompts(1, n, c.vocab_size, 7)
        llm.generate(p, max_tokens=1)
        ts = []
        for _ in range(runs):
            _sync()
            t0 = time.perf_counter()
            (o,) = llm.generate(p, max_tokens=1)
            ts.append((o.token_times[0] - t0) * 1e3)
        out["ttft_ms"][str(n)] = {"median": statistics.median(ts), "min": min(ts), "all": ts}
        print(f"TTFT {n}: {statistics.median(ts):.2f} ms (min {min(ts):.2f}) {options or ''}", flush=True)
    _release(llm)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release(llm) -> None:
    """Free an LLM's KV pool and graphs before the next one is built (the pool is sized from free memory)."""
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cb_part(lm, n: int = 512, prompt: tuple[int, int] = (32, 2048), output: tuple[int, int] = (16, 512),
            max_seqs: int = 256, static_batch: int = 32) -> dict:
    """Continuous batching (all requests added at once, the scheduler mixes prefill chunks and decode) vs static
    batching (the same engine, batches of 32 run to completion one after another), same requests."""
    c = lm.config
    rnd = random.Random(0)
    lens = [(rnd.randint(*prompt), rnd.randint(*output)) for _ in range(n)]
    prompts = [torch.randint(0, c.vocab_size, (pl,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, (pl, _) in enumerate(lens)]  # fmt: skip
    outs_n = [ol for _, ol in lens]
    total_out = sum(outs_n)
    res = {"requests": n, "prompt_len": f"U{prompt}", "output_len": f"U{output}", "output_tokens": total_out,
           "device": str(lm.model.device)}  # fmt: skip
    mlen = prompt[1] + output[1]
    warm = list(range(0, n, max(1, n // 24)))[:24]  # a short mixed run first: kernels compiled, allocator warm

    def warmup(llm) -> None:
        llm.generate([prompts[i] for i in warm], max_tokens=[8] * len(warm))
        _sync()

    llm = LLM(lm, EngineConfig(max_num_seqs=max_seqs, max_model_len=mlen, max_num_batched_tokens=8192))
    warmup(llm)
    outs, wall, st = timed_generate(llm, prompts, outs_n)
    assert sum(len(o.tokens) for o in outs) == total_out
    res["continuous"] = {"wall_s": wall, "output_tok_s": total_out / wall, "preemptions": llm.core.scheduler.num_preemptions,
                         "steps": st["steps"], "gpu_wait_s": st["wait_s"], "host_ms_per_step": st["host_ms_per_step"],
                         "host_ms_per_call": st["host_ms_per_call"], "calls": st["calls"],
                         "graphs": llm.info().get("graphs"), "graph_fallback": llm.info().get("graph_fallback"),
                         "kv": llm.info()["kv"], "max_num_seqs": max_seqs}  # fmt: skip
    print(f"continuous: {total_out / wall:.0f} output tok/s ({wall:.1f} s, {st['steps']} steps, "
          f"{st['wait_s']:.1f} s waiting on the GPU); host ms per call {st['host_ms_per_call']}, calls {st['calls']}",
          flush=True)
    _release(llm)
    sb = static_batch
    llm = LLM(lm, EngineConfig(max_num_seqs=sb, max_model_len=mlen, max_num_batched_tokens=8192))
    warmup(llm)
    t0 = time.perf_counter()
    for s in range(0, n, sb):
        mx = max(outs_n[s : s + sb])  # a static batch runs until its longest request is done
        llm.generate(prompts[s : s + sb], max_tokens=mx)
    _sync()
    wall = time.perf_counter() - t0
    res["static"] = {"wall_s": wall, "output_tok_s": total_out / wall, "batch": sb}
    res["speedup"] = res["continuous"]["output_tok_s"] / res["static"]["output_tok_s"]
    print(f"static({sb}): {total_out / wall:.0f} output tok/s ({wall:.1f} s); speed-up {res['speedup']:.2f}x", flush=True)
    _release(llm)
    return res


def long_part(lm, length: int) -> dict:
    c = lm.config
    p = _prompts(1, length, c.vocab_size, 3)
    res = {"prompt_len": length, "runs": {}}
    for chunk in (8192, 2048, None):
        budget = chunk or length
        llm = LLM(lm, EngineConfig(max_num_seqs=1, max_model_len=length + 64, max_num_batched_tokens=budget,
                                   chunked_prefill=chunk is not None, prefill_chunk=chunk, cuda_graphs=True))  # fmt: skip
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        (o,) = llm.generate(p, max_tokens=32)
        wall = time.perf_counter() - t0
        if o.error:
            raise RuntimeError(f"chunk {chunk}: {o.error}")
        ttft = o.token_times[0] - t0
        itl = [y - x for x, y in zip(o.token_times[1:], o.token_times[2:], strict=False)]
        peak = torch.cuda.max_memory_allocated() - base
        r = {"ttft_s": ttft, "prefill_tok_s": length / ttft, "decode_tok_s": 1 / statistics.median(itl),
             "peak_activation_gb": peak / 1e9, "wall_s": wall}  # fmt: skip
        res["runs"][str(chunk or "none")] = r
        print(f"{length} chunk {chunk}: TTFT {ttft:.2f} s, peak activations {peak / 1e9:.2f} GB, "
              f"decode {r['decode_tok_s']:.0f} tok/s", flush=True)
        _release(llm)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--parts", default="decode,cb,long")
    ap.add_argument("--long-len", type=int, default=131008)
    ap.add_argument("--model", default="", help="a model folder or name (e.g. tiny) instead of --preset")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    ap.add_argument("--cb", default="512,32,2048,16,512", help="requests,prompt_lo,prompt_hi,out_lo,out_hi")
    ap.add_argument("--quant", default=None, choices=["rtn", "nf4"], help="quantize the Linears first (int4 g128 / NF4)")
    ap.add_argument("--options", default="{}", help="EngineConfig fields as JSON for the decode and ttft parts, "
                    'e.g. \'{"fresh_attention": "sdpa", "fresh_pad": 256}\'')
    ap.add_argument("--ttft-lens", default="1024,2048,4096", help="--parts ttft: prompt lengths (tokens)")
    ap.add_argument("--batches", default="1,8,32", help="--parts decode: batch sizes (max_num_seqs: the largest, >= 32)")
    args = ap.parse_args()
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"expected a JSON object of EngineConfig fields, got {args.options!r}")
        EngineConfig.from_options(options)
    except (ValueError, TypeError) as e:
        ap.error(f"--options: {e}")
    parts = args.parts.split(",")
    cuda = args.device == "cuda"
    if not cuda and "decode" in parts:
        ap.error("--parts decode times against the GPU's copy bandwidth: it needs --device cuda (cb and long run on a CPU)")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = "bfloat16" if cuda else "float32"
    res = {"env": env() if cuda else {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                                      "python": platform.python_version(), "threads": torch.get_num_threads(),
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "engine": engine.__version__, "model": args.model or f"synthetic:{args.preset}", "dtype": dtype,
           "quant": args.quant, "options": options,
           "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ANVIL_") and k != "ANVIL_COMMIT"}}  # fmt: skip
    if cuda:
        res["copy_gb_s"] = copy_bandwidth_gb_s()
        print(f"copy bandwidth {res['copy_gb_s']:.0f} GB/s", flush=True)
    if args.model:
        lm = engine.load(engine.hub.resolve(args.model), dtype, args.device)
    else:
        lm = synthetic(args.preset, dtype, args.device, seed=0)
    if args.quant:
        from engine.quant import quantize_model

        quantize_model(lm.model, args.quant)
    n, plo, phi, olo, ohi = (int(x) for x in args.cb.split(","))
    for part in parts:
        try:
            if part == "decode":
                res["decode"] = decode_part(lm, res["copy_gb_s"], args.quant, options,
                                            tuple(int(x) for x in args.batches.split(",")))
            elif part == "ttft":
                res["ttft"] = ttft_part(lm, [int(x) for x in args.ttft_lens.split(",")], options)
            elif part == "cb":
                res["continuous_batching"] = cb_part(lm, n, (plo, phi), (olo, ohi), 256 if cuda else 64, 32 if cuda else 8)
            elif part == "long":
                res["long_context"] = long_part(lm, args.long_len)
        except Exception as e:  # one failed part must not lose the others
            import traceback

            traceback.print_exc()
            res[part + "_error"] = f"{type(e).__name__}: {e}"
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
