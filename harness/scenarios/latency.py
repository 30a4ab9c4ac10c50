"""Latency: per-token latency distribution (inter-token p50/p90/p99), TTFT and time per output token.

Each repeat sends `batch` requests (default 1) of fresh seeded prompts (seed + repeat index, identical across
engines); inter-token latencies (ITL) of every request of every repeat are pooled, TTFT and TPOT
((e2e - ttft) / (tokens - 1)) are per request. Warm-up runs are excluded. Percentile method: harness.metrics.
"""

from __future__ import annotations

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
KEY_METRICS = ("ttft_p50_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "tpot_mean_ms")


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    b, p, g = params["batch"], params["prompt_len"], params["gen_len"]
    seed = params["seed"] * 1_000_003
    for w in range(params["warmup"]):
        run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + 10_000 + w), g)
    ttft, itl, tpot, e2e = [], [], [], []
    for r in range(params["repeats"]):
        for x in run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + r), g):
            ttft.append(x.ttft)
            itl.extend(x.itl)
            e2e.append(x.token_times[-1] - x.submit_time)
            if len(x.token_times) > 1:
                tpot.append((x.token_times[-1] - x.first_token_time) / (len(x.token_times) - 1))
    metrics = {
        **M.summarize("ttft", ttft, "ms", 1e3),
        **M.summarize("itl", itl, "ms", 1e3),
        **M.summarize("tpot", tpot, "ms", 1e3),
        **M.summarize("e2e", e2e, "ms", 1e3),
        "itl_max_ms": max(itl) * 1e3 if itl else float("nan"),
    }
    return M.clean(metrics), {"ttft_s": ttft, "itl_s": itl, "tpot_s": tpot, "e2e_s": e2e}
