"""Statistics from raw samples: mean, percentiles, rates. Every metric name carries its unit (ttft_p50_ms, decode_tok_s).

Percentiles use linear interpolation between closest ranks (the "linear" method, numpy's default, Hyndman & Fan
type 7): p-th percentile of sorted x[0..n-1] is x[k] + (x[k+1] - x[k]) * f where k + f = (n - 1) * p / 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
