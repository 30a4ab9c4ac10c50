"""Matplotlib figures for a run: throughput vs batch / concurrency, latency CDFs, TTFT and prefill vs prompt length.

Each function takes the run's records and a folder, writes one PNG and returns its path (None when the run has
nothing to draw for it). matplotlib is an optional extra (pip install -e '.[plots]'); `available()` says whether
it is there, and make_plots() returns no figures (with the reason) without it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.results import Record

MAX_LINES = 12  # more lines than this on one axis is unreadable; the rest are left out (the tables have them)


def available() -> tuple[bool, str]:
    try:
        import matplotlib
    except ImportError:
        return False, "matplotlib is not installed: pip install -e '.[plots]'"
    return True, f"matplotlib {matplotlib.__version__}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _ok(records: list[Record], scenario: str) -> list[Record]:
    return [r for r in records if r.scenario == scenario and r.status == "ok"]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _label(r: Record, skip: tuple[str, ...]) -> str:
    fixed = {k: v for k, v in r.params.items() if k not in skip and k not in ("seed", "warmup", "repeats")}
    short = " ".join(
        f"{k}={v}" for k, v in fixed.items() if k in ("prompt_len", "gen_len", "output_len", "batch", "burstiness")
    )
    return f"{r.engine} {r.model} {r.dtype}" + (f" {short}" if short else "")


def _series(records: list[Record], x_key: str, y_key: str) -> dict[str, list[tuple[float, float]]]:
    """label -> sorted (x, y) points, one line per engine/model/other-params group."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        x, y = _num(r.params.get(x_key)), _num(r.metrics.get(y_key))
        if x is None or y is None:
            continue
        lines[_label(r, (x_key,))].append((x, y))
    return {k: sorted(v) for k, v in list(lines.items())[:MAX_LINES]}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _line_axes(ax, lines: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, logx: bool = False) -> None:
    for label, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def throughput_vs_batch(records: list[Record], out_dir: Path) -> Path | None:
    recs = _ok(records, "throughput")
    dec, gen = _series(recs, "batch", "decode_tok_s"), _series(recs, "batch", "gen_tok_s")
    if not dec:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _line_axes(axes[0], dec, "batch", "decode tok/s", logx=True)
    _line_axes(axes[1], gen, "batch", "generated tok/s (end to end)", logx=True)
    fig.suptitle("Throughput vs batch size")
    return _save(fig, out_dir / "throughput_vs_batch.png")


def serving_sweep(records: list[Record], out_dir: Path) -> Path | None:
    """Closed loop (fixed concurrency) against concurrency, open loop (finite request rate) against the rate."""
    recs = _ok(records, "serving")
    closed = [r for r in recs if _num(r.params.get("request_rate")) is None]
    opened = [r for r in recs if _num(r.params.get("request_rate")) is not None]
    rows = [(rs, key) for rs, key in ((closed, "concurrency"), (opened, "request_rate")) if rs]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 4 * len(rows)), squeeze=False)
    for ax, (rs, key) in zip(axes, rows, strict=True):
        _line_axes(ax[0], _series(rs, key, "output_tok_s"), key, "output tok/s")
        _line_axes(ax[1], _series(rs, key, "ttft_p99_ms"), key, "TTFT p99 (ms)")
        _line_axes(ax[2], _series(rs, key, "tpot_p99_ms"), key, "TPOT p99 (ms)")
    fig.suptitle("Serving: throughput and tail latency vs load")
    return _save(fig, out_dir / "serving_sweep.png")


def _latency_samples(r: Record) -> tuple[list[float], list[float]]:
    """(TTFT s, ITL s) raw samples of a latency or serving record."""
    s = r.samples or {}
    if r.scenario == "serving":
        reqs = [q for q in s.get("requests", []) if q.get("ok")]
        return [q["ttft"] for q in reqs if q.get("ttft") is not None], [x for q in reqs for x in q.get("itl", [])]
    return list(s.get("ttft_s", [])), list(s.get("itl_s", s.get("itl_s_request0", [])))


def latency_cdfs(records: list[Record], out_dir: Path) -> Path | None:
    recs = [r for r in records if r.status == "ok" and r.scenario in ("latency", "serving")][:MAX_LINES]
    data = [(f"{r.scenario} {_label(r, ())} {_knob(r)}".strip(), *_latency_samples(r)) for r in recs]
    data = [d for d in data if d[1] or d[2]]
    if not data:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, idx, name in ((axes[0], 1, "TTFT"), (axes[1], 2, "inter-token latency")):
        for d in data:
            xs = sorted(x * 1000.0 for x in d[idx] if x and x > 0)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step([xs[0], *xs], [0.0, *ys], where="post", label=d[0])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDFs")
    return _save(fig, out_dir / "latency_cdf.png")


def _knob(r: Record) -> str:
    if r.scenario != "serving":
        return ""  # batch is already in the label
    c, q = r.params.get("concurrency"), r.params.get("request_rate")
    return f"c={c}" if c else f"rate={q}"


def ttft_vs_prompt_len(records: list[Record], out_dir: Path) -> Path | None:
    lc = _ok(records, "long_context")
    ttft, pre = _series(lc, "prompt_len", "ttft_ms"), _series(lc, "prompt_len", "prefill_tok_s")
    if not ttft:  # no long-context cells: throughput cells at batch 1 across prompt lengths also tell it
        tp = [r for r in _ok(records, "throughput") if r.params.get("batch") == 1]
        ttft, pre = _series(tp, "prompt_len", "ttft_p50_ms"), _series(tp, "prompt_len", "prefill_tok_s")
        if not any(len(v) > 1 for v in ttft.values()):
            return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _line_axes(axes[0], ttft, "prompt tokens", "TTFT (ms)", logx=True)
    axes[0].set_yscale("log")
    _line_axes(axes[1], pre, "prompt tokens", "prefill tok/s", logx=True)
    if lc:
        dec = _series(lc, "prompt_len", "decode_tok_s")
        ax2 = axes[1].twinx()
        for label, pts in dec.items():
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="x", label=f"decode {label}")
        ax2.set_ylabel("decode tok/s at that context (dashed)")
    fig.suptitle("TTFT and prefill speed vs prompt length")
    return _save(fig, out_dir / "ttft_vs_prompt_len.png")


PLOTS = (
    ("Throughput vs batch size", throughput_vs_batch),
    ("Serving sweep", serving_sweep),
    ("Latency CDFs", latency_cdfs),
    ("TTFT vs prompt length", ttft_vs_prompt_len),
)


def make_plots(records: list[Record], out_dir: str | Path) -> tuple[list[tuple[str, Path]], str | None]:
    """([(title, png path)], note): every figure the records support; note says why none could be drawn."""
    ok, why = available()
    if not ok:
        return [], why
    out = []
    for title, fn in PLOTS:
        path = fn(records, Path(out_dir))
        if path is not None:
            out.append((title, path))
    return out, None if out else "no plottable cells in this run"
