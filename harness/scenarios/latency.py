"""Latency: per-token latency distribution (inter-token p50/p90/p99), TTFT and time per output token.

Each repeat sends `batch` requests (default 1) of fresh seeded prompts (seed + repeat index, identical across
engines). Definitions are vLLM's `bench serve` ones (harness.metrics.batch_timing): TTFT = first token - submit and
TPOT = (e2e - ttft) / (output tokens - 1) per request; ITL = the gaps between successive tokens, pooled over every
request of every repeat; output_tok_s / total_tok_s = (output / prompt + output) tokens over each repeat's wall
time (first submit -> last token), median over repeats. Warm-up runs are excluded. Percentile method:
harness.metrics.
"""

from __future__ import annotations

import math

from harness import metrics as M
from harness.scenarios import Param
from harness.workload import Context, random_prompts, run_batch

PARAMS = {
    "batch": Param(int, 1, sweep=True, min=1, help="concurrent requests per repeat"),
    "prompt_len": Param(int, 128, sweep=True, min=1),
    "gen_len": Param(int, 64, sweep=True, min=2),
    "warmup": Param(int, 1, min=0),
    "repeats": Param(int, 5, min=1),
    "seed": Param(int, 1),
}
KEY_METRICS = ("ttft_p50_ms", "tpot_mean_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "output_tok_s")


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    b, p, g = params["batch"], params["prompt_len"], params["gen_len"]
    seed = params["seed"] * 1_000_003
    for w in range(params["warmup"]):
        run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + 10_000 + w), g)
    timings = [M.batch_timing(run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + r), g))
               for r in range(params["repeats"])]
    ttft = [x for t in timings for x in t.ttft]
    itl = [x for t in timings for x in t.itl]
    tpot = [x for t in timings for x in t.tpot]
    e2e = [x for t in timings for x in t.e2e]
    metrics = {
        **M.summarize("ttft", ttft, "ms", 1e3),
        **M.summarize("itl", itl, "ms", 1e3),
        **M.summarize("tpot", tpot, "ms", 1e3),
        **M.summarize("e2e", e2e, "ms", 1e3),
        "itl_max_ms": max(itl) * 1e3 if itl else math.nan,
        "output_tok_s": M.percentile([t.output_tok_s for t in timings], 50),
        "total_tok_s": M.percentile([t.total_tok_s for t in timings], 50),
    }
    return M.clean(metrics), {"ttft_s": ttft, "itl_s": itl, "tpot_s": tpot, "e2e_s": e2e}
