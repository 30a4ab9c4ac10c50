"""CI gates: a run's records against a committed baseline (results/baselines/NAME.json) -> pass/fail, exit code.

Baseline file (JSON):
    {
      "schema_version": 1,
      "suite": "smoke",                       # must match the run's suite name
      "note": "why these numbers",
      "fail_on_failed": true,                 # any failed cell fails the gate (default true)
      "fail_on_skipped": false,               # skipped cells (engine not installed) are fine by default
      "checks": [
        {"name": "anvil matches hf greedily", "scenario": "parity", "engine": "anvil",
         "metric": "first_mismatch", "equals": null},
        {"name": "anvil logits close to hf", "scenario": "parity", "engine": "anvil",
         "metric": "max_logit_diff", "max": 1e-3},
        {"name": "anvil/hf decode tok/s", "scenario": "throughput", "engine": "anvil", "reference": "hf",
         "where": {"batch": 1}, "metric": "decode_tok_s",
         "baseline": 0.8, "tolerance": 0.75, "better": "higher"}
      ]
    }

A check applies to every ok record of its scenario and engine whose params contain `where`; none found fails
it unless "required": false. With "reference", the value is the ratio metric(engine) / metric(reference) on the same
case of the same run: on shared, noisy machines only ratios between engines measured side by side are stable.
Bounds: "min" / "max" / "equals" are absolute; "baseline" + "tolerance" is relative: a higher-is-better value
fails below baseline * (1 - tolerance), a lower-is-better one above baseline * (1 + tolerance).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.results import Record, load_records

SCHEMA_VERSION = 1
CHECK_KEYS = {
    "name",
    "scenario",
    "engine",
    "reference",
    "where",
    "metric",
    "min",
    "max",
    "equals",
    "baseline",
    "tolerance",
    "better",
    "required",
}


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message names the file and the check."""


@dataclass
class Verdict:
    check: str  # the check's name
    cell: str  # the record's cell id (or what was looked for)
    value: Any  # the measured value (a ratio when the check has a reference)
    bound: str  # what it had to satisfy, in words
    ok: bool
    note: str = ""


TOP_KEYS = {"schema_version", "suite", "note", "fail_on_failed", "fail_on_skipped", "checks"}


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and check a baseline's structure; BaselineError names the file and the key (`bench gate` exits 2:
    a malformed baseline must never read as a regression)."""
    p = Path(path)
    try:
        base = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read baseline: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(base, dict):
        raise BaselineError(f"{path}: expected a JSON object, got {type(base).__name__}")
    if base.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(f"{path}: schema_version must be {SCHEMA_VERSION}, got {base.get('schema_version')!r}")
    unknown = set(base) - TOP_KEYS
    if unknown:
        raise BaselineError(f"{path}: {sorted(unknown)[0]}: unknown key; known: {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(base.get("suite"), str) or not base["suite"]:
        raise BaselineError(f"{path}: suite: expected the name of the suite this baseline is for, "
                            f"got {base.get('suite')!r}")
    for k in ("fail_on_failed", "fail_on_skipped"):
        if k in base and not isinstance(base[k], bool):
            raise BaselineError(f"{path}: {k}: expected true or false, got {base[k]!r}")
    if "note" in base and not isinstance(base["note"], str):
        raise BaselineError(f"{path}: note: expected a string")
    checks = base.get("checks")
    if not isinstance(checks, list) or not checks:
        raise BaselineError(f"{path}: checks: expected a non-empty list of checks, got {checks!r:.60}")
    for i, c in enumerate(checks):
        _check_entry(f"{path}: checks[{i}]", c)
    return base


def _check_entry(where: str, c: Any) -> None:
    if not isinstance(c, dict):
        raise BaselineError(f"{where}: expected an object, got {type(c).__name__}")
    unknown = set(c) - CHECK_KEYS
    if unknown:
        raise BaselineError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(CHECK_KEYS))}")
    for k in ("name", "scenario", "engine", "metric"):
        if k not in c:
            raise BaselineError(f"{where}: missing '{k}'")
        if not isinstance(c[k], str) or not c[k]:
            raise BaselineError(f"{where}.{k}: expected a non-empty string, got {c[k]!r}")
    if "reference" in c and not (isinstance(c["reference"], str) and c["reference"]):
        raise BaselineError(f"{where}.reference: expected an engine name, got {c['reference']!r}")
    if "where" in c and not isinstance(c["where"], dict):
        raise BaselineError(f"{where}.where: expected an object of params, got {type(c['where']).__name__}")
    if "required" in c and not isinstance(c["required"], bool):
        raise BaselineError(f"{where}.required: expected true or false, got {c['required']!r}")
    if not ({"min", "max", "equals", "baseline"} & set(c)):
        raise BaselineError(f"{where} ({c['name']}): needs min, max, equals, or baseline + tolerance")
    for k in ("min", "max", "baseline", "tolerance"):
        if k in c and not _is_num(c[k]):
            raise BaselineError(f"{where}.{k}: expected a finite number, got {c[k]!r}")
    if "baseline" in c and ("tolerance" not in c or c.get("better") not in ("higher", "lower")):
        raise BaselineError(f"{where} ({c['name']}): baseline needs tolerance and better = higher | lower")
    if "tolerance" in c and "baseline" not in c:
        raise BaselineError(f"{where}.tolerance: only meaningful with baseline")
    if "better" in c and c["better"] not in ("higher", "lower"):
        raise BaselineError(f"{where}.better: expected higher or lower, got {c['better']!r}")
    if "tolerance" in c and c["tolerance"] < 0:
        raise BaselineError(f"{where}.tolerance: must be >= 0, got {c['tolerance']}")
    if "min" in c and "max" in c and c["min"] > c["max"]:
        raise BaselineError(f"{where}.min: {c['min']} is above max {c['max']}: no value can pass")


def check_suite(records: list[Record], base: dict[str, Any], path: str | Path) -> None:
    """A baseline for another suite than the run's is unusable (exit 2), not a regression."""
    suites = sorted({r.suite for r in records})
    if suites and suites != [base["suite"]]:
        raise BaselineError(f"{path}: suite: the baseline is for suite {base['suite']!r}, the run is of "
                            f"{', '.join(map(repr, suites))}")


def _case(cell_id: str) -> str:
    return cell_id.rsplit("/", 1)[0]


def _matches(r: Record, c: dict[str, Any]) -> bool:
    return (
        r.scenario == c["scenario"]
        and r.engine == c["engine"]
        and all(r.params.get(k) == v for k, v in (c.get("where") or {}).items())
    )


def _bound(c: dict[str, Any]) -> str:
    parts = []
    if "min" in c:
        parts.append(f">= {c['min']}")
    if "max" in c:
        parts.append(f"<= {c['max']}")
    if "equals" in c:
        parts.append(f"== {c['equals']}")
    if "baseline" in c:
        b, t = float(c["baseline"]), float(c["tolerance"])
        parts.append(
            f">= {b * (1 - t):.4g} (baseline {b:.4g} - {t:.0%})"
            if c["better"] == "higher"
            else f"<= {b * (1 + t):.4g} (baseline {b:.4g} + {t:.0%})"
        )
    return " and ".join(parts)


def _judge(value: Any, c: dict[str, Any]) -> bool:
    if "equals" in c and value != c["equals"]:
        return False
    if any(k in c for k in ("min", "max", "baseline")):
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False
    if "min" in c and value < c["min"]:
        return False
    if "max" in c and value > c["max"]:
        return False
    if "baseline" in c:
        b, t = float(c["baseline"]), float(c["tolerance"])
        return value >= b * (1 - t) if c["better"] == "higher" else value <= b * (1 + t)
    return True


def evaluate(records: list[Record], base: dict[str, Any]) -> list[Verdict]:
    """Every check against the records, plus one verdict per failed (or, if asked, skipped) cell."""
    out: list[Verdict] = []
    suites = {r.suite for r in records}
    if base.get("suite") and suites and suites != {base["suite"]}:
        out.append(
            Verdict(
                "suite",
                ", ".join(sorted(suites)),
                None,
                f"suite == {base['suite']}",
                False,
                "the run is of another suite than the baseline",
            )
        )
    if not records:
        out.append(Verdict("records", "-", 0, "at least one record", False, "the run has no records"))
    for r in records:
        if r.status == "failed" and base.get("fail_on_failed", True):
            out.append(Verdict("no failed cells", r.cell_id, "failed", "status ok", False, r.reason[:300]))
        if r.status == "skipped" and base.get("fail_on_skipped", False):
            out.append(Verdict("no skipped cells", r.cell_id, "skipped", "status ok", False, r.reason[:300]))
    by_cell = {r.cell_id: r for r in records}
    for c in base.get("checks", []):
        hits = [r for r in records if _matches(r, c)]
        ok_hits = [r for r in hits if r.status == "ok"]
        if not ok_hits:
            if c.get("required", True):
                what = f"{c['scenario']}/{c['engine']}" + (f" where {c['where']}" if c.get("where") else "")
                why = "all matching cells failed or were skipped" if hits else "no matching cell in the run"
                out.append(Verdict(c["name"], what, None, _bound(c), False, why))
            continue
        for r in ok_hits:
            value, note = r.metrics.get(c["metric"], _MISSING), ""
            if value is _MISSING:
                out.append(Verdict(c["name"], r.cell_id, None, _bound(c), False, f"metric {c['metric']} not recorded"))
                continue
            if c.get("reference"):
                ref = by_cell.get(f"{_case(r.cell_id)}/{c['reference']}")
                ref_v = ref.metrics.get(c["metric"]) if ref is not None and ref.status == "ok" else None
                if not isinstance(ref_v, int | float) or not ref_v or not isinstance(value, int | float):
                    if c.get("required", True):
                        out.append(
                            Verdict(
                                c["name"],
                                r.cell_id,
                                value,
                                _bound(c),
                                False,
                                f"no usable {c['reference']} {c['metric']} on the same case",
                            )
                        )
                    continue
                note = f"{value:.4g} / {c['reference']} {ref_v:.4g}"
                value = value / ref_v
            out.append(Verdict(c["name"], r.cell_id, value, _bound(c), _judge(value, c), note))
    return out


_MISSING = object()


def gate(run_dir: str | Path, baseline: str | Path) -> tuple[bool, list[Verdict]]:
    records = load_records(run_dir)
    base = load_baseline(baseline)
    check_suite(records, base, baseline)
    verdicts = evaluate(records, base)
    return all(v.ok for v in verdicts), verdicts


def render(verdicts: list[Verdict]) -> str:
    """Plain-text table, failures first (CI logs)."""
    rows = sorted(verdicts, key=lambda v: v.ok)
    lines = []
    for v in rows:
        val = f"{v.value:.4g}" if isinstance(v.value, float) else str(v.value)
        lines.append(
            f"{'PASS' if v.ok else 'FAIL'}  {v.check}: {val} (need {v.bound})  [{v.cell}]"
            + (f"  {v.note}" if v.note else "")
        )
    failed = sum(not v.ok for v in verdicts)
    lines.append(f"gate: {len(verdicts) - failed} passed, {failed} failed")
    return "\n".join(lines)


PERF_SCENARIOS = ("throughput", "latency", "long_context", "serving")


def propose(records: list[Record], reference: str | None = None, tolerance: float = 0.5) -> dict[str, Any]:
    """A baseline from a run, to edit and commit: parity checks for every non-reference engine, and per case
    ratio checks (engine / reference on the same case) of each scenario's key metrics at the given tolerance."""
    from harness import scenarios
    from harness.compare import direction

    ok = [r for r in records if r.status == "ok"]
    engines = list(dict.fromkeys(r.engine for r in ok))
    ref = reference or ("hf" if "hf" in engines else engines[0] if engines else None)
    checks: list[dict[str, Any]] = []
    for eng in engines:
        par = [r for r in ok if r.scenario == "parity" and r.engine == eng and not r.metrics.get("is_reference")]
        if par:
            worst = max(float(r.metrics.get("max_logit_diff") or 0.0) for r in par)
            checks += [
                {
                    "name": f"parity: {eng} greedy tokens equal the reference's",
                    "scenario": "parity",
                    "engine": eng,
                    "metric": "first_mismatch",
                    "equals": None,
                },
                {
                    "name": f"parity: {eng} logits close to the reference's",
                    "scenario": "parity",
                    "engine": eng,
                    "metric": "max_logit_diff",
                    "max": float(f"{max(worst * 4, 1e-5):.2g}"),
                },
            ]
    by_cell = {r.cell_id: r for r in ok}
    for r in ok:
        if r.scenario not in PERF_SCENARIOS or r.engine == ref:
            continue
        other = by_cell.get(f"{_case(r.cell_id)}/{ref}")
        if other is None:
            continue
        for m in getattr(scenarios.get(r.scenario), "KEY_METRICS", ()):
            a, b, way = r.metrics.get(m), other.metrics.get(m), direction(m)
            if way and isinstance(a, int | float) and isinstance(b, int | float) and b:
                checks.append(
                    {
                        "name": f"{r.scenario}: {r.engine}/{ref} {m}",
                        "scenario": r.scenario,
                        "engine": r.engine,
                        "reference": ref,
                        "where": r.params,
                        "metric": m,
                        "baseline": float(f"{a / b:.3g}"),
                        "tolerance": tolerance,
                        "better": way,
                    }
                )
    suites = sorted({r.suite for r in records})
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": suites[0] if len(suites) == 1 else "",
        "note": f"proposed from run {', '.join(sorted({r.run_id for r in records}))}; edit before committing",
        "fail_on_failed": True,
        "fail_on_skipped": False,
        "checks": checks,
    }


def main(
    run_dir: Path, baseline: Path, write: bool = False, reference: str | None = None, tolerance: float = 0.5
) -> int:
    """`bench gate`: 0 when every check passes, 1 when one fails, 2 when the run or the baseline is unusable.
    With write=True, writes a proposed baseline from the run to `baseline` instead (refuses to overwrite)."""
    if write:
        if Path(baseline).exists():
            print(f"gate: error: {baseline} exists; remove it first or write elsewhere")
            return 2
        try:
            base = propose(load_records(run_dir), reference, tolerance)
        except (OSError, ValueError) as exc:
            print(f"gate: error: {exc}")
            return 2
        Path(baseline).write_text(json.dumps(base, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {baseline} ({len(base['checks'])} checks)")
        return 0
    try:
        ok, verdicts = gate(run_dir, baseline)
    except (BaselineError, OSError, ValueError) as exc:
        print(f"gate: error: {exc}")
        return 2
    print(render(verdicts))
    return 0 if ok else 1
