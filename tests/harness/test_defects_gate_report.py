"""Unusable inputs of bench gate / report / compare exit 2 naming the key or the line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness import compare, gate, html_report
from harness.cli import app
from harness.results import Record, RecordWriter, load_records

GOOD_CHECK = {"name": "c", "scenario": "latency", "engine": "anvil", "metric": "ttft_p50_ms", "max": 1e9}


def rec(suite="s", engine="anvil") -> Record:
    return Record(run_id="r", suite=suite, cell_id=f"c/{engine}", scenario="latency", engine=engine,
                  engine_version="t", model="tiny", dtype="float32", device="cpu", params={"batch": 1},
                  metrics={"ttft_p50_ms": 10.0})


def write_run(path: Path, records: list[Record], extra_lines: tuple[str, ...] = ()) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with RecordWriter(path / "records.jsonl") as w:
        for r in records:
            w.write(r)
    with open(path / "records.jsonl", "a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in extra_lines)
    return path


def baseline(tmp_path: Path, **edit) -> Path:
    base = {"schema_version": 1, "suite": "s", "checks": [dict(GOOD_CHECK)]}
    base.update(edit)
    p = tmp_path / "base.json"
    p.write_text(json.dumps(base))
    return p


@pytest.mark.parametrize("edit, key", [
    ({"checks": []}, "checks"),
    ({"checks": "all"}, "checks"),
    ({"checks": [5]}, "checks[0]"),
    ({"checks": [GOOD_CHECK | {"name": 3}]}, "checks[0].name"),
    ({"checks": [GOOD_CHECK | {"where": [1]}]}, "checks[0].where"),
    ({"checks": [GOOD_CHECK | {"max": "big"}]}, "checks[0].max"),
    ({"checks": [GOOD_CHECK | {"max": True}]}, "checks[0].max"),
    ({"checks": [GOOD_CHECK | {"baseline": 1.0, "tolerance": -0.1, "better": "higher"}]}, "checks[0].tolerance"),
    ({"checks": [GOOD_CHECK | {"required": "no"}]}, "checks[0].required"),
    ({"fail_on_failed": "yes"}, "fail_on_failed"),
    ({"suite": 7}, "suite"),
    ({"colour": "red"}, "colour"),
], ids=["empty-checks", "checks-not-list", "check-not-object", "name-not-str", "where-not-object",
        "bound-not-number", "bound-bool", "negative-tolerance", "required-not-bool", "flag-not-bool",
        "suite-not-str", "unknown-top-key"])
def test_structurally_bad_baseline_exits_2_naming_the_key(tmp_path, capsys, edit, key):
    run = write_run(tmp_path, [rec()])
    p = baseline(tmp_path, **edit)
    assert gate.main(run, p) == 2
    out = capsys.readouterr().out
    assert f"{p}: {key}" in out, out
    res = CliRunner().invoke(app, ["gate", str(run), "--baseline", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output and res.exception.__class__ is SystemExit


def test_baseline_not_an_object_and_for_another_suite_exit_2(tmp_path, capsys):
    run = write_run(tmp_path, [rec(suite="other")])
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    assert gate.main(run, p) == 2
    assert "expected a JSON object" in capsys.readouterr().out
    assert gate.main(run, baseline(tmp_path)) == 2
    assert "suite: the baseline is for suite 's'" in capsys.readouterr().out
    assert gate.main(write_run(tmp_path / "ok", [rec()]), baseline(tmp_path)) == 0


@pytest.mark.parametrize("line", ["[1, 2]", "3", '"text"', "null", '{"schema_version": 1}'])
def test_a_record_line_that_is_not_a_record_names_the_line(tmp_path, capsys, line):
    run = write_run(tmp_path, [rec()], (line, json.dumps(rec().to_dict())))
    with pytest.raises(ValueError, match=r"records.jsonl:2: "):
        load_records(run)
    assert gate.main(run, baseline(tmp_path)) == 2
    assert "records.jsonl:2:" in capsys.readouterr().out
    assert html_report.main(run) == 2
    assert "records.jsonl:2:" in capsys.readouterr().out
    good = write_run(tmp_path / "good", [rec()])
    assert compare.main(good, run) == 2
    assert "records.jsonl:2:" in capsys.readouterr().out
    for cmd in (["report", str(run)], ["compare", str(good), str(run)]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output


def test_report_on_an_empty_run_exits_2(tmp_path, capsys):
    (tmp_path / "records.jsonl").write_text("")
    assert html_report.main(tmp_path) == 2
    assert "no records" in capsys.readouterr().out
    assert not (tmp_path / "report.html").exists()
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 2


def test_compare_of_two_different_suites_warns(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", [rec(suite="smoke")]), write_run(tmp_path / "b", [rec(suite="latency")])
    assert compare.main(a, b) == 0
    out = capsys.readouterr().out
    assert "warning: the runs are of different suites: A is smoke, B is latency" in out
    assert compare.main(a, a) == 0
    assert "warning" not in capsys.readouterr().out
