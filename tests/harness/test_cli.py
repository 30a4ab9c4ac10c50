"""The bench CLI: list, env, and `bench run suites/smoke.toml` end to end (anvil vs hf on the tiny model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.base import adapter_class
from harness.cli import app
from harness.results import load_records
from harness.suite import load

REPO = Path(__file__).resolve().parents[2]


def test_list_shows_every_registered_engine():
    from adapters.base import REGISTRY

    res = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    for name in REGISTRY:
        assert name in res.output
    assert "available" in res.output


def test_env_json():
    res = CliRunner().invoke(app, ["env", "--json"])
    assert res.exit_code == 0, res.output
    snap = json.loads(res.output[res.output.index("{"):])
    for key in ("python", "cpu", "cpu_count", "torch", "cuda", "gpus", "commit"):
        assert key in snap


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    res = CliRunner().invoke(app, ["run", str(REPO / "suites" / "smoke.toml"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    suite = load(REPO / "suites" / "smoke.toml")
    records = load_records(out / "records.jsonl")
    assert sorted(r.cell_id for r in records) == sorted(c.cell_id for c in suite.cells)
    llamacpp_ok, why = adapter_class("llamacpp").available()
    for r in records:  # llama.cpp is optional: skipped with the install hint where it is not installed
        want = "ok" if r.engine != "llamacpp" or llamacpp_ok else "skipped"
        assert r.status == want, (r.cell_id, r.reason)
        if want == "skipped":
            assert "not installed" in r.reason
    parity = [r for r in records if r.scenario == "parity" and r.engine != "hf" and r.status == "ok"]
    assert parity and all(r.metrics["first_mismatch"] is None for r in parity)
    assert all(r.metrics["max_logit_diff"] < 1e-3 for r in parity)
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(suite.cells)
    assert {(r["engine"]) for r in rows} == {"anvil", "hf", "llamacpp"}
    md = (out / "table.md").read_text()
    assert md.count("| anvil |") == md.count("| hf |") == md.count("| llamacpp |") == len(suite.cells) // 3
    assert (out / "suite.toml").read_text() == (REPO / "suites" / "smoke.toml").read_text()


def test_run_only_runs_the_matching_cells(tmp_path):
    smoke = str(REPO / "suites" / "smoke.toml")
    out = tmp_path / "only"
    res = CliRunner().invoke(app, ["run", smoke, "--out", str(out), "--only", "engine=anvil",
                                   "--only", "scenario=throughput", "--only", "batch=4"])
    assert res.exit_code == 0, res.output
    want = [c for c in load(smoke).cells if c.engine == "anvil" and c.scenario == "throughput"
            and c.param_dict["batch"] == 4]
    records = load_records(out / "records.jsonl")
    assert want and sorted(r.cell_id for r in records) == sorted(c.cell_id for c in want)
    assert all(r.status == "ok" and r.metrics["decode_tok_s"] > 0 and r.metrics["weight_gb_s"] > 0 for r in records)
    res = CliRunner().invoke(app, ["run", smoke, "--out", str(tmp_path / "none"), "--only", "engine=nope"])
    assert res.exit_code == 2 and "no cell matches engine=nope" in res.output
    res = CliRunner().invoke(app, ["run", smoke, "--out", str(tmp_path / "bad"), "--only", "batch"])
    assert res.exit_code == 2 and "expected key=value, got 'batch'" in res.output
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()
