"""Statistics from raw samples: mean, percentiles, rates, and the per-batch timing definitions (TTFT, TPOT, ITL,
throughputs, phases) the throughput and latency scenarios share. Every metric name carries its unit (ttft_p50_ms).

Percentiles use linear interpolation between closest ranks (the "linear" method, numpy's default, Hyndman & Fan
type 7): p-th percentile of sorted x[0..n-1] is x[k] + (x[k+1] - x[k]) * f where k + f = (n - 1) * p / 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILE_METHOD = "linear interpolation between closest ranks (numpy 'linear', Hyndman-Fan type 7)"
QUANTILES = (50, 90, 99)


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100.0
    k = int(math.floor(pos))
    f = pos - k
    if k + 1 >= len(s):
        return float(s[-1])
    return float(s[k] + (s[k + 1] - s[k]) * f)


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def stdev(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one sample."""
    if len(xs) < 2:
        return 0.0 if xs else math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(name: str, xs: Sequence[float], unit: str, scale: float = 1.0) -> dict[str, float]:
    """{name_mean_unit, name_p50_unit, name_p90_unit, name_p99_unit, name_std_unit} of xs * scale."""
    v = [x * scale for x in xs]
    out = {f"{name}_mean_{unit}": mean(v)}
    for q in QUANTILES:
        out[f"{name}_p{q}_{unit}"] = percentile(v, q)
    out[f"{name}_std_{unit}"] = stdev(v)
    return out


def rate(count: float, seconds: float) -> float:
    """count / seconds, NaN when the interval is empty (e.g. decode rate with one generated token)."""
    return count / seconds if seconds > 0 else math.nan


def clean(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN -> None so records stay valid JSON; floats rounded to 6 significant digits for readability."""
    out: dict[str, float | None] = {}
    for k, v in metrics.items():
        if isinstance(v, float):
            out[k] = None if math.isnan(v) or math.isinf(v) else float(f"{v:.6g}")
        else:
            out[k] = v
    return out


# --- Per-batch timing, defined as vLLM's `bench serve` defines it (benchmarks/serve.py, calculate_metrics) --------
#
# Inputs per request: submit time, the host time of every generated token, prompt and output token counts.
#   ttft        = first token time - submit                                      (per request)
#   e2e         = last token time - submit                                       (per request)
#   tpot        = (e2e - ttft) / (output_tokens - 1), requests with >= 2 tokens  (per request)
#   itl         = gaps between successive tokens of each request, pooled over requests
#   wall        = last token of the batch - first submit of the batch
#   output_tok_s = sum(output tokens) / wall;  total_tok_s = sum(prompt + output tokens) / wall
# Phases, which only exist where the engine does not mix them (chunked prefill does):
#   interleaved = some request's first token came after another request's second token (a prefill ran while
#                 another request was already decoding); then no prefill rate can be measured, and it is omitted
#   prefill phase (not interleaved) = [first submit, last first token]: every prompt, nothing generated past
#                 each request's first token; prefill_tok_s = sum(prompt tokens) / its length
#   decode window = (last first token, last token]: every prompt is done, only decode steps run (also when
#                 interleaved); decode_tok_s = tokens generated in it (index >= 1) / its length
#   decode gaps = ITL gaps that start at or after the last first token; step = the median over requests of each
#                 request's mean decode gap (one decode step; a mean per request, so an engine that hands tokens
#                 over in bursts (detokeniser hold-back, multi-step or speculative decoding) is timed per token)


@dataclass
class BatchTiming:
    """The timing facts of one batch, from its requests' host timestamps (see the definitions above)."""

    ttft: list[float]  # seconds, one per request
    e2e: list[float]  # seconds, one per request
    tpot: list[float]  # seconds, one per request with >= 2 output tokens
    itl: list[float]  # seconds, every gap of every request, in request order
    wall: float  # seconds, first submit -> last token of the batch
    prompt_tokens: int  # sum over requests
    output_tokens: int  # sum over requests
    first_all: float  # seconds after the first submit when the last request's first token arrived
    decode_window: float  # seconds, last first token -> last token
    decode_window_tokens: int  # tokens (index >= 1) generated inside the decode window
    decode_gaps: list[float]  # ITL gaps starting at or after the last first token
    decode_steps: list[float]  # per request with decode gaps: the mean of its decode gaps
    interleaved: str | None  # None, or why prefill and decode overlapped (which request, which times)

    @property
    def prefill_tok_s(self) -> float:
        return math.nan if self.interleaved else rate(self.prompt_tokens, self.first_all)

    @property
    def decode_tok_s(self) -> float:
        return rate(self.decode_window_tokens, self.decode_window)

    @property
    def output_tok_s(self) -> float:
        return rate(self.output_tokens, self.wall)

    @property
    def total_tok_s(self) -> float:
        return rate(self.prompt_tokens + self.output_tokens, self.wall)

    @property
    def step(self) -> float:
        return percentile(self.decode_steps, 50)


def batch_timing(results: Sequence) -> BatchTiming:
    """BatchTiming of one batch of adapters.base.GenResult (each with a first token and its token times)."""
    t0 = min(r.submit_time for r in results)
    firsts = [r.token_times[0] for r in results]
    last_first = max(firsts)
    ttft = [r.token_times[0] - r.submit_time for r in results]
    e2e = [r.token_times[-1] - r.submit_time for r in results]
    tpot = [(e - f) / (len(r.output_ids) - 1) for r, e, f in zip(results, e2e, ttft, strict=True)
            if len(r.output_ids) > 1]
    itl = [g for r in results for g in r.itl]
    seconds = [(i, r.token_times[1]) for i, r in enumerate(results) if len(r.token_times) > 1]
    interleaved = None
    if seconds:
        j, second = min(seconds, key=lambda x: x[1])
        if last_first > second:
            i = firsts.index(last_first)
            interleaved = (f"prefill and decode interleaved: request {i}'s first token came at "
                           f"{(last_first - t0) * 1e3:.4g} ms, after request {j}'s second token at "
                           f"{(second - t0) * 1e3:.4g} ms")
    last = max(r.token_times[-1] for r in results)
    in_window = sum(1 for r in results for t in r.token_times[1:] if t > last_first)
    per_request = [[b - a for a, b in zip(r.token_times, r.token_times[1:], strict=False) if a >= last_first]
                   for r in results]
    return BatchTiming(
        ttft=ttft, e2e=e2e, tpot=tpot, itl=itl, wall=last - t0,
        prompt_tokens=sum(r.prompt_tokens for r in results), output_tokens=sum(len(r.output_ids) for r in results),
        first_all=last_first - t0, decode_window=last - last_first, decode_window_tokens=in_window,
        decode_gaps=[g for gs in per_request for g in gs], decode_steps=[mean(gs) for gs in per_request if gs],
        interleaved=interleaved,
    )
