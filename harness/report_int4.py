"""The int4 section's history (harness/report_sections.int4): benchmarks/bench_int4.py files of the newest run are
shown in full, each earlier run's file as one summary row (its fastest int4 kernel per shape at M = 1)."""

from __future__ import annotations

from typing import Any

from harness.report_build import env_of


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
