"""`bench profile --tool torch|ncu|nsys -- CELL`: run one cell under a profiler; write the trace + a top-kernels table.

CELL is either a suite file and filters (`suites/smoke.toml scenario=throughput engine=anvil batch=4`, or
`cell=N` for the suite's N-th cell) or an inline cell (`engine=anvil model=tiny scenario=throughput batch=1
prompt_len=64 gen_len=16`, plus dtype= / device= and any scenario parameter). Values are TOML literals.

- torch: torch.profiler in this process (CPU, and CUDA when there is a GPU): trace.json (chrome://tracing,
  Perfetto) and top_kernels.md (CUDA kernels by self device time; on a CPU, operators by self CPU time).
- nsys / ncu: the cell runs in a child process under the tool, with NVTX ranges on (ANVIL_NVTX=1), giving
  nsys.nsys-rep or ncu.ncu-rep plus top_kernels.md from the tool's own kernel summary. A tool that is not on PATH
  is a clear error and exit code 3 (nsys is absent on the lent H100; ncu is there).
The model is loaded before profiling starts; the scenario's warm-up runs inside the profiled region.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TOOLS = ("torch", "ncu", "nsys")
CELL_KEYS = ("engine", "model", "dtype", "device", "scenario")
NCU_DEFAULT_ARGS = ["--launch-count", "300"]  # profiling every kernel of a long cell takes hours: bound it


class ProfileError(RuntimeError):
    """Something the user can fix (bad cell spec, missing tool); exit code in .code."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    return json.dumps(v)  # str and int


def _pairs(tokens: list[str]) -> dict[str, Any]:
    from harness.suite import SuiteError, parse_filters

    try:
        return parse_filters(tokens)
    except SuiteError as exc:
        raise ProfileError(f"cell spec: {exc}") from None


def resolve_cell(tokens: list[str]):
    """(Suite, Cell) for a cell spec (see the module docstring)."""
    from harness.suite import SuiteError, load, parse, select

    if not tokens:
        raise ProfileError("no cell given: bench profile --tool torch -- engine=anvil model=tiny scenario=throughput")
    try:
        if tokens[0].endswith(".toml"):
            suite = load(tokens[0])
            want = _pairs(tokens[1:])
            cells = suite.cells
            if "cell" in want:
                idx = int(want.pop("cell"))
                if not 0 <= idx < len(cells):
                    raise ProfileError(f"cell={idx}: the suite has cells 0..{len(cells) - 1}")
                cells = [cells[idx]]
            cells = select(cells, want)
            if not cells:
                raise ProfileError(f"no cell of {tokens[0]} matches {' '.join(tokens[1:])}")
            if len(cells) > 1:
                print(f"profile: {len(cells)} cells match; profiling the first: {cells[0].cell_id}", file=sys.stderr)
            return suite, cells[0]
        spec = _pairs(tokens)
        missing = [k for k in ("engine", "model", "scenario") if k not in spec]
        if missing:
            raise ProfileError(f"cell spec needs {', '.join(missing)} (e.g. engine=anvil model=tiny scenario=latency)")
        params = {k: v for k, v in spec.items() if k not in CELL_KEYS}
        lines = [
            "[suite]",
            'name = "profile"',
            f"engines = [{json.dumps(spec['engine'])}]",
            "",
            "[[models]]",
            f"name = {json.dumps(str(spec['model']))}",
        ]
        lines += [f"{k} = {json.dumps(spec[k])}" for k in ("dtype", "device") if k in spec]
        lines += ["", "[[scenarios]]", f"type = {json.dumps(spec['scenario'])}"]
        for k, v in params.items():
            if isinstance(v, list):
                raise ProfileError(f"{k}: one cell only; give a single value, not a list")
            lines.append(f"{k} = {_toml(v)}")
        suite = parse("\n".join(lines) + "\n", "<profile cell>")
        return suite, suite.cells[0]
    except SuiteError as exc:
        raise ProfileError(str(exc)) from None


def run_cell(suite, cell, out_dir: Path, profiled=None) -> dict[str, Any]:
    """Load the engine, then run the cell's scenario (inside `profiled`, a context manager, when given)."""
    import contextlib

    from adapters import base
    from engine import nvtx
    from harness import scenarios
    from harness.workload import Context, vocab_size, weight_bytes_per_step

    adapter = base.get(cell.engine)
    ok, why = adapter.available()
    if not ok:
        raise ProfileError(f"engine {cell.engine} is not available: {why}")
    adapter.load(cell.model.spec, dict(suite.options.get(cell.engine, {})))
    try:
        spec = cell.model.spec
        ctx = Context(engine=cell.engine, case_id=cell.case_id, vocab_size=vocab_size(spec), out_dir=out_dir,
                      weight_bytes=weight_bytes_per_step(spec))
        with profiled if profiled is not None else contextlib.nullcontext(), nvtx.range(f"cell {cell.scenario}"):
            metrics, _ = scenarios.get(cell.scenario).run(adapter, cell.param_dict, ctx)
    finally:
        adapter.close()
    return metrics


def _md(title: str, header: list[str], rows: list[list[str]]) -> str:
    out = [f"# {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def top_table(items: list[tuple[str, int, float]], title: str, top: int) -> str:
    """Markdown table of (name, calls, total us) sorted by time, with the share of the total."""
    items = sorted(items, key=lambda x: -x[2])
    total = sum(t for _, _, t in items) or 1.0
    rows = [
        [n.replace("|", "\\|")[:110], str(c), f"{t / 1000:.3f}", f"{t / c if c else 0:.1f}", f"{100 * t / total:.1f}%"]
        for n, c, t in items[:top]
    ]
    return _md(title, ["name", "calls", "total ms", "avg us", "share"], rows)


def profile_torch(suite, cell, out: Path, top: int) -> tuple[dict, str]:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and cell.model.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts, record_shapes=False)
    metrics = run_cell(suite, cell, out, prof)
    prof.export_chrome_trace(str(out / "trace.json"))
    items = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            items.append((e.key, e.count, float(getattr(e, "self_device_time_total", 0.0))))
        else:
            items.append((e.key, e.count, float(e.self_cpu_time_total)))
    kind = "CUDA kernels by self device time" if cuda else "operators by self CPU time (no GPU)"
    return metrics, top_table(items, f"Top {kind}: {cell.cell_id}", top)


def _external(tool: str, tokens: list[str], out: Path, top: int, tool_args: list[str]) -> str:
    exe = shutil.which(tool)
    if exe is None:
        hint = {
            "nsys": "install NVIDIA Nsight Systems (it is not on the lent H100; ncu is), or use --tool ncu / torch",
            "ncu": "install NVIDIA Nsight Compute (ships with the CUDA toolkit), or use --tool torch",
        }[tool]
        raise ProfileError(f"{tool} not found on PATH: {hint}", code=3)
    inner = [sys.executable, "-m", "harness.profile", "--tool", "none", "--out", str(out), "--", *tokens]
    env = dict(os.environ, ANVIL_NVTX="1")
    if tool == "nsys":
        rep = out / "nsys"
        cmd = [exe, "profile", "-o", str(rep), "--force-overwrite=true", "--trace=cuda,nvtx,osrt", *tool_args, *inner]
    else:
        rep = out / "ncu"
        cmd = [
            exe,
            "--target-processes",
            "all",
            "--nvtx",
            "-o",
            str(rep),
            "-f",
            *(tool_args or NCU_DEFAULT_ARGS),
            *inner,
        ]
    print("profile: " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise ProfileError(f"{tool} exited with code {done.returncode}", code=1)
    title = f"Top CUDA kernels ({tool}): {' '.join(tokens)}"
    try:
        items = _nsys_kernels(exe, rep) if tool == "nsys" else _ncu_kernels(exe, rep)
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as exc:
        return f"# {title}\n\ncould not summarise the report ({type(exc).__name__}: {exc}); open it in the GUI.\n"
    return top_table(items, title, top)


def _nsys_kernels(exe: str, rep: Path) -> list[tuple[str, int, float]]:
    for report in ("cuda_gpu_kern_sum", "gpukernsum"):  # the report's name changed in nsys 2023
        done = subprocess.run(
            [exe, "stats", "--report", report, "--format", "csv", "--output", "-", f"{rep}.nsys-rep"],
            capture_output=True,
            text=True,
        )
        text = done.stdout[done.stdout.find("Time") :] if "Time" in done.stdout else ""
        if done.returncode == 0 and text:
            rows = list(csv.DictReader(io.StringIO(text)))
            return [(r["Name"], int(r["Instances"]), float(r["Total Time (ns)"]) / 1000.0) for r in rows]
    raise ValueError("nsys stats gave no kernel summary")


def _ncu_kernels(exe: str, rep: Path) -> list[tuple[str, int, float]]:
    """Per-kernel-name (calls, total us) from `ncu -i REP --csv --page raw`: a header row, a units row, data rows."""
    done = subprocess.run(
        [exe, "-i", f"{rep}.ncu-rep", "--csv", "--page", "raw", "--metrics", "gpu__time_duration.sum"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = list(csv.DictReader(done.stdout[done.stdout.find('"ID"') :].splitlines()))
    if not rows:
        raise ValueError("ncu printed no kernels")
    unit = "nsecond"
    if not rows[0].get("ID", "").strip().isdigit():  # the units row
        unit = (rows.pop(0).get("gpu__time_duration.sum") or unit).strip()
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1e-3)
    agg: dict[str, list[float]] = {}
    for r in rows:
        dur = (r.get("gpu__time_duration.sum") or "").replace(",", "")
        if dur:
            agg.setdefault(r.get("Kernel Name") or r.get("Function Name") or "?", []).append(float(dur) * scale)
    return [(n, len(v), sum(v)) for n, v in agg.items()]


def main(
    tool: str, tokens: list[str], out: Path | None = None, top: int = 20, tool_args: list[str] | None = None
) -> int:
    """`bench profile`: 0 on success; 2 bad cell spec; 3 tool not installed; 1 the cell or the tool failed."""
    if tool not in (*TOOLS, "none"):
        print(f"profile: error: --tool must be one of {', '.join(TOOLS)}, got {tool!r}", file=sys.stderr)
        return 2
    try:
        suite, cell = resolve_cell(tokens)
        out = Path(out) if out else Path("results/runs") / f"profile-{cell.engine}-{cell.scenario}-{tool}"
        out.mkdir(parents=True, exist_ok=True)
        if tool == "none":  # the child of ncu / nsys
            metrics = run_cell(suite, cell, out)
        elif tool == "torch":
            metrics, table = profile_torch(suite, cell, out, top)
        else:
            table, metrics = _external(tool, tokens, out, top, tool_args or []), {}
    except ProfileError as exc:
        print(f"profile: error: {exc}", file=sys.stderr)
        return exc.code
    if metrics:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
    if tool != "none":
        (out / "top_kernels.md").write_text(table, encoding="utf-8")
        print(table)
        print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))})")
    return 0


if __name__ == "__main__":  # the child process under ncu / nsys: python -m harness.profile --tool none --out D -- CELL
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harness.profile")
    ap.add_argument("--tool", default="none", choices=(*TOOLS, "none"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("cell", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    sys.exit(main(a.tool, [t for t in a.cell if t != "--"], a.out, a.top))
