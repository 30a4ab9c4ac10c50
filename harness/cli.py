"""The `bench` command line: run a suite, list engines, show the environment."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Anvil benchmark harness.")
console = Console()
if not console.is_terminal:  # logs and CI: wide enough that tables keep one line per row
    console = Console(width=200)
err = Console(stderr=True)


@app.command()
def run(
    suite_file: Path = typer.Argument(..., help="suite TOML file, e.g. suites/smoke.toml"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default results/runs/<suite>-<timestamp>)"),
) -> None:
    """Run every cell of a suite; write records.jsonl, table.md, table.csv and a copy of the suite into the run
    folder. Exit code 0 when no cell failed (skipped is fine), 1 when some did, 2 for an invalid suite."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from harness import report, runner
    from harness.suite import SuiteError, load

    try:
        suite = load(suite_file)
    except SuiteError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    cells = suite.cells
    out_dir = out or runner.default_out_dir(suite)
    console.print(f"suite [bold]{suite.name}[/bold]: {len(cells)} cells -> {out_dir}")
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
                                      f"[/] {payload.cell_id}: {payload.reason}", highlight=False)

        result = runner.run_suite(suite, out_dir, on_event=on_event)
    records = report.ordered(result.records, [c.cell_id for c in cells])
    for table in report.rich_tables(records):
        console.print(table)
    md, cs = report.write_tables(records, result.out_dir)
    console.print(f"wrote {result.out_dir / 'records.jsonl'}, {md}, {cs}")
    if result.failed:
        err.print(f"{len(result.failed)} of {len(records)} cells failed")
        raise typer.Exit(1)


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


if __name__ == "__main__":
    app()
