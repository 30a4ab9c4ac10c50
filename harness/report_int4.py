"""Section 6 of the technical report, int4 weights (harness/report_build.py's SECTIONS, re-exported by
harness/report_sections.py): the quantization and int4 kernel result files. benchmarks/bench_int4.py files of the
newest run are shown in full, each earlier run's file as one summary row (its fastest int4 kernel per shape at M = 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report_build import env_of, num, prov


def int4(ctx) -> list[tuple]:
    from harness.report_sections import _group, lines, ratio, shown  # lazily: that module re-exports this one

    files = ctx.find(r"int4|quant|awq|gptq|nf4")
    out = [] if files else [ctx.not_measured("int4 kernels and accuracy", "results/gpu/int4-h200.json "
                                             "(benchmarks/bench_int4.py), results/cpu/quant-tiny.json (scripts/quant_eval.py)")]
    kern = {rel: d for rel in files if rel.endswith(".json") and is_kernel_file(d := ctx.json(rel))}
    last, older = newest_run(kern)  # kernel files of earlier runs: one summary row each
    for rel in files:
        if rel in older:
            continue
        out.append(("h", 3, f"`{rel}`"))
        if rel not in kern:
            out += shown(ctx, rel)
            continue
        data = kern[rel]
        rows = data["rows"]
        sweep, rows = [r for r in rows if "[" in r["kernel"]], [r for r in rows if "[" not in r["kernel"]]  # --sweep configs
        out += [("p", f"The defaults below; {len(sweep)} rows of launch-config sweeps are in the file.")] if sweep else []
        groups = _group([r for r in rows if r["kernel"] != "bf16_cublas"], lambda r: f"{r['shape']} {r['kernel']}")
        out += [("table", ["shape", "N", "K", "M", "kernel", "ms", "GB/s", "x bf16 dense", "max rel err"],
                 [[r["shape"], r["N"], r["K"], r["M"], r["kernel"], num(r["median_ms"], 4), num(r["gb_s"]),
                   ratio(r["speedup_vs_dense"], 1), f"{r['max_rel_err']:.1e}"] for r in rows]), prov(env_of(data), rel),
                lines(ctx, f"int4-{Path(rel).stem}.png", f"int4 / NF4 kernels vs dense bf16 ({rel})",
                      {k: [(r["M"], r["speedup_vs_dense"]) for r in g] for k, g in groups.items()},
                      "M (tokens in the batch)", "speed-up vs bf16 cuBLAS", log="x", one=True)]
    return out + history_blocks(kern, older, last)


def is_kernel_file(data: Any) -> bool:
    """A benchmarks/bench_int4.py result (rows of kernel x shape x M timings against bf16 cuBLAS)."""
    rows = data.get("rows") if isinstance(data, dict) else None
    return bool(rows and isinstance(rows[0], dict) and {"kernel", "M", "speedup_vs_dense", "shape"} <= set(rows[0]))


def newest_run(kern: dict[str, dict]) -> tuple[str, list[str]]:
    """(the commit of the newest-dated kernel file, the files of other commits)."""
    if not kern:
        return "", []
    last = max((str(env_of(d).get("date", "")), str(env_of(d).get("commit", ""))) for d in kern.values())[1]
    return last, [rel for rel, d in kern.items() if str(env_of(d).get("commit", "")) != last]


def history_blocks(kern: dict[str, dict], older: list[str], last: str) -> list[tuple]:
    rows = []
    for rel in older:
        data, best = kern[rel], {}
        for r in data["rows"]:
            if r["M"] == 1 and r["kernel"] != "bf16_cublas" and r.get("status", "ok") == "ok":
                best[r["shape"]] = min(best.get(r["shape"], float("inf")), r["median_ms"])
        e = env_of(data)
        rows.append([f"`{rel}`", e.get("commit", "-"), str(e.get("date", "-"))[:10], len(data["rows"]),
                     ", ".join(f"{k} {1e3 * v:.1f}" for k, v in best.items()) or "-"])
    if not rows:
        return []
    return [("h", 3, "Earlier int4 kernel runs"),
            ("p", f"The kernel files above are those of the newest run ({last}); each earlier one in a row: the "
                  "fastest int4 kernel per shape at M = 1, µs."),
            ("table", ["file", "commit", "date", "rows", "fastest at M = 1 (µs)"], rows)]
