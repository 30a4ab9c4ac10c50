"""`bench report RUN_DIR`: one run -> report.md + report.html (tables, plots, telemetry, environment, suite).

The HTML file stands alone (plots embedded as data URIs) so it can be attached to an issue or a CI artifact;
the markdown links the PNGs under RUN_DIR/plots/. Tables come from harness.report, figures from harness.plots.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from harness import plots, report
from harness.results import Record, load_records

ENV_KEYS = (
    "hostname",
    "platform",
    "cpu",
    "cpu_count",
    "python",
    "torch",
    "cuda",
    "cuda_available",
    "gpus",
    "driver",
    "transformers",
    "commit",
    "dirty",
)

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.failed{background:#fde2e2}
tr.skipped{background:#fff6d6}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}code{font-size:12px}"""


def _fmt_env(v: Any) -> str:
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def environment(records: list[Record]) -> list[tuple[str, str]]:
    """(key, value) rows of the machine the run was on; a key that differs across records lists every value."""
    envs = [r.env for r in records if r.env]
    if not envs:
        return []
    keys = [k for k in ENV_KEYS if any(k in e for e in envs)] + sorted({k for e in envs for k in e} - set(ENV_KEYS))
    rows = []
    for k in keys:
        vals = list(dict.fromkeys(_fmt_env(e.get(k)) for e in envs if k in e))
        rows.append((k, " | ".join(vals)))
    return rows


def engines(records: list[Record]) -> list[tuple[str, str, str]]:
    seen: dict[str, tuple[str, str, str]] = {}
    for r in records:
        if r.engine not in seen or (r.engine_info and not seen[r.engine][2]):
            info = ", ".join(f"{k}={v}" for k, v in (r.engine_info or {}).items())
            seen[r.engine] = (r.engine, r.engine_version, info)
    return list(seen.values())


def telemetry_rows(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """One row per record that carries a telemetry summary (samples['telemetry'])."""
    header = [
        "cell",
        "engine",
        "GPU",
        "GPU util %",
        "GPU mem peak MB",
        "power W",
        "energy J",
        "J/token",
        "CPU util %",
        "RSS peak MB",
    ]
    rows = []
    for r in records:
        t = (r.samples or {}).get("telemetry") if isinstance(r.samples, dict) else None
        if not t:
            continue
        g = (t.get("gpus") or [{}])[0]
        gpu = g.get("name") or ("-" if t.get("gpu_present") else "none (CPU only)")
        rows.append(
            [
                f"{r.scenario} {report._params(r)}".strip(),
                r.engine,
                gpu,
                report.fmt(g.get("util_mean")),
                report.fmt(g.get("mem_used_peak_mb")),
                report.fmt(g.get("power_w_mean")),
                report.fmt(t.get("energy_j")),
                report.fmt(t.get("j_per_token")),
                report.fmt(t.get("cpu_util_mean")),
                report.fmt(t.get("rss_peak_mb")),
            ]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]], status_col: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cls = f' class="{html.escape(row[status_col])}"' if status_col is not None else ""
        cells = []
        for c in row:
            num = c.replace(".", "", 1).replace("e", "", 1).replace("-", "").replace("+", "").isdigit()
            cells.append(f"<td{' class=num' if num else ''}>{html.escape(str(c))}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _grouped(records: list[Record]) -> list[Record]:
    """Engines of one case side by side, cases in the order they first appear."""
    first: dict[str, int] = {}
    for r in records:
        first.setdefault(r.cell_id.rsplit("/", 1)[0], len(first))
    return sorted(records, key=lambda r: first[r.cell_id.rsplit("/", 1)[0]])


def render(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path, list[str]]:
    """Write report.md and report.html for a run; returns (md, html, notes)."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run
    records = _grouped(load_records(run))
    if not records:  # an interrupted or never-started run: nothing to report, and main() exits 2
        raise ValueError(f"{run}: the run has no records")
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    figures, why = plots.make_plots(records, out / "plots")
    if why:
        notes.append(f"plots: {why}")
    suite_text = (run / "suite.toml").read_text(encoding="utf-8") if (run / "suite.toml").is_file() else ""
    suites = sorted({r.suite for r in records}) or ["?"]
    runs = sorted({r.run_id for r in records})
    times = sorted(r.time for r in records if r.time)
    status = Counter(r.status for r in records)
    title = f"Anvil bench report: {', '.join(suites)}"
    summary = (
        f"run {', '.join(runs) or '?'}; {len(records)} records "
        f"({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}); "
        f"{times[0] if times else '?'} to {times[-1] if times else '?'}"
    )
    env_rows = environment(records)
    eng_rows = engines(records)
    tel_header, tel_rows = telemetry_rows(records)
    scen = list(dict.fromkeys(r.scenario for r in records))

    md = [f"# {title}\n", summary + "\n"]
    md += ["## Engines\n", _md_table(["engine", "version", "info"], [list(e) for e in eng_rows]), ""]
    md += ["## Results\n", report.markdown(records)]
    if figures:
        md.append("## Plots\n")
        md += [f"### {t}\n\n![{t}]({p.relative_to(out).as_posix()})\n" for t, p in figures]
    if tel_rows:
        md += ["## Telemetry\n", _md_table(tel_header, tel_rows), ""]
    if env_rows:
        md += ["## Environment\n", _md_table(["key", "value"], [list(e) for e in env_rows]), ""]
    if notes:
        md += ["## Notes\n", *[f"- {n}" for n in notes], ""]
    if suite_text:
        md += ["## Suite\n", "```toml", suite_text.rstrip(), "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    h = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>",
    ]
    h += ["<h2>Engines</h2>", _html_table(["engine", "version", "info"], [list(e) for e in eng_rows])]
    h.append("<h2>Results</h2>")
    for sc in scen:
        header, rows = report.rows(records, sc)
        h += [f"<h3>{html.escape(sc)}</h3>", _html_table(header, rows, status_col=header.index("status"))]
    if figures:
        h.append("<h2>Plots</h2>")
        for t, p in figures:
            data = base64.b64encode(p.read_bytes()).decode()
            h.append(f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,{data}'>")
    if tel_rows:
        h += ["<h2>Telemetry</h2>", _html_table(tel_header, tel_rows)]
    if env_rows:
        h += ["<h2>Environment</h2>", _html_table(["key", "value"], [list(e) for e in env_rows])]
    if notes:
        h += ["<h2>Notes</h2><ul>", *[f"<li>{html.escape(n)}</li>" for n in notes], "</ul>"]
    if suite_text:
        h += [
            "<h2>Suite</h2><details><summary>suite.toml</summary>",
            f"<pre><code>{html.escape(suite_text)}</code></pre></details>",
        ]
    h.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(h), encoding="utf-8")
    return md_path, html_path, notes


def main(run_dir: Path, out_dir: Path | None = None) -> int:
    """`bench report`: 0 on success, 2 when the run folder has no readable records."""
    try:
        md, page, notes = render(run_dir, out_dir)
    except (OSError, ValueError) as exc:
        print(f"report: error: {exc}")
        return 2
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {md} and {page}")
    return 0
