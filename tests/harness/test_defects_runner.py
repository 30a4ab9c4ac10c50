"""Runner processes: timeouts and signals really stop the worker and what it started, a killed `bench run` keeps
every finished record, workers may start processes, and run folders are never shared or silently reused."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters import base
from harness import results, runner
from harness.cli import app
from harness.results import load_records
from harness.suite import parse

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINES = {"fake": "FakeAdapter", "mark": "MarkingAdapter", "spawner": "SpawningAdapter"}
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    for name, cls in ENGINES.items():
        monkeypatch.setitem(base.REGISTRY, name, f"fault_adapters:{cls}")


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 100}))
    return d


def suite_text(model_dir, engines, gen_lens=(4, 5, 13, 6), timeout=60, marker_dir=None, name="procs"):
    opts = f'\n[options.mark]\nmarker_dir = "{marker_dir}"\n' if marker_dir else ""
    return f"""
[suite]
name = "{name}"
engines = {json.dumps(list(engines))}
cell_timeout_s = {timeout}
engine_warmup_s = 0
{opts}
[[models]]
name = "{model_dir}"

[[scenarios]]
type = "throughput"
batch = 1
prompt_len = 8
gen_len = {json.dumps(list(gen_lens))}
warmup = 0
repeats = 1
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet is gone for our purposes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def wait_for(path: Path, seconds: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"bench run exited early with {proc.returncode}: {proc.stdout.read()}")
        assert time.monotonic() < end, f"{path} did not appear in {seconds} s"
        time.sleep(0.1)


def by_gen(records):
    return {(r.engine, r.params["gen_len"]): r for r in records}


def test_cell_timeout_kills_the_worker_and_its_children(tmp_path, model_dir, fakes):
    marks = tmp_path / "marks"
    marks.mkdir()
    suite = parse(suite_text(model_dir, ["mark"], gen_lens=(4, 13), timeout=3, marker_dir=marks), "t.toml")
    t0 = time.monotonic()
    out = runner.run_suite(suite, tmp_path / "run")
    elapsed = time.monotonic() - t0
    by = by_gen(out.records)
    assert by[("mark", 4)].status == "ok"
    assert by[("mark", 13)].status == "failed" and "timed out" in by[("mark", 13)].reason
    worker, child = int((marks / "pid").read_text()), int((marks / "child").read_text())
    assert not alive(worker), "the timed-out worker is still running"
    assert gone_within(child, 5), "the process the worker started outlived it"
    assert elapsed < 25, f"run took {elapsed:.0f} s: the kill did not stop the worker"


def test_worker_is_not_daemonic_so_an_engine_may_start_processes(tmp_path, model_dir, fakes):
    suite = parse(suite_text(model_dir, ["spawner"], gen_lens=(4,)), "t.toml")
    (rec,) = runner.run_suite(suite, tmp_path / "run").records
    assert rec.status == "ok", rec.reason


def bench(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "fake_bench.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="200"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_worker_records_the_rest_and_writes_tables(tmp_path, model_dir, sig, code):
    marks, out = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    path = tmp_path / "s.toml"
    path.write_text(suite_text(model_dir, ["mark", "fake"], marker_dir=marks))
    proc = bench(["run", str(path), "--out", str(out)], tmp_path)
    try:
        wait_for(marks / "hang", 120, proc)  # cells 4 and 5 done, the worker hangs in cell 13
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert rc == code, output
    assert took < 10, f"took {took:.1f} s to stop"
    worker, child = int((marks / "pid").read_text()), int((marks / "child").read_text())
    assert gone_within(worker, 5) and gone_within(child, 5), "an orphaned worker (or its child) is still running"
    by = by_gen(load_records(out))
    assert len(by) == 8
    assert by[("mark", 4)].status == by[("mark", 5)].status == "ok"
    for key in [("mark", 13), ("mark", 6)] + [("fake", g) for g in (4, 5, 13, 6)]:
        assert by[key].status == "failed" and "interrupted" in by[key].reason and sig.name in by[key].reason
    assert (out / "table.md").read_text().count("| throughput |") == 8 and (out / "table.csv").is_file()
    assert f"interrupted by {sig.name}" in output and "Traceback" not in output


def test_sigkill_of_bench_run_keeps_every_finished_record_and_the_worker_dies(tmp_path, model_dir):
    marks, out = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    path = tmp_path / "s.toml"
    path.write_text(suite_text(model_dir, ["mark"], marker_dir=marks))
    proc = bench(["run", str(path), "--out", str(out)], tmp_path)
    try:
        wait_for(marks / "hang", 120, proc)
        time.sleep(1.0)  # the parent has received records 4 and 5 (sent before cell 13 started)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2, "a finished record was not flushed to records.jsonl before the kill"
    assert {(r.params["gen_len"], r.status) for r in load_records(out)} == {(4, "ok"), (5, "ok")}
    worker, child = int((marks / "pid").read_text()), int((marks / "child").read_text())
    assert gone_within(worker, 10), "the worker outlived its killed parent"
    assert gone_within(child, 10)


def test_out_folder_in_use_is_refused_unless_overwrite(tmp_path, model_dir, fakes):
    path = tmp_path / "s.toml"
    path.write_text(suite_text(model_dir, ["fake"], gen_lens=(4,)))
    out = tmp_path / "run"
    out.mkdir()
    (out / "records.jsonl").write_text("precious\n")
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    assert (out / "records.jsonl").read_text() == "precious\n"
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [r.status for r in load_records(out)] == ["ok"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(empty)]).exit_code == 0


def test_default_run_folders_never_collide(tmp_path, model_dir, fakes, monkeypatch):
    suite = parse(suite_text(model_dir, ["fake"], gen_lens=(4,)), "t.toml")
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261201-120000")  # both in the same second
    a, b = runner.default_out_dir(suite, tmp_path), runner.default_out_dir(suite, tmp_path)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.parent == b.parent == tmp_path and a.name.startswith("procs-20261201-120000-")


def test_unwritable_out_exits_2_with_one_line(tmp_path, model_dir, fakes):
    path = tmp_path / "s.toml"
    path.write_text(suite_text(model_dir, ["fake"], gen_lens=(4,)))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(blocker / "run")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot write the run folder" in errors[0], res.output
    assert "Traceback" not in res.output and res.exception.__class__ is SystemExit


def test_disk_full_mid_run_exits_1_with_one_line_and_stops_the_worker(tmp_path, model_dir, fakes, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = tmp_path / "s.toml"
    path.write_text(suite_text(model_dir, ["mark"], gen_lens=(4, 5, 6, 7), marker_dir=marks))
    real_write, calls = results.RecordWriter.write, []

    def write(self, record):
        calls.append(record.cell_id)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, record)

    monkeypatch.setattr(results.RecordWriter, "write", write)
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], res.output
    assert "Traceback" not in res.output and res.exception.__class__ is SystemExit
    assert not alive(int((marks / "pid").read_text())) and time.monotonic() - t0 < 25
    assert len(load_records(tmp_path / "run")) == 1
