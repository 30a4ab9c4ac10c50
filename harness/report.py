"""Turns records into comparable tables: one row per engine per cell, the same columns for every engine.

Every table is built on harness.results.frame (the records as a pandas DataFrame). table.md has one table per
scenario type (its key metrics as columns; skip / failure reasons as numbered footnotes under it); table.csv is one
table with the union of those columns, a scenario column and each row's reason. The terminal gets a narrower table
per scenario (TERMINAL: the few metrics that matter, short headers, made to fit 120 columns): parameters and
models shared by every row go into the title, and each distinct reason or note is printed once, as a footnote.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.results import Record, frame

BASE_COLUMNS = ("scenario", "model", "params", "engine", "status")
NOT_SHOWN = ("warmup", "repeats", "seed", "reference")  # params that never tell cells apart
EXTRA_COLUMNS = {"serving": ("failed", "server_prefix_cache_hit_rate")}  # beside KEY_METRICS: failed requests, and
# the share of the cell's prompt tokens the server took from its prefix cache (vLLM's and anvil's /metrics)
NOTES = {"prefill_tok_s": "prefill_tok_s_note", "first_bad_layer": "layers_note"}  # metric -> why it is missing
# terminal columns per scenario: (metric, header)
TERMINAL: dict[str, tuple[tuple[str, str], ...]] = {
    "throughput": (("output_tok_s", "out\ntok/s"), ("decode_tok_s", "decode\ntok/s"), ("prefill_tok_s", "prefill\ntok/s"),
                   ("ttft_p50_ms", "TTFT\np50 ms"), ("tpot_p50_ms", "TPOT\np50 ms"), ("step_ms", "step\nms"),
                   ("weight_gb_s", "weights\nGB/s")),
    "latency": (("ttft_p50_ms", "TTFT\np50 ms"), ("tpot_mean_ms", "TPOT\nmean ms"), ("itl_p50_ms", "ITL\np50 ms"),
                ("itl_p90_ms", "ITL\np90 ms"), ("itl_p99_ms", "ITL\np99 ms"), ("output_tok_s", "out\ntok/s")),
    "parity": (("max_logit_diff", "max\n|dlogit|"), ("argmax_match_frac", "argmax\nmatch"),
               ("greedy_match_tokens", "greedy\nmatch"), ("first_mismatch", "first\nmismatch"),
               ("first_bad_layer", "first bad\nlayer")),
    "long_context": (("ttft_ms", "TTFT\nms"), ("prefill_tok_s", "prefill\ntok/s"), ("decode_tok_s", "decode\ntok/s"),
                     ("gpu_mem_peak_mb", "GPU peak\nMB"), ("rss_peak_mb", "RSS peak\nMB")),
    "serving": (("request_throughput_req_s", "req/s"), ("output_tok_s", "out\ntok/s"), ("ttft_p50_ms", "TTFT\np50 ms"),
                ("tpot_p50_ms", "TPOT\np50 ms"), ("e2e_p99_ms", "E2E\np99 ms"), ("goodput_req_s", "goodput\nreq/s"),
                ("failed", "failed\nreqs")),
}
STYLE = {"ok": None, "partial": "yellow", "failed": "red", "skipped": "yellow"}


def _scenario(name: str):
    try:
        from harness import scenarios

        return scenarios.get(name)
    except (KeyError, ImportError):
        return None


def key_metrics(scenario: str, records: list[Record]) -> list[str]:
    mod = _scenario(scenario)
    names = list(getattr(mod, "KEY_METRICS", ()))
    if not names:
        seen: dict[str, None] = {}
        for r in records:
            seen.update(dict.fromkeys(k for k, v in r.metrics.items() if isinstance(v, (int, float))))
        names = list(seen)[:8]
    return names + [m for m in EXTRA_COLUMNS.get(scenario, ()) if m not in names]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1e9:
            return f"{v:.3e}"
        return f"{v:.0f}" if abs(v) >= 1e4 or v.is_integer() else f"{v:.4g}"
    return str(v)


def fmt_short(v: Any) -> str:
    """fmt for the terminal: thousands without an exponent (167,000 not 1.67e+05)."""
    if isinstance(v, float) and not math.isnan(v) and 1e4 <= abs(v) < 1e9:
        return f"{v:,.0f}"
    return fmt(v)


def _schema(scenario: str) -> dict:
    return dict(getattr(_scenario(scenario), "PARAMS", {}) or {})


def _shown(schema: dict, k: str, v: Any) -> bool:
    """The params that tell cells apart: sweepable ones and any set away from the scenario's default."""
    p = schema.get(k)
    return k not in NOT_SHOWN and (p is None or p.sweep or v != p.default)


def _params(r: Record) -> str:
    schema = _schema(r.scenario)
    return " ".join(f"{k}={v}" for k, v in r.params.items() if _shown(schema, k, v))


def _value(v: Any) -> Any:
    """A DataFrame cell back to a plain value (pandas fills missing cells with NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _view(records: list[Record], scenario: str | None):
    """(DataFrame of the records of one scenario type (or all), its metric columns) with derived model/params."""
    recs = [r for r in records if scenario is None or r.scenario == scenario]
    df = frame(recs)
    cols: list[str] = []
    for sc in dict.fromkeys(r.scenario for r in recs):
        cols += [m for m in key_metrics(sc, [r for r in recs if r.scenario == sc]) if m not in cols]
    df["model"] = [f"{r.model} {r.dtype} {r.device}" for r in recs]
    df["params"] = [_params(r) for r in recs]
    for c in cols:
        if c not in df.columns:
            df[c] = None
    return df, cols


def rows(records: list[Record], scenario: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the records of one scenario type (or all, with the union of metric columns), each row
    with its reason: what table.csv and the HTML report show."""
    df, cols = _view(records, scenario)
    header = [*BASE_COLUMNS, *cols, "reason"]
    body = [[*(str(row[c]) for c in BASE_COLUMNS), *(fmt(_value(row[c])) for c in cols),
             str(row["reason"] or "").replace("\n", " ")[:300]] for _, row in df.iterrows()]
    return header, body


def ordered(records: list[Record], order: list[str] | None = None) -> list[Record]:
    """Records in suite cell order (order = cell ids), so the engines of one cell sit together."""
    if not order:
        return list(records)
    pos = {cid: i for i, cid in enumerate(order)}
    return sorted(records, key=lambda r: pos.get(r.cell_id, len(pos)))


class Footnotes:
    """Numbered distinct texts: each is printed once, rows refer to it as [n]."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def mark(self, text: str) -> str:
        text = " ".join(str(text).split())
        if not text:
            return ""
        n = self.texts.setdefault(text, len(self.texts) + 1)
        return f" [{n}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {t}" for t, n in self.texts.items()]


def _cell(row, metric: str, notes: Footnotes, short: bool = False) -> str:
    v = _value(row.get(metric))
    note = _value(row.get(NOTES.get(metric, ""))) if metric in NOTES else None
    if v is None and note:
        return "n/a" + notes.mark(f"{metric}: {note}")
    return fmt_short(v) if short else fmt(v)


def _pipe_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub markdown table, cells unpadded ('| anvil |'), pipes in cells escaped. Written here rather than
    with tabulate so that `bench run` needs nothing the lent GPU's image lacks (it has pandas, not tabulate)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in body)])


def markdown(records: list[Record]) -> str:
    """One table per scenario type; reasons and notes as numbered footnotes under each table."""
    parts = []
    for sc in dict.fromkeys(r.scenario for r in records):
        df, cols = _view(records, sc)
        notes = Footnotes()
        body = []
        for _, row in df.iterrows():
            status = row["status"] + (notes.mark(row["reason"]) if row["status"] != "ok" else "")
            body.append([*(str(row[c]) for c in BASE_COLUMNS[:-1]), status, *(_cell(row, m, notes) for m in cols)])
        parts += [f"## {sc}\n", _pipe_table([*BASE_COLUMNS, *cols], body), ""]
        if notes.texts:  # markdown line breaks: two trailing spaces
            parts += [line.replace("|", "\\|") + "  " for line in notes.lines()] + [""]
    return "\n".join(parts)


def write_tables(records: list[Record], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    md, cs = out / "table.md", out / "table.csv"
    md.write_text(markdown(records), encoding="utf-8")
    header, body = rows(records)
    import pandas as pd

    pd.DataFrame(body, columns=header).to_csv(cs, index=False)
    return md, cs


def _shared(values: list[str]) -> str | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def rich_tables(records: list[Record]) -> list:
    """Terminal tables, one per scenario type, each meant to fit 120 columns, then one block of footnotes
    (every distinct skip / failure reason and missing-metric note, once)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    notes = Footnotes()
    out: list = []
    for sc in dict.fromkeys(r.scenario for r in records):
        recs = [r for r in records if r.scenario == sc]
        df, _ = _view(recs, sc)
        metrics = TERMINAL.get(sc) or tuple((m, m) for m in key_metrics(sc, recs)[:6])
        schema = _schema(sc)
        shown = [{k: v for k, v in r.params.items() if _shown(schema, k, v)} for r in recs]
        keys = list(dict.fromkeys(k for p in shown for k in p))
        same = [k for k in keys if len({repr(p.get(k)) for p in shown}) == 1]
        model = _shared(list(df["model"]))
        title = " ".join([sc, *([model] if model else []), *(f"{k}={shown[0][k]}" for k in same)])
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        t.add_column("engine", no_wrap=True)
        if model is None:
            t.add_column("model", overflow="fold", max_width=24)
        varying = [k for k in keys if k not in same]
        if varying:
            t.add_column("params", overflow="fold", max_width=24)
        t.add_column("status", no_wrap=True)
        for _, header in metrics:
            t.add_column(header, justify="right", no_wrap=True)
        for r, p, (_, row) in zip(recs, shown, df.iterrows(), strict=True):
            cells = [r.engine]
            if model is None:
                cells.append(row["model"])
            if varying:
                cells.append(" ".join(f"{k}={p[k]}" for k in varying if k in p))
            cells.append(r.status + (notes.mark(r.reason) if r.status != "ok" else ""))
            cells += [_cell(row, m, notes, short=True) for m, _ in metrics]
            t.add_row(*cells, style=STYLE.get(r.status))
        out.append(t)
    if notes.texts:
        out.append(Text("\n".join(notes.lines()), overflow="fold"))
    return out
