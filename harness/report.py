"""Turns records into comparable tables: one row per engine per cell, the same columns for every engine.

Markdown and the terminal get one table per scenario type (its key metrics as columns); the CSV is one table
with the union of those columns and a scenario column.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from harness.results import Record

BASE_COLUMNS = ("scenario", "model", "params", "engine", "status")


def key_metrics(scenario: str, records: list[Record]) -> list[str]:
    try:
        from harness import scenarios

        return list(scenarios.get(scenario).KEY_METRICS)
    except (KeyError, ImportError, AttributeError):
        names: dict[str, None] = {}
        for r in records:
            names.update(dict.fromkeys(k for k, v in r.metrics.items() if isinstance(v, (int, float))))
        return list(names)[:8]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _params(r: Record) -> str:
    """The params that tell cells apart: sweepable ones and any set away from the scenario's default."""
    try:
        from harness import scenarios

        schema = scenarios.get(r.scenario).PARAMS
    except (KeyError, ImportError, AttributeError):
        schema = {}

    def shown(k: str, v: Any) -> bool:
        p = schema.get(k)
        return k not in ("warmup", "repeats", "seed", "reference") and (p is None or p.sweep or v != p.default)

    return " ".join(f"{k}={v}" for k, v in r.params.items() if shown(k, v))


def rows(records: list[Record], scenario: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the records of one scenario type (or all, with the union of metric columns)."""
    recs = [r for r in records if scenario is None or r.scenario == scenario]
    metric_cols: list[str] = []
    for sc in dict.fromkeys(r.scenario for r in recs):
        metric_cols += [m for m in key_metrics(sc, [r for r in recs if r.scenario == sc]) if m not in metric_cols]
    header = [*BASE_COLUMNS, *metric_cols, "reason"]
    body = []
    for r in recs:
        model = f"{r.model} {r.dtype} {r.device}"
        body.append([r.scenario, model, _params(r), r.engine, r.status,
                     *(fmt(r.metrics.get(m)) for m in metric_cols), r.reason.replace("\n", " ")[:160]])
    return header, body


def ordered(records: list[Record], order: list[str] | None = None) -> list[Record]:
    """Records in suite cell order (order = cell ids), so the engines of one cell sit together."""
    if not order:
        return list(records)
    pos = {cid: i for i, cid in enumerate(order)}
    return sorted(records, key=lambda r: pos.get(r.cell_id, len(pos)))


def markdown(records: list[Record]) -> str:
    parts = []
    for sc in dict.fromkeys(r.scenario for r in records):
        header, body = rows(records, sc)
        parts.append(f"## {sc}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        parts.append("")
    return "\n".join(parts)


def write_tables(records: list[Record], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    md, cs = out / "table.md", out / "table.csv"
    md.write_text(markdown(records), encoding="utf-8")
    header, body = rows(records)
    with open(cs, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    return md, cs


def rich_tables(records: list[Record]) -> list:
    from rich.table import Table

    style = {"ok": "green", "failed": "red", "skipped": "yellow"}
    tables = []
    for sc in dict.fromkeys(r.scenario for r in records):
        header, body = rows(records, sc)
        t = Table(title=sc, show_lines=False)
        for h in header:
            t.add_column(h, overflow="fold", justify="right" if h not in (*BASE_COLUMNS, "reason") else "left")
        for row in body:
            s = row[BASE_COLUMNS.index("status")]
            t.add_row(*row, style=style.get(s) if s != "ok" else None)
        tables.append(t)
    return tables
