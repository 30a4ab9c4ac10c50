"""Gates: the committed smoke baseline passes a healthy run of suites/smoke.toml; planted regressions fail it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import gate
from harness.results import Record, RecordWriter
from harness.suite import load as load_suite

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "suites" / "smoke.toml"
BASELINE = REPO / "results" / "baselines" / "smoke.json"

ANVIL_PARITY = {
    "is_reference": False,
    "max_logit_diff": 1.5e-7,
    "mean_logit_diff": 5e-8,
    "argmax_match_frac": 1.0,
    "greedy_match_tokens": 12,
    "first_mismatch": None,
    "n_tokens": 12,
}
HEALTHY = {  # per scenario, per engine: numbers of the shape a CPU smoke run gives
    "parity": {
        "anvil": ANVIL_PARITY,
        "llamacpp": dict(ANVIL_PARITY),
        "hf": {
            "is_reference": True,
            "max_logit_diff": 0.0,
            "argmax_match_frac": 1.0,
            "greedy_match_tokens": 12,
            "first_mismatch": None,
            "n_tokens": 12,
        },
    },
    "throughput": {
        "anvil": {"prefill_tok_s": 900.0, "decode_tok_s": 60.0, "gen_tok_s": 55.0},
        "hf": {"prefill_tok_s": 1000.0, "decode_tok_s": 90.0, "gen_tok_s": 80.0},
        "llamacpp": {"prefill_tok_s": 3000.0, "decode_tok_s": 300.0, "gen_tok_s": 250.0},
    },
    "latency": {
        "anvil": {"ttft_p50_ms": 20.0, "itl_p50_ms": 15.0},
        "hf": {"ttft_p50_ms": 30.0, "itl_p50_ms": 12.0},
        "llamacpp": {"ttft_p50_ms": 5.0, "itl_p50_ms": 3.0},
    },
}


def smoke_records(edit=None) -> list[Record]:
    """One ok record per cell of the real smoke suite; `edit(record)` plants a change."""
    suite = load_suite(SMOKE, resolve=False)
    out = []
    for c in suite.cells:
        r = Record(
            run_id="r1",
            suite=suite.name,
            cell_id=c.cell_id,
            scenario=c.scenario,
            engine=c.engine,
            engine_version="t",
            model=c.model.name,
            dtype=c.model.dtype,
            device=c.model.device,
            params=c.param_dict,
            metrics=dict(HEALTHY[c.scenario][c.engine]),
        )
        if edit:
            edit(r)
        out.append(r)
    return out


def write_run(tmp_path: Path, records: list[Record]) -> Path:
    run = tmp_path / "run"
    with RecordWriter(run / "records.jsonl") as w:
        for r in records:
            w.write(r)
    return run


def test_committed_baseline_is_valid_and_covers_smoke_cells():
    base = gate.load_baseline(BASELINE)
    assert base["suite"] == "smoke"
    cells = load_suite(SMOKE, resolve=False).cells
    for c in base["checks"]:
        hits = [
            x
            for x in cells
            if x.scenario == c["scenario"]
            and x.engine == c["engine"]
            and all(x.param_dict.get(k) == v for k, v in (c.get("where") or {}).items())
        ]
        assert hits, f"check {c['name']!r} matches no cell of suites/smoke.toml"
        if c.get("reference"):
            assert any(x.engine == c["reference"] for x in cells)
        assert c["metric"] in HEALTHY[c["scenario"]][c["engine"]]


def test_healthy_run_passes(tmp_path, capsys):
    assert gate.main(write_run(tmp_path, smoke_records()), BASELINE) == 0
    assert "0 failed" in capsys.readouterr().out


def test_cpu_noise_does_not_flake_it(tmp_path):
    def noisy(r: Record) -> None:  # anvil 3x slower than hf this time, a bad day on a shared box
        if r.engine == "anvil" and r.scenario == "throughput":
            r.metrics = {k: v / 4 for k, v in r.metrics.items()}
        if r.engine == "anvil" and r.scenario == "latency":
            r.metrics = {k: v * 4 for k, v in r.metrics.items()}

    assert gate.main(write_run(tmp_path, smoke_records(noisy)), BASELINE) == 0


@pytest.mark.parametrize(
    "plant, expect",
    [
        (
            lambda r: (
                r.metrics.update(first_mismatch=3, greedy_match_tokens=3)
                if r.scenario == "parity" and r.engine == "anvil" and r.params["prompt_len"] == 40
                else None
            ),
            "greedy tokens",
        ),
        (
            lambda r: r.metrics.update(max_logit_diff=0.5) if r.scenario == "parity" and r.engine == "anvil" else None,
            "logits within",
        ),
        (
            lambda r: (
                r.metrics.update(decode_tok_s=2.0)
                if r.scenario == "throughput" and r.engine == "anvil" and r.params["batch"] == 4
                else None
            ),
            "decode tok/s",
        ),
        (
            lambda r: r.metrics.update(itl_p50_ms=1500.0) if r.scenario == "latency" and r.engine == "anvil" else None,
            "ITL p50",
        ),
    ],
)
def test_planted_regressions_fail(tmp_path, capsys, plant, expect):
    assert gate.main(write_run(tmp_path, smoke_records(plant)), BASELINE) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("FAIL") and expect in line for line in out.splitlines()), out


def test_failed_cell_and_missing_reference_fail(tmp_path):
    def crash(r: Record) -> None:
        if r.scenario == "throughput" and r.engine == "hf":
            r.status, r.reason, r.metrics = "failed", "worker killed by signal SIGKILL", {}

    ok, verdicts = gate.gate(write_run(tmp_path, smoke_records(crash)), BASELINE)
    assert not ok
    bad = [v for v in verdicts if not v.ok]
    assert any(v.check == "no failed cells" and "SIGKILL" in v.note for v in bad)
    assert any("no usable hf decode_tok_s" in v.note for v in bad)


def test_missing_cells_and_wrong_suite_fail(tmp_path):
    recs = [r for r in smoke_records() if r.scenario != "latency"]
    ok, verdicts = gate.gate(write_run(tmp_path, recs), BASELINE)
    assert not ok and any(v.note == "no matching cell in the run" for v in verdicts)
    for r in recs:
        r.suite = "other"
    with pytest.raises(gate.BaselineError, match="suite: the baseline is for suite 'smoke'"):
        gate.gate(write_run(tmp_path / "b", recs), BASELINE)  # unusable (exit 2), not a regression


def test_skipped_cells_pass_unless_the_baseline_says_otherwise(tmp_path):
    def skip_hf_latency(r):
        if r.scenario == "latency" and r.engine == "hf":
            r.status, r.reason, r.metrics = "skipped", "not installed", {}

    run = write_run(tmp_path, smoke_records(skip_hf_latency))
    base = json.loads(BASELINE.read_text())
    base["checks"] = [c for c in base["checks"] if c["scenario"] != "latency"]
    p = tmp_path / "b.json"
    p.write_text(json.dumps(base))
    assert gate.main(run, p) == 0
    base["fail_on_skipped"] = True
    p.write_text(json.dumps(base))
    assert gate.main(run, p) == 1


def test_unusable_baseline_or_run_exits_2(tmp_path):
    run = write_run(tmp_path, smoke_records())
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"schema_version": 1, "checks": [{"name": "x", "scenario": "parity", "engine": "anvil", '
        '"metric": "m", "baseline": 1.0}]}'
    )
    assert gate.main(run, bad) == 2  # baseline without tolerance / better
    bad.write_text("{nope")
    assert gate.main(run, bad) == 2
    assert gate.main(tmp_path / "no-such-run", BASELINE) == 2


def test_proposed_baseline_passes_its_own_run_and_catches_a_regression(tmp_path):
    run = write_run(tmp_path, smoke_records())
    proposed = tmp_path / "proposed.json"
    assert gate.main(run, proposed, write=True, tolerance=0.3) == 0
    assert gate.main(run, proposed, write=True) == 2  # never overwrites
    base = gate.load_baseline(proposed)
    assert base["suite"] == "smoke"
    ratio = [
        c
        for c in base["checks"]
        if c["engine"] == "anvil" and c.get("reference") == "hf" and c["metric"] == "decode_tok_s"
    ]
    assert len(ratio) == 2 and ratio[0]["baseline"] == pytest.approx(60 / 90, rel=1e-2)
    assert gate.main(run, proposed) == 0

    def slower(r):
        if r.engine == "anvil" and r.scenario == "throughput" and r.params["batch"] == 1:
            r.metrics["decode_tok_s"] /= 2

    assert gate.main(write_run(tmp_path / "b", smoke_records(slower)), proposed) == 1


def test_bench_gate_cli_exit_codes(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    good = write_run(tmp_path / "good", smoke_records())
    res = CliRunner().invoke(app, ["gate", str(good), "--baseline", str(BASELINE)])
    assert res.exit_code == 0, res.output
    assert "0 failed" in res.output

    def broken(r):
        if r.scenario == "parity" and r.engine == "anvil":
            r.metrics["first_mismatch"] = 0

    bad = write_run(tmp_path / "bad", smoke_records(broken))
    res = CliRunner().invoke(app, ["gate", str(bad), "--baseline", str(BASELINE)])
    assert res.exit_code == 1 and "FAIL" in res.output
    res = CliRunner().invoke(app, ["gate", str(good), "--baseline", str(tmp_path / "new.json"), "--write"])
    assert res.exit_code == 0 and (tmp_path / "new.json").is_file()
