"""Runner: worker isolation (raise, crash, hang, load failure), skipped engines, streaming records, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters import base
from harness import report
from harness.results import load_records
from harness.runner import run_suite
from harness.suite import parse

HERE = Path(__file__).resolve().parent
ENGINES = {"fake": "FakeAdapter", "boom": "RaisingAdapter", "killer": "KillingAdapter", "hang": "HangingAdapter",
           "badload": "LoadFailingAdapter", "missing": "MissingAdapter"}


@pytest.fixture
def fault_engines(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # spawned workers inherit sys.path, so they can import fault_adapters
    for name, cls in ENGINES.items():
        monkeypatch.setitem(base.REGISTRY, name, f"fault_adapters:{cls}")


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 100}))
    return d


def suite_text(model_dir, engines, gen_lens=(4, 5, 13, 6), timeout=60):
    return f"""
[suite]
name = "faults"
engines = {json.dumps(list(engines))}
cell_timeout_s = {timeout}
engine_warmup_s = 0.1

[[models]]
name = "{model_dir}"

[[scenarios]]
type = "throughput"
batch = 2
prompt_len = 8
gen_len = {json.dumps(list(gen_lens))}
warmup = 0
repeats = 1
"""


def run(tmp_path, model_dir, engines, **kw):
    suite = parse(suite_text(model_dir, engines, **kw), "faults.toml")
    out = run_suite(suite, tmp_path / "run")
    by = {(r.engine, r.params["gen_len"]): r for r in out.records}
    return suite, out, by


def test_raising_engine_fails_only_that_cell(tmp_path, model_dir, fault_engines):
    _, out, by = run(tmp_path, model_dir, ["boom", "fake"])
    assert by[("boom", 13)].status == "failed"
    assert "ValueError: planted failure" in by[("boom", 13)].reason
    for g in (4, 5, 6):
        assert by[("boom", g)].status == "ok" and by[("boom", g)].metrics["decode_tok_s"] > 0
        assert by[("fake", g)].status == "ok"
    assert by[("fake", 13)].status == "ok"
    assert len(load_records(out.out_dir)) == 8


def test_not_installed_engine_is_skipped(tmp_path, model_dir, fault_engines):
    _, out, by = run(tmp_path, model_dir, ["missing", "fake"], gen_lens=(4,))
    assert by[("missing", 4)].status == "skipped"
    assert "not installed: pip install missing-engine" in by[("missing", 4)].reason
    assert by[("fake", 4)].status == "ok"


def test_killed_worker_keeps_earlier_records_and_fails_the_rest(tmp_path, model_dir, fault_engines):
    _, out, by = run(tmp_path, model_dir, ["killer", "fake"])
    assert by[("killer", 4)].status == "ok" and by[("killer", 5)].status == "ok"
    for g in (13, 6):
        assert by[("killer", g)].status == "failed"
        assert "SIGKILL" in by[("killer", g)].reason
    assert all(by[("fake", g)].status == "ok" for g in (4, 5, 13, 6))
    on_disk = {(r.engine, r.params["gen_len"]): r.status for r in load_records(out.out_dir / "records.jsonl")}
    assert on_disk[("killer", 4)] == "ok" and on_disk[("killer", 6)] == "failed"


def test_hanging_worker_times_out(tmp_path, model_dir, fault_engines):
    _, out, by = run(tmp_path, model_dir, ["hang"], gen_lens=(4, 13), timeout=8)  # room for a busy CI box
    assert by[("hang", 4)].status == "ok"
    assert by[("hang", 13)].status == "failed" and "timed out" in by[("hang", 13)].reason


def test_load_failure_fails_every_cell_of_that_engine(tmp_path, model_dir, fault_engines):
    _, out, by = run(tmp_path, model_dir, ["badload", "fake"], gen_lens=(4, 5))
    for g in (4, 5):
        assert by[("badload", g)].status == "failed"
        assert "load failed: RuntimeError: weights are corrupt" in by[("badload", g)].reason
        assert by[("fake", g)].status == "ok"


def test_records_carry_contract_fields_and_tables_have_a_row_per_engine_per_cell(tmp_path, model_dir, fault_engines):
    suite, out, _ = run(tmp_path, model_dir, ["fake", "missing"], gen_lens=(4, 5))
    r = next(x for x in out.records if x.engine == "fake")
    assert r.schema_version == 1 and r.run_id and r.suite == "faults" and r.engine_version == "fake 1.0"
    assert r.dtype == "float32" and r.device == "cpu" and r.params["batch"] == 2
    assert r.env["python"] and "cpu_count" in r.env
    assert len(r.samples["ttft_s"]) == 1 and r.metrics["ttft_p50_ms"] > 0
    assert (out.out_dir / "suite.toml").read_text() == suite.text
    records = report.ordered(out.records, [c.cell_id for c in suite.cells])
    md, cs = report.write_tables(records, out.out_dir)
    lines = cs.read_text().splitlines()
    assert len(lines) == 1 + len(suite.cells)
    header = lines[0].split(",")
    assert header[:5] == ["scenario", "model", "params", "engine", "status"] and "decode_tok_s" in header
    assert md.read_text().count("| throughput |") == len(suite.cells)


def test_cuda_cells_are_skipped_without_a_gpu(tmp_path, model_dir, fault_engines, monkeypatch):
    from harness import envinfo

    monkeypatch.setattr(envinfo, "snapshot", lambda: {"cuda_available": False})
    text = suite_text(model_dir, ["fake"], gen_lens=(4,)).replace(f'name = "{model_dir}"',
                                                                   f'name = "{model_dir}"\ndevice = "cuda"')
    out = run_suite(parse(text, "faults.toml"), tmp_path / "run")
    (r,) = out.records
    assert r.status == "skipped" and "CUDA" in r.reason
