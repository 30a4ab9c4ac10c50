"""Split-KV paged decode attention on the GPU, launch variants side by side: the Llama-3-8B head layout (32 query /
8 KV heads, d128, bf16, 16-token pages), batch x context, each variant's output first checked against the torch
reference (float64), then timed the way a decode step runs it: a CUDA graph of --layers calls (PDL on where the GPU
has it), each after a write of a --flush-mb buffer that evicts the K/V from L2 (in a model the weights stream
between two layers' attention), minus a graph of the flushes alone; median of --iters replays, µs per call.

  python benchmarks/bench_decode_attention.py --out results/gpu/decode-attn.json
  python benchmarks/bench_decode_attention.py --out OUT.json --batches 1 --ctx 256,4096 \\
      --variants "base=;fused=fused:1;fused-mc256=fused:1,min_chunk:256"

A variant is name=key:value,... over paged_decode_attention's knobs (fused 0/1, min_chunk, num_warps, block_n,
num_stages) and num_splits; without num_splits, NUM_SPLITS is what the engine picks for the batch at --max-len
(choose_num_splits), as in its decode graphs.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from engine.kernels import reference_paged as RP
from engine.kernels.triton.paged_attention import choose_num_splits, paged_decode_attention, workspace

H, HKV, D, PAGE = 32, 8, 128, 16
DEFAULT_VARIANTS = (
    "base=;fused=fused:1;mc256=min_chunk:256;fused-mc256=fused:1,min_chunk:256;fused-mc512=fused:1,min_chunk:512;"
    "w8=num_warps:8;n32=block_n:32;fused-mc256-n32=fused:1,min_chunk:256,block_n:32"
)


KNOBS = ("fused", "min_chunk", "num_warps", "block_n", "num_stages", "num_splits")  # num_splits: instead of the engine's


def parse_variants(text: str) -> dict[str, dict]:
    """'name=k:v,k:v;name2=...' -> {name: {k: int(v)}} (fused as a bool); a malformed item is an error."""
    out: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, body = item.partition("=")
        if not name:
            raise SystemExit(f"--variants: {item!r} has no name (name=key:value,...)")
        kw = {}
        for kv in filter(None, body.split(",")):
            k, sep, v = kv.partition(":")
            if not sep or k not in KNOBS or not v.strip().isdigit():
                raise SystemExit(f"--variants: {kv!r} in {name}: expected {'|'.join(KNOBS)}:INT")
            kw[k] = bool(int(v)) if k == "fused" else int(v)
        out[name] = kw
    return out


def make_case(b: int, ctx: int, max_len: int, seed: int = 0) -> dict:
    """b sequences of ctx keys each (pages scattered over a pool) and the engine's split count at max_len."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per = -(-max_len // PAGE)
    nb = b * per + 1
    kc = torch.randn(nb, HKV, PAGE, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(nb, HKV, PAGE, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = (torch.randperm(nb - 1, device="cuda", generator=g)[: b * per].view(b, per) + 1).int()
    q = torch.randn(b, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    splits = choose_num_splits(b, HKV, per * PAGE, torch.cuda.get_device_properties(0).multi_processor_count)
    return {"b": b, "ctx": ctx, "kc": kc, "vc": vc, "bt": bt, "q": q, "sl": sl, "splits": splits}


def graph_us(fn, flush: torch.Tensor, layers: int, iters: int) -> float:
    """Median µs of one replay of a graph of `layers` x (flush write, fn), minus the same graph without fn, / layers."""

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                flush.add_(1)
                fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(layers):
                flush.add_(1)
                if with_fn:
                    fn()
        return gr

    def time(gr) -> float:
        ts = []
        for _ in range(iters):
            a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            gr.replay()
            z.record()
            z.synchronize()
            ts.append(a.elapsed_time(z) * 1e3)
        return statistics.median(ts)

    g1, g0 = capture(True), capture(False)
    time(g1), time(g0)  # warm
    return (time(g1) - time(g0)) / layers


def run_case(c: dict, variants: dict[str, dict], flush, layers: int, iters: int) -> list[dict]:
    ref = RP.paged_decode_attention(c["q"].double(), c["kc"].double(), c["vc"].double(), c["bt"], c["sl"], D**-0.5)
    rows = []
    for name, kw in variants.items():
        kw = dict(kw)
        splits = kw.pop("num_splits", c["splits"])
        row = {"variant": name, "knobs": kw, "batch": c["b"], "ctx": c["ctx"], "num_splits": splits}
        try:
            ws = workspace(c["b"], H, D, splits, "cuda")
            out = torch.empty_like(c["q"])

            def fn(kw=kw, ws=ws, out=out, splits=splits):
                paged_decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["sl"], D**-0.5, num_splits=splits,
                                       out=out, ws=ws, **kw)  # fmt: skip

            fn()
            torch.cuda.synchronize()
            err = (out.double() - ref).abs().max().item()
            row["max_abs_err"] = err
            if err > 2e-2:
                row["error"] = f"output differs from the reference by {err:.3g}"
            else:
                row["us_per_call"] = round(graph_us(fn, flush, layers, iters), 3)
                kv_bytes = 2 * c["b"] * c["ctx"] * HKV * D * 2
                row["kv_gb_s"] = round(kv_bytes / row["us_per_call"] / 1e3, 1)
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile or launch is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"b{c['b']:>3} ctx {c['ctx']:>6} splits {c['splits']:>2} {name:<18} "
              + (f"{row['us_per_call']:8.2f} µs" if "us_per_call" in row else row.get("error", "")), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ctx", default="256,1024,4096,16384")
    ap.add_argument("--max-len", type=int, default=16384, help="block-table capacity per sequence (sets NUM_SPLITS)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--flush-mb", type=int, default=128)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention: needs a CUDA GPU")
    variants = parse_variants(a.variants)
    ctxs = [int(x) for x in a.ctx.split(",")]
    if max(ctxs) > a.max_len:
        raise SystemExit(f"--ctx {max(ctxs)} is longer than --max-len {a.max_len}")
    flush = torch.zeros(a.flush_mb << 18, dtype=torch.float32, device="cuda")
    from harness.envinfo import gpu_record

    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        for ctx in ctxs:
            rows += run_case(make_case(b, ctx, a.max_len), variants, flush, a.layers, a.iters)
            torch.cuda.empty_cache()
    rec = {"bench": "decode_attention", "env": gpu_record(), "layout": {"heads": H, "kv_heads": HKV, "head_dim": D,
           "page": PAGE, "dtype": "bfloat16"}, "max_len": a.max_len, "layers": a.layers, "iters": a.iters,
           "flush_mb": a.flush_mb, "unit": "µs per call (graph replay, L2 flushed before each call)", "rows": rows}  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
