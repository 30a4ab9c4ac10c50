"""Throughput: batch x prompt_len x gen_len sweep -> prefill tok/s, decode tok/s, TTFT, end-to-end latency.

Per repeat, for a batch submitted at t0 (host perf_counter after device sync, inside the adapter):
  decode  = length of the union of [first token, last token] over requests     decode_tok_s  = sum(output - 1) / decode
  e2e     = (last token time) - t0                                             gen_tok_s     = sum(output) / e2e
  prefill = e2e - decode (time when no request was decoding)                   prefill_tok_s = batch * prompt_len / prefill
  ttft    = (last request's first token time) - t0
  step    = mean inter-token latency over all requests (one decode step of a batched engine)
  weight_gb_s = weight bytes read per step (ModelConfig.decode_read_params x dtype bytes) / step: the bandwidth
  the weights alone need at that speed; weight_pct_copy = that / the run's measured GPU copy bandwidth (GPU only)
For an engine that runs the batch at once, decode = last token - last first token and prefill = ttft; for an engine
that serves the requests one after another (llama.cpp in process), the union and the difference count each
request's own decode and prefill, so the rates stay per-engine-busy-time rather than mixing phases.
Rates are the median over repeats; times are summarised (mean, p50, p90, p99) over repeats. Each repeat (and each
warm-up) uses fresh prompts (seed + repeat index, identical across engines) so prefix caches cannot help.
Warm-up runs are excluded.
"""

from __future__ import annotations

from harness import metrics as M
from harness.scenarios import Param
from harness.workload import Context, random_prompts, run_batch

PARAMS = {
    "batch": Param(int, 1, sweep=True, min=1, help="requests per batch"),
    "prompt_len": Param(int, 128, sweep=True, min=1, help="prompt tokens per request"),
    "gen_len": Param(int, 128, sweep=True, min=1, help="generated tokens per request (EOS ignored)"),
    "warmup": Param(int, 1, min=0, help="untimed runs before measuring"),
    "repeats": Param(int, 3, min=1, help="timed runs"),
    "seed": Param(int, 0, help="prompt seed"),
}
KEY_METRICS = ("prefill_tok_s", "decode_tok_s", "gen_tok_s", "ttft_p50_ms", "e2e_p50_ms", "itl_p50_ms", "step_ms",
               "weight_gb_s", "weight_pct_copy", "gpu_mem_peak_mb")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def bandwidth(step_s: float, ctx: Context) -> dict[str, float]:
    """step_ms, and where the model's weight bytes are known the weight bandwidth that step time implies (GB/s)
    and its share of the measured GPU copy bandwidth (%)."""
    out = {"step_ms": step_s * 1e3}
    if ctx.weight_bytes and step_s > 0:
        out["weight_gb_s"] = ctx.weight_bytes / step_s / 1e9
        if ctx.copy_gb_s:
            out["weight_pct_copy"] = 100.0 * out["weight_gb_s"] / ctx.copy_gb_s
    return out


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    b, p, g = params["batch"], params["prompt_len"], params["gen_len"]
    seed = params["seed"] * 1_000_003
    for w in range(params["warmup"]):
        run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + 10_000 + w), g)
    ttft, decode, e2e, prefill_rate, decode_rate, gen_rate, itl, out_tokens, step = [], [], [], [], [], [], [], [], []
    for r in range(params["repeats"]):
        res = run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + r), g)
        t0 = min(x.submit_time for x in res)
        first = max(x.first_token_time for x in res)
        last = max(x.token_times[-1] for x in res)
        n_out = sum(len(x.output_ids) for x in res)
        ttft.append(first - t0)
        busy = union_length([(x.first_token_time, x.token_times[-1]) for x in res])
        decode.append(busy)
        e2e.append(last - t0)
        prefill_rate.append(M.rate(b * p, (last - t0) - busy))
        decode_rate.append(M.rate(n_out - len(res), busy))
        gen_rate.append(M.rate(n_out, last - t0))
        itl.extend(res[0].itl)
        step.append(M.mean([d for x in res for d in x.itl]))
        out_tokens.append(n_out)
    metrics = {
        "prefill_tok_s": M.percentile(prefill_rate, 50),
        "decode_tok_s": M.percentile(decode_rate, 50),
        "gen_tok_s": M.percentile(gen_rate, 50),
        **M.summarize("ttft", ttft, "ms", 1e3),
        **M.summarize("e2e", e2e, "ms", 1e3),
        **{k: v for k, v in M.summarize("itl", itl, "ms", 1e3).items() if "_std_" not in k},
        "output_tokens_per_request": sum(out_tokens) / (len(out_tokens) * b),
        **bandwidth(M.percentile(step, 50), ctx),
    }
    samples = {"ttft_s": ttft, "decode_s": decode, "step_s": step, "e2e_s": e2e, "itl_s_request0": itl,
               "output_tokens": out_tokens}
    return M.clean(metrics), samples
