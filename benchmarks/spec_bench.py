"""Speculative decoding, measured. Two modes:

  python benchmarks/spec_bench.py [--device cpu|cuda] [--out results/cpu/spec-tiny.json]
      the tiny / tiny-draft pair on held-out code prompts (the stdlib modules models/README.md holds out): plain
      greedy decode vs every proposer (draft, ngram, lookahead, medusa) at a few k, at batch 1 (requests one after
      another) and batch 16 (all at once): tok/s, speed-up over plain, per-token latency, acceptance rate (accepted
      / proposed drafts), mean accepted length (tokens per verify step, the target's own token included), and
      whether the output equals plain greedy token for token (lossless).

  python benchmarks/spec_bench.py --verify-cost [--from results/cpu/spec-tiny.json] [--out results/gpu/spec-verify-cost.json]
      on the Llama-3-8B shape (synthetic:llama-3-8b, bf16, cuda): the time of one forward of k+1 tokens per
      sequence over a cached 1,024-token context vs one token (eager, and a CUDA-graph replay for 1), at batch 1
      and 8, k = 1..8; then a PROJECTION of the speed-up at the acceptance rates measured on the tiny pair:
      E = (1 - a^(k+1)) / (1 - a) tokens per step for acceptance a, speed-up = E * t(1) / (t(k+1) + t_draft),
      t_draft = 0 for n-gram / lookahead (host-side) and k one-token steps of a Llama-3.2-1B-shaped draft.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

import engine  # noqa: E402
from engine import LLM, EngineConfig  # noqa: E402

HELD_OUT = ("argparse", "json", "shlex", "fractions", "dataclasses", "zipfile", "calendar", "string")
CONFIGS = [("plain", 0), ("ngram", 4), ("ngram", 8), ("ngram", 16), ("lookahead", 4), ("lookahead", 8), ("draft", 2), ("draft", 4),
           ("medusa", 2), ("medusa", 4)]  # fmt: skip


def code_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out modules, each ending at a line break mid-file."""
    import importlib

    srcs = [inspect.getsource(importlib.import_module(m)) for m in HELD_OUT]
    out = []
    for i in range(n):
        ids = tok.encode(srcs[i % len(srcs)])
        end = min(len(ids), length + (len(ids) - length) * (1 + i // len(srcs)) // 3)
        out.append(ids[end - length : end])
    return out


def options(spec: str, k: int) -> dict:
    if spec == "plain":
        return {}
    extra = {"draft": {"draft_model": "tiny-draft"}, "medusa": {"draft_model": str(REPO / "models" / "tiny")}}
    return {"spec": spec, "num_spec_tokens": k, **extra.get(spec, {})}


def make_llm(lm, spec: str, k: int, base: dict, warm: list[int]) -> LLM:
    llm = LLM(lm, EngineConfig(**base, **options(spec, k)))
    llm.generate([warm], max_tokens=16)  # warm-up (allocator, first-call paths); its drafts do not count
    if llm.core.spec is not None:
        llm.core.spec.totals.update(verify_steps=0, proposed=0, accepted=0, propose_s=0.0)
    return llm


def run_batch(lm, prompts, gen: int, batch: int, specs: list[str], repeats: int, extra: dict) -> list[dict]:
    """Every config over the same prompt chunks, interleaved (chunk by chunk, the order rotating), so that a
    shared machine's load changes hit all configs alike."""
    base = {"max_num_seqs": batch, "max_model_len": len(prompts[0]) + gen + 16, "max_num_batched_tokens": 4096,
            **extra}
    cfgs = [c for c in CONFIGS if c[0] == "plain" or c[0] in specs]
    llms = {c: make_llm(lm, *c, base, prompts[0][:32]) for c in cfgs}
    sync = torch.cuda.synchronize if lm.model.device.type == "cuda" else (lambda: None)
    acc = {c: {"wall": 0.0, "tokens": 0, "outs": [None] * len(prompts), "per_tok": []} for c in cfgs}
    chunks = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    turn = 0
    for _ in range(repeats):
        for chunk in chunks:
            turn += 1
            for c in cfgs[turn % len(cfgs) :] + cfgs[: turn % len(cfgs)]:
                sync()
                t0 = time.perf_counter()
                comps = llms[c].generate([prompts[i] for i in chunk], max_tokens=gen)
                sync()
                a = acc[c]
                a["wall"] += time.perf_counter() - t0
                for i, comp in zip(chunk, comps, strict=True):
                    a["outs"][i] = comp.tokens
                    a["tokens"] += len(comp.tokens)
                    a["per_tok"].append((comp.token_times[-1] - comp.token_times[0]) / (len(comp.tokens) - 1))
    rows = []
    plain = acc[("plain", 0)]
    for (spec, k), a in acc.items():
        row = {"spec": spec, "k": k, "batch": batch, "tokens": a["tokens"], "wall_s": round(a["wall"], 3),
               "tok_s": round(a["tokens"] / a["wall"], 1), "speedup": round(plain["wall"] / a["wall"], 3),
               "ms_per_token": round(1e3 * statistics.mean(a["per_tok"]), 3)}  # fmt: skip
        info = llms[(spec, k)].info().get("spec")
        if info:
            row.update({x: info[x] for x in ("proposed", "accepted", "verify_steps")})
            row["propose_s"] = round(info["propose_s"], 3)
            for x in ("acceptance_rate", "mean_accepted_len"):
                row[x] = None if info[x] is None else round(info[x], 4)
        row["lossless"] = a["outs"] == plain["outs"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def tiny_mode(args) -> None:
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    lm = engine.load("tiny", dtype, args.device)
    prompts = code_prompts(lm.tokenizer, args.prompts, args.prompt_len)
    rows = []
    for batch in args.batches:
        extra = {"gemv": args.gemv} if args.gemv else {}
        rows += run_batch(lm, prompts, args.gen, batch, args.specs, args.repeats if batch > 1 else 1, extra)
    best = max((r for r in rows if r["spec"] != "plain" and r["lossless"]), key=lambda r: r["speedup"], default=None)
    result = {
        "what": "speculative decoding on the tiny / tiny-draft pair, greedy, held-out stdlib code prompts",
        "command": " ".join(["python", "benchmarks/spec_bench.py"] + sys.argv[1:]),
        "model": "tiny (draft: tiny-draft; medusa: models/tiny/medusa)", "dtype": dtype, "device": args.device,
        "prompts": args.prompts, "prompt_len": args.prompt_len, "gen_len": args.gen, "held_out_modules": HELD_OUT,
        "torch_threads": args.threads,
        "notes": ["speedup = plain wall time / this config's wall time over the same prompts; configs run "
                  "interleaved prompt chunk by prompt chunk (rotating order), so load changes hit all alike",
                  "batch 1 runs the prompts one after another; batch 16 all at once (repeated --repeats times)",
                  "acceptance_rate = accepted / proposed drafts; mean_accepted_len = tokens per verify step "
                  "(accepted drafts + the target's own token)",
                  "ms_per_token = mean over requests of (last token time - first token time) / (tokens - 1)",
                  "lossless = every output equals plain greedy token for token"],
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
                platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                **(_gpu_record() if args.device == "cuda" else {})},  # fmt: skip
        "best": None if best is None else {x: best[x] for x in ("spec", "k", "batch", "speedup")},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}; best lossless: {result['best']}")


# ---------------------------------------------------------------- --verify-cost (GPU)
DRAFT_1B = dict(model_type="llama", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True)  # Llama-3.2-1B shape


def _random_model(config, dtype, device):
    """Random weights of a config, made on the device (engine.presets.synthetic's recipe for any config)."""
    from engine.model.llama import LoadedModel, Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    state = {n: torch.empty(s, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g) for n, s in shapes.items()}
    for n in state:
        if n.endswith("norm.weight"):
            state[n].fill_(1.0)
    return LoadedModel(Transformer.from_state_dict(config, state), config)


def _gpu_record() -> dict:
    from harness.envinfo import gpu_record

    return gpu_record()


def time_forward(llm: LLM, batch: int, q_len: int, ctx: int, reps: int, graph: bool = False) -> float:
    """Median ms of one forward of `batch` sequences with q_len new tokens over ctx cached ones."""
    from engine.request import Request

    core = llm.core
    r = core.runner
    reqs = [Request([1] * (ctx + q_len), max_tokens=1) for _ in range(batch)]
    for q in reqs:
        assert core.blocks.allocate(q, ctx + q_len)
    try:
        ids = [7] * (batch * q_len)
        pos = [p for _ in range(batch) for p in range(ctx, ctx + q_len)]
        lens = [ctx + q_len] * batch
        tables = [q.block_ids for q in reqs]
        if graph and q_len == 1 and r.graphs is not None:
            fn = lambda: r.graphs.run(ids, pos, lens, tables, [], None)  # noqa: E731
        else:
            b = r.build_batch(ids, pos, [i for i in range(batch) for _ in range(q_len)],
                         [i * q_len for i in range(batch + 1)], lens, tables, batch if q_len == 1 else 0,
                         list(range(batch * q_len)))  # fmt: skip
            fn = lambda: r.model(b)  # noqa: E731
            if graph:  # the batch's tensors are static: a graph of this very forward (as VerifyGraphs replays)
                from engine.worker.graph_capture import GraphRunner

                gr = GraphRunner(r.device)
                with torch.inference_mode():
                    gr.capture(lambda _: r.model(b), [batch], lambda: None)
                if gr.fallback:
                    raise RuntimeError(gr.fallback)
                fn = lambda: gr.run(batch, None)  # noqa: E731
        with torch.inference_mode():
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
        return statistics.median(times)
    finally:
        for q in reqs:
            core.blocks.free(q)


def verify_cost_mode(args) -> None:
    from engine.config import ModelConfig
    from engine.presets import synthetic

    assert torch.cuda.is_available(), "--verify-cost needs a CUDA device"
    ctx, ks, batches = args.ctx, list(range(1, 9)), [1, 8]
    cfg = dict(max_num_seqs=8, max_model_len=ctx + 64, max_num_batched_tokens=4096, graph_buckets=(1, 8))
    target = LLM(synthetic("llama-3-8b", "bfloat16", "cuda"), EngineConfig(**cfg))
    t = {b: {"graph_1": time_forward(target, b, 1, ctx, args.reps, graph=True),
             **{q: time_forward(target, b, q, ctx, args.reps) for q in [1] + [k + 1 for k in ks]}} for b in batches}
    for b in batches:  # the verify forward as the engine now runs it: replayed from a CUDA graph
        t[b].update({f"graph_{k + 1}": time_forward(target, b, k + 1, ctx, args.reps, graph=True) for k in ks})
    del target
    torch.cuda.empty_cache()
    draft = LLM(_random_model(ModelConfig(**DRAFT_1B), torch.bfloat16, "cuda"), EngineConfig(**cfg, kv_fraction=0.3))
    t_d = {b: time_forward(draft, b, 1, ctx, args.reps, graph=True) for b in batches}
    del draft
    rates = {}
    src = Path(args.from_json)
    if src.is_file():
        for r in json.loads(src.read_text())["rows"]:
            if r["spec"] != "plain" and r["batch"] == 1 and r.get("acceptance_rate") is not None:
                rates.setdefault(r["spec"], []).append((r["k"], r["acceptance_rate"], r["mean_accepted_len"]))
    proj = []
    for spec, meas in sorted(rates.items()):
        a = statistics.mean(x[1] for x in meas)
        for b in batches:
            for k in ks:
                e = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
                td = k * t_d[b] if spec == "draft" else 0.0
                for base in ("eager", "graph"):  # both forwards eager, or both replayed from graphs
                    t1 = t[b][1] if base == "eager" else t[b]["graph_1"]
                    tk = t[b][k + 1] if base == "eager" else t[b][f"graph_{k + 1}"]
                    proj.append({"spec": spec, "acceptance": round(a, 4), "batch": b, "k": k, "forwards": base,
                                 "E_tokens_per_step": round(e, 3), "t1_ms": round(t1, 3), "t_k1_ms": round(tk, 3),
                                 "t_draft_ms": round(td, 3), "projected_speedup": round(e * t1 / (tk + td), 3)})  # fmt: skip
    out = {"what": "PROJECTION: verify-forward cost on the Llama-3-8B shape (random weights, bf16) and the implied "
                   "speculative speed-up at the tiny pair's measured acceptance rates",
           "formula": "E = (1 - a^(k+1)) / (1 - a); speedup = E * t(1) / (t(k+1) + t_draft)",
           "ctx": ctx, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "env": _gpu_record(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "forward_ms": {str(b): {str(q): round(v, 3) for q, v in t[b].items()} for b in batches},
           "draft_1b_decode_ms": {str(b): round(v, 3) for b, v in t_d.items()},
           "acceptance_from": str(src), "measured": rates, "projection": proj}  # fmt: skip
    for b in batches:
        print(f"batch {b}: t(1) graph {t[b]['graph_1']:.2f} ms, eager {t[b][1]:.2f} ms; "
              + ", ".join(f"t({k + 1}) {t[b][f'graph_{k + 1}']:.2f} (eager {t[b][k + 1]:.2f})" for k in ks)
              + f"; 1B draft step {t_d[b]:.2f} ms")
    print("PROJECTION (not measured end to end): speedup = E * t(1) / (t(k+1) + t_draft), E = (1 - a^(k+1)) / (1 - a)")
    for p in proj:
        if p["forwards"] == "graph":
            print(f"  {p['spec']:9s} a={p['acceptance']:.3f} batch {p['batch']} k={p['k']}: E={p['E_tokens_per_step']:.2f} "
                  f"-> {p['projected_speedup']:.2f}x")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--specs", type=lambda s: s.split(","), default=["ngram", "lookahead", "draft", "medusa"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the prompts at batch > 1")
    ap.add_argument("--gemv", default=None, help="EngineConfig.gemv on cuda (tune | cublas | triton; default tune)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--verify-cost", action="store_true")
    ap.add_argument("--from", dest="from_json", default=str(REPO / "results" / "cpu" / "spec-tiny.json"))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if args.verify_cost:
        args.out = args.out or str(REPO / "results" / "gpu" / "spec-verify-cost.json")
        verify_cost_mode(args)
    else:
        args.out = args.out or str(REPO / "results" / ("cpu" if args.device == "cpu" else "gpu") / "spec-tiny.json")
        tiny_mode(args)


if __name__ == "__main__":
    main()
