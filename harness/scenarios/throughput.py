"""Throughput: batch x prompt_len x gen_len sweep -> token throughputs, TTFT, TPOT, ITL, decode step and bandwidth.

Every definition holds for an engine that schedules like vLLM (chunked prefill mixed into decode steps) as well as
for a static-batch engine and for one that serves a batch request by request (llama.cpp in process). Per repeat,
for a batch submitted at t0 (host perf_counter after device sync, inside the adapter), harness.metrics.batch_timing:
  ttft / tpot / itl / e2e   per request, as vLLM's `bench serve` defines them; summarised over every request of
                            every repeat (ITL pooled)
  output_tok_s              sum(output tokens) / wall, wall = last token - t0 (gen_tok_s: the same, older name)
  total_tok_s               sum(prompt + output tokens) / wall
  prefill_tok_s             sum(prompt tokens) / (last request's first token - t0), only when prefill and decode
                            did not interleave in any repeat (no request's first token after another request's
                            second token); otherwise omitted and prefill_tok_s_note says where they overlapped
  decode_tok_s              tokens generated after the last request's first token / (last token - that time): the
                            rate once every prompt is done (for a serial engine: its last request's decode)
  step_ms                   one decode step of the running batch: the median over requests of each request's
                            mean ITL gap starting after the last first token (decode-phase gaps), median over
                            repeats; per-request means so that tokens handed over in bursts are timed per token
  weight_gb_s               weight bytes read per step (ModelConfig.decode_read_params x dtype bytes) / step: the
                            bandwidth the weights alone need at that speed; weight_pct_copy = that / the run's
                            measured GPU copy bandwidth (GPU only)
Rates are the median over repeats. Each repeat (and each warm-up) uses fresh prompts (seed + repeat index, identical
across engines) so prefix caches cannot help. Warm-up runs are excluded.
Samples per repeat: ttft_s (batch TTFT: t0 -> last first token, the prefill phase when not interleaved), decode_s
(the decode window), e2e_s (wall), step_s, output_tokens; per request: request_ttft_s, tpot_s; pooled: itl_s.
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
KEY_METRICS = ("output_tok_s", "total_tok_s", "prefill_tok_s", "decode_tok_s", "ttft_p50_ms", "tpot_p50_ms",
               "itl_p50_ms", "e2e_p50_ms", "step_ms", "weight_gb_s", "weight_pct_copy", "gpu_mem_peak_mb")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once). The old decode-time definition; no metric
    uses it now, kept for callers (tests/harness/test_metrics_results.py)."""
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


def summarize(timings: list[M.BatchTiming], ctx: Context) -> dict:
    """The scenario's metrics from the BatchTiming of every timed repeat."""
    def med(xs):
        return M.percentile(xs, 50)

    ttft = [x for t in timings for x in t.ttft]
    tpot = [x for t in timings for x in t.tpot]
    itl = [x for t in timings for x in t.itl]
    e2e = [x for t in timings for x in t.e2e]
    batch = len(timings[0].ttft)
    metrics = {
        "output_tok_s": med([t.output_tok_s for t in timings]),
        "total_tok_s": med([t.total_tok_s for t in timings]),
        "gen_tok_s": med([t.output_tok_s for t in timings]),
        "decode_tok_s": med([t.decode_tok_s for t in timings]),
        **M.summarize("ttft", ttft, "ms", 1e3),
        **M.summarize("tpot", tpot, "ms", 1e3),
        **{k: v for k, v in M.summarize("itl", itl, "ms", 1e3).items() if "_std_" not in k},
        **M.summarize("e2e", e2e, "ms", 1e3),
        "batch_ttft_p50_ms": med([t.first_all for t in timings]) * 1e3,
        "output_tokens_per_request": sum(t.output_tokens for t in timings) / (len(timings) * batch),
        **bandwidth(med([t.step for t in timings]), ctx),
    }
    mixed = [(i, t.interleaved) for i, t in enumerate(timings) if t.interleaved]
    if mixed:
        i, why = mixed[0]
        metrics["prefill_tok_s_note"] = (f"not measurable: {why} (repeat {i}; {len(mixed)} of {len(timings)} "
                                         "repeats interleaved)")
    else:
        metrics["prefill_tok_s"] = med([t.prefill_tok_s for t in timings])
    return metrics


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    b, p, g = params["batch"], params["prompt_len"], params["gen_len"]
    seed = params["seed"] * 1_000_003
    for w in range(params["warmup"]):
        run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + 10_000 + w), g)
    timings = [M.batch_timing(run_batch(adapter, random_prompts(ctx.vocab_size, b, p, seed + r), g))
               for r in range(params["repeats"])]
    samples = {
        "ttft_s": [t.first_all for t in timings],
        "decode_s": [t.decode_window for t in timings],
        "e2e_s": [t.wall for t in timings],
        "step_s": [t.step for t in timings],
        "output_tokens": [t.output_tokens for t in timings],
        "request_ttft_s": [x for t in timings for x in t.ttft],
        "tpot_s": [x for t in timings for x in t.tpot],
        "itl_s": [x for t in timings for x in t.itl],
    }
    return M.clean(summarize(timings, ctx)), samples
