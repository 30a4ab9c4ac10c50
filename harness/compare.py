"""`bench compare RUN_A RUN_B`: per-metric deltas between two runs with noise-aware verdicts.

Cells match on (scenario, engine, model, dtype, device, params). For each metric the spread of each side is
taken from its own repeats: the recorded std of the same distribution (ttft_p50_ms -> ttft_std_ms), or the std of
per-repeat values rebuilt from the raw samples (throughput, long_context). With pooled = sqrt((sa^2 + sb^2) / 2):
    |B - A| <= max(k * pooled, min_rel * |A|)   -> "noise"
    otherwise                                     -> "better" / "worse" by the metric's direction ("changed" if unknown)
min_rel is a floor for metrics measured once (no spread) so a 0.3% wobble is not called a change.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.results import Record, load_records

HIGHER = (
    "_tok_s",
    "_gb_s",
    "_pct_copy",
    "_req_s",
    "goodput_req_s",
    "_frac",
    "greedy_match_tokens",
    "good_requests",
    "completed",
    "slo_pass",
    "util_mean",
)
LOWER = ("_ms", "_s", "_mb", "j_per_token", "_diff", "failed", "first_mismatch", "energy_j", "power_w_mean")


def direction(metric: str) -> str | None:
    """'higher' or 'lower' is better, or None when the name does not say."""
    if metric.endswith(HIGHER):
        return "higher"
    if metric.endswith(LOWER):
        return "lower"
    return None


def case_key(r: Record) -> tuple:
    return (r.scenario, r.engine, r.model, r.dtype, r.device, json.dumps(r.params, sort_keys=True, default=str))


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if isinstance(x, int | float) and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) >= 2 else None


def _per_repeat(r: Record, metric: str) -> list[float] | None:
    """Per-repeat values of `metric` rebuilt from raw samples, for scenarios that record repeats."""
    s, p = r.samples or {}, r.params
    try:
        if r.scenario == "throughput":
            b, plen = p.get("batch", 1), p.get("prompt_len", 0)
            ttft, dec, e2e, out = s["ttft_s"], s["decode_s"], s["e2e_s"], s["output_tokens"]
            if metric == "prefill_tok_s":
                return [b * plen / t for t in ttft if t]
            if metric == "decode_tok_s":
                return [(o - b) / d for o, d in zip(out, dec, strict=True) if d]
            if metric == "gen_tok_s":
                return [o / e for o, e in zip(out, e2e, strict=True) if e]
        if r.scenario == "long_context":
            runs = s["runs"]
            if metric == "ttft_ms":
                return [x["ttft_s"] * 1000.0 for x in runs if x.get("ttft_s")]
            if metric == "prefill_tok_s":
                return [x["prompt_tokens"] / x["ttft_s"] for x in runs if x.get("ttft_s")]
            if metric == "decode_tok_s":
                return [x["decode_steps"] / x["decode_s"] for x in runs if x.get("decode_s")]
    except (KeyError, TypeError, ValueError):
        return None
    return None


def spread(r: Record, metric: str) -> float | None:
    """The record's own repeat spread (one std) for `metric`, or None when it has no repeats to say."""
    for stat in ("_p50_", "_p90_", "_p99_", "_mean_"):
        if stat in metric:
            sib = r.metrics.get(metric.replace(stat, "_std_"))
            if isinstance(sib, int | float) and math.isfinite(sib):
                return float(sib)
    vals = _per_repeat(r, metric)
    return _std(vals) if vals else None


@dataclass
class Delta:
    case: str  # readable cell label
    engine: str
    metric: str
    a: Any
    b: Any
    delta: float | None  # b - a
    rel: float | None  # (b - a) / |a|
    spread: float | None  # pooled repeat spread (one std), None when neither side had repeats
    verdict: str  # better | worse | noise | changed | broke | fixed | only in A | only in B | n/a


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _label(r: Record) -> str:
    params = " ".join(f"{k}={v}" for k, v in r.params.items() if k not in ("warmup", "repeats", "seed", "reference"))
    return f"{r.scenario} {r.model} {r.dtype} {r.device} {params}".strip()


def _metrics_for(ra: Record, rb: Record, all_metrics: bool) -> list[str]:
    if not all_metrics:
        try:
            from harness import scenarios

            keys = list(scenarios.get(ra.scenario).KEY_METRICS)
            return [m for m in keys if m in ra.metrics or m in rb.metrics]
        except (KeyError, ImportError, AttributeError):
            pass
    names = dict.fromkeys(k for k, v in {**ra.metrics, **rb.metrics}.items() if _num(v) or v is None)
    return [m for m in names if "_std_" not in m]


def judge(metric: str, a: float, b: float, sa: float | None, sb: float | None, k: float, min_rel: float) -> tuple:
    """(delta, rel, pooled spread, verdict) for one metric."""
    d = b - a
    rel = d / abs(a) if a else (0.0 if d == 0 else math.inf)
    sp = [x for x in (sa, sb) if x is not None]
    pooled = math.sqrt(sum(x * x for x in sp) / len(sp)) if sp else None
    threshold = max(k * (pooled or 0.0), min_rel * abs(a))
    if abs(d) <= threshold:
        return d, rel, pooled, "noise"
    way = direction(metric)
    if way is None:
        return d, rel, pooled, "changed"
    return d, rel, pooled, "better" if (d > 0) == (way == "higher") else "worse"


def compare(
    recs_a: list[Record], recs_b: list[Record], k: float = 2.0, min_rel: float = 0.02, all_metrics: bool = False
) -> list[Delta]:
    a_by, b_by = {case_key(r): r for r in recs_a}, {case_key(r): r for r in recs_b}
    out: list[Delta] = []
    for key in list(dict.fromkeys([*a_by, *b_by])):
        ra, rb = a_by.get(key), b_by.get(key)
        if ra is None or rb is None:
            r = ra or rb
            out.append(
                Delta(
                    _label(r),
                    r.engine,
                    "-",
                    r.status if ra else None,
                    r.status if rb else None,
                    None,
                    None,
                    None,
                    "only in A" if ra else "only in B",
                )
            )
            continue
        if ra.status != "ok" or rb.status != "ok":
            verdict = "broke" if ra.status == "ok" else "fixed" if rb.status == "ok" else "n/a"
            out.append(Delta(_label(ra), ra.engine, "status", ra.status, rb.status, None, None, None, verdict))
            continue
        for m in _metrics_for(ra, rb, all_metrics):
            a, b = ra.metrics.get(m), rb.metrics.get(m)
            if not (_num(a) and _num(b)):
                verdict = "noise" if a == b else "changed"
                out.append(Delta(_label(ra), ra.engine, m, a, b, None, None, None, verdict))
                continue
            d, rel, pooled, verdict = judge(m, float(a), float(b), spread(ra, m), spread(rb, m), k, min_rel)
            out.append(Delta(_label(ra), ra.engine, m, a, b, d, rel, pooled, verdict))
    return out


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(deltas: list[Delta], title: str = "") -> str:
    lines = [f"# {title}\n"] if title else []
    lines += ["| cell | engine | metric | A | B | delta | delta % | spread | verdict |", "|" + "---|" * 9]
    for d in deltas:
        pct = f"{d.rel * 100:+.1f}%" if d.rel is not None and math.isfinite(d.rel) else "-"
        lines.append(
            f"| {d.case} | {d.engine} | {d.metric} | {_f(d.a)} | {_f(d.b)} | "
            f"{_f(d.delta) if d.delta is None else f'{d.delta:+.4g}'} | {pct} | {_f(d.spread)} | "
            f"{d.verdict} |"
        )
    counts: dict[str, int] = {}
    for d in deltas:
        counts[d.verdict] = counts.get(d.verdict, 0) + 1
    lines.append("\n" + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())))
    return "\n".join(lines) + "\n"


def rich_table(deltas: list[Delta], title: str = ""):
    from rich.table import Table

    colour = {"better": "green", "fixed": "green", "worse": "red", "broke": "red", "changed": "yellow"}
    t = Table(title=title or None)
    for h in ("cell", "engine", "metric", "A", "B", "delta %", "spread", "verdict"):
        t.add_column(h, overflow="fold", justify="right" if h in ("A", "B", "delta %", "spread") else "left")
    for d in deltas:
        pct = f"{d.rel * 100:+.1f}%" if d.rel is not None and math.isfinite(d.rel) else "-"
        c = colour.get(d.verdict)
        t.add_row(
            d.case,
            d.engine,
            d.metric,
            _f(d.a),
            _f(d.b),
            pct,
            _f(d.spread),
            f"[{c}]{d.verdict}[/{c}]" if c else d.verdict,
        )
    return t


def main(
    run_a: Path,
    run_b: Path,
    k: float = 2.0,
    min_rel: float = 0.02,
    all_metrics: bool = False,
    md_out: Path | None = None,
) -> int:
    """`bench compare`: prints the table (and writes markdown if asked). 0 normally, 2 when a run cannot be read.
    Comparing is informational; `bench gate` is what fails CI."""
    from rich.console import Console

    try:
        recs_a, recs_b = load_records(run_a), load_records(run_b)
    except (OSError, ValueError) as exc:
        print(f"compare: error: {exc}")
        return 2
    suites_a, suites_b = sorted({r.suite for r in recs_a}), sorted({r.suite for r in recs_b})
    if suites_a != suites_b:  # still compared cell by cell, but the reader must know the runs differ in kind
        print(f"compare: warning: the runs are of different suites: A is {', '.join(suites_a) or 'empty'}, "
              f"B is {', '.join(suites_b) or 'empty'}; only cells with equal scenario, engine, model and params match")
    deltas = compare(recs_a, recs_b, k, min_rel, all_metrics)
    title = f"{run_a} -> {run_b} (noise: |delta| <= max({k:g} x pooled spread, {min_rel:.0%}))"
    Console(width=200).print(rich_table(deltas, title))
    if md_out:
        Path(md_out).write_text(markdown(deltas, title), encoding="utf-8")
        print(f"wrote {md_out}")
    return 0
