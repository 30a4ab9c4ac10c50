"""The `bench` command line: run a suite, list engines, show the environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Anvil benchmark harness.")
console = Console()
if not console.is_terminal:  # logs and CI: wide enough that tables keep one line per row
    console = Console(width=200)
err = Console(stderr=True)


@app.command()
def run(
    suite_file: Path = typer.Argument(..., help="suite TOML file, e.g. suites/smoke.toml"),
    out: Path | None = typer.Option(
        None, "--out", help="run folder (default results/runs/<suite>-<timestamp>-<6 hex>, always a new one)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="let --out name a folder that already holds files"),
    only: list[str] = typer.Option(
        [], "--only", metavar="KEY=VALUE",
        help="run only the matching cells (repeatable, all must match): engine=, model=, scenario=, dtype=, "
        "device= or a scenario parameter such as batch=8"),
) -> None:
    """Run every cell of a suite; write records.jsonl, table.md, table.csv and a copy of the suite into the run
    folder. Exit code 0 when no cell failed (skipped is fine), 1 when some did (or the run folder stopped taking
    writes), 2 for an invalid suite, filters that match no cell, or a run folder that cannot be used; 130 / 143
    after SIGINT / SIGTERM (the unfinished cells are recorded as failed and the tables written)."""
    from harness import report, runner
    from harness.suite import SuiteError, load, parse_filters, select

    try:
        suite = load(suite_file)
        cells = select(suite.cells, parse_filters(only), str(suite_file))
        if not cells:
            raise SuiteError(f"{suite_file}: no cell matches {' '.join(only)} (of {len(suite.cells)} cells)")
    except SuiteError as exc:
        _fail(str(exc), 2)
    if out is not None and out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        _fail(f"--out {out} already exists and is not an empty folder; pass --overwrite to replace its records", 2)
    try:
        out_dir = out or runner.default_out_dir(suite)
    except OSError as exc:
        _fail(f"cannot create a run folder under results/runs: {exc.strerror or exc}", 2)
    console.print(f"suite [bold]{suite.name}[/bold]: {len(cells)} cells -> {out_dir}")
    with runner.stop_on_signals() as stop:
        try:
            result = _run_with_progress(runner, suite, cells, out_dir, stop)
        except runner.OutputError as exc:
            _fail(str(exc), 1 if exc.started else 2)
        records = report.ordered(result.records, [c.cell_id for c in cells])
        for table in report.rich_tables(records):
            console.print(table)
        try:
            md, cs = report.write_tables(records, result.out_dir)
        except OSError as exc:
            _fail(f"writing the tables into {result.out_dir} failed: {exc.strerror or exc}", 1)
    console.print(f"wrote {result.out_dir / 'records.jsonl'}, {md}, {cs}")
    if stop.signum is not None:
        err.print(f"interrupted by {runner.signal_name(stop.signum)}: {len(result.failed)} of {len(records)} cells "
                  "failed or were not run", highlight=False)
        raise typer.Exit(128 + stop.signum)
    if result.failed:
        err.print(f"{len(result.failed)} of {len(records)} cells failed")
        raise typer.Exit(1)


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr, no traceback, and the exit code."""
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_with_progress(runner, suite, cells, out_dir: Path, stop):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("starting", total=len(cells))

        def on_event(kind, payload):
            if kind == "start":
                short = " ".join(f"{k}={v}" for k, v in payload.params if k not in ("warmup", "repeats", "seed"))
                bar.update(task, description=f"{payload.engine} {payload.scenario} {short}"[:70])
            elif kind == "record":
                bar.advance(task)
                if payload.status != "ok":
                    bar.console.print(f"[{'red' if payload.status == 'failed' else 'yellow'}]{payload.status}"
                                      f"[/] {escape(payload.cell_id)}: {escape(payload.reason)}", highlight=False)

        return runner.run_suite(suite, out_dir, on_event=on_event, cells=cells, stop=stop)


@app.command("list")
def list_engines() -> None:
    """Every registered engine: available (with its version) or not, with the reason."""
    from rich.table import Table

    from adapters.base import REGISTRY, availability

    t = Table("engine", "status", "version / reason", "adapter")
    for name, (ok, why) in availability().items():
        t.add_row(name, "[green]available[/]" if ok else "[yellow]not available[/]", why, REGISTRY[name])
    console.print(t)


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Hardware and software snapshot: GPUs, driver, CUDA, torch, Python, CPU, commit."""
    from rich.table import Table

    from harness.envinfo import snapshot

    snap = snapshot()
    if as_json:
        typer.echo(json.dumps(snap, indent=2))
        return
    t = Table("key", "value")
    for k, v in snap.items():
        t.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    console.print(t)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="run folder (holds records.jsonl)"),
    out: Path | None = typer.Option(None, "--out", help="where report.md / report.html / plots go (default: run_dir)"),
) -> None:
    """Render report.md + a standalone report.html: tables, plots (throughput vs batch / concurrency, latency CDFs,
    TTFT vs prompt length), telemetry and the environment. Exit 2 when the run has no readable records."""
    from harness import html_report

    raise typer.Exit(html_report.main(run_dir, out))


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="the before run folder"),
    run_b: Path = typer.Argument(..., help="the after run folder"),
    k: float = typer.Option(2.0, "--k", help="noise band: |delta| <= k x pooled repeat spread"),
    min_rel: float = typer.Option(0.02, "--min-rel", help="noise floor as a fraction of A (metrics without repeats)"),
    all_metrics: bool = typer.Option(False, "--all", help="every numeric metric, not only each scenario's key ones"),
    md: Path | None = typer.Option(None, "--md", help="also write the table as markdown here"),
) -> None:
    """Per-metric deltas between two runs with verdicts better / worse / noise from each run's repeat spread."""
    from harness import compare

    raise typer.Exit(compare.main(run_a, run_b, k, min_rel, all_metrics, md))


@app.command("gate")
def gate_cmd(
    run_dir: Path = typer.Argument(..., help="run folder (holds records.jsonl)"),
    baseline: Path = typer.Option(..., "--baseline", help="results/baselines/NAME.json"),
    write: bool = typer.Option(False, "--write", help="write a proposed baseline from this run instead of checking"),
    reference: str | None = typer.Option(None, "--reference", help="with --write: the engine ratios are taken to"),
    tolerance: float = typer.Option(0.5, "--tolerance", help="with --write: relative tolerance of ratio checks"),
) -> None:
    """Check a run against a baseline: exit 1 when parity breaks or a metric regresses past its tolerance, 2 when
    the run or the baseline cannot be used, 0 otherwise."""
    from harness import gate

    raise typer.Exit(gate.main(run_dir, baseline, write, reference, tolerance))


@app.command("profile", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile_cmd(
    ctx: typer.Context,
    tool: str = typer.Option(..., "--tool", help="torch | ncu | nsys"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default results/runs/profile-...)"),
    top: int = typer.Option(20, "--top", help="rows in the top-kernels table"),
    tool_args: str = typer.Option("", "--tool-args", help="extra arguments for ncu / nsys, as one string"),
) -> None:
    """Run one cell under a profiler: bench profile --tool torch -- engine=anvil model=tiny scenario=latency
    (or -- suites/X.toml cell=N). Writes the trace and top_kernels.md. Exit 3 when the tool is not installed."""
    import shlex

    from harness import profile

    raise typer.Exit(profile.main(tool, [a for a in ctx.args if a != "--"], out, top, shlex.split(tool_args)))


from harness.serve_cmd import serve as _serve  # noqa: E402  (`bench serve`: engine/server over the core)

app.command("serve")(_serve)
from harness.quantize_cmd import quantize_cmd as _quantize  # noqa: E402  (`bench quantize`: engine/quant)

app.command("quantize")(_quantize)

if __name__ == "__main__":
    app()
