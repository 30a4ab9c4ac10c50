"""bench profile: torch.profiler on the CPU with the tiny model; cell specs; missing and fake external tools."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from harness import profile

REPO = Path(__file__).resolve().parents[2]
CELL = ["engine=anvil", "model=tiny", "scenario=latency", "prompt_len=8", "gen_len=3", "warmup=0", "repeats=1"]


def test_torch_profile_on_cpu_writes_trace_and_top_table(tmp_path, capsys):
    pytest.importorskip("engine.generator")
    assert profile.main("torch", CELL, tmp_path, top=5) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    table = (tmp_path / "top_kernels.md").read_text()
    assert "self CPU time (no GPU)" in table
    rows = [line for line in table.splitlines() if line.startswith("| aten::")]
    assert 1 <= len(rows) <= 5
    assert json.loads((tmp_path / "metrics.json").read_text())["ttft_p50_ms"] > 0
    assert "top_kernels.md" in capsys.readouterr().out


def test_inline_and_suite_cell_specs():
    suite, cell = profile.resolve_cell(
        ["engine=anvil", "model=tiny", "scenario=throughput", "batch=4", "dtype=float32"]
    )
    assert (cell.engine, cell.scenario, cell.param_dict["batch"], cell.model.dtype) == (
        "anvil",
        "throughput",
        4,
        "float32",
    )
    smoke = str(REPO / "suites" / "smoke.toml")
    _, cell = profile.resolve_cell([smoke, "scenario=throughput", "engine=hf", "batch=4"])
    assert (cell.engine, cell.param_dict["batch"]) == ("hf", 4)
    _, cell = profile.resolve_cell([smoke, "cell=0"])
    assert cell.index == 0


@pytest.mark.parametrize(
    "tokens, msg",
    [
        ([], "no cell given"),
        (["engine=anvil", "scenario=latency"], "needs model"),
        (["engine=anvil", "model=tiny", "scenario=latency", "batch=[1, 2]"], "one cell only"),
        (["engine=anvil", "model=tiny", "scenario=latency", "bogus=1"], "bogus"),
        (["engine=anvil", "model=tiny", "scenario=latency", "oops"], "key=value"),
    ],
)
def test_bad_cell_specs_exit_2_with_the_reason(tokens, msg, capsys):
    assert profile.main("torch", tokens) == 2
    assert msg in capsys.readouterr().err


def test_missing_tool_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(profile.shutil, "which", lambda name: None)
    assert profile.main("nsys", CELL, tmp_path) == 3
    err = capsys.readouterr().err
    assert "nsys not found on PATH" in err and "--tool" in err
    assert profile.main("ncu", CELL, tmp_path) == 3
    assert profile.main("perf", CELL, tmp_path) == 2


FAKE_NCU = """#!{python}
import json, sys
args = sys.argv[1:]
if args[0] == "-i":
    print('==PROF== noise line')
    print('"ID","Kernel Name","gpu__time_duration.sum"')
    print('"","","usecond"')
    print('"0","decode_attention","1,500.0"')
    print('"1","gemv","500.0"')
    print('"2","decode_attention","1,000.0"')
    sys.exit(0)
out = args[args.index("-o") + 1]
open(out + ".ncu-rep", "w").write("fake")
json.dump(args, open(out + ".args.json", "w"))
"""


def test_external_tool_command_and_kernel_summary(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text(FAKE_NCU.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    out = tmp_path / "out"
    assert profile.main("ncu", CELL, out) == 0
    args = json.loads((out / "ncu.args.json").read_text())
    assert "--nvtx" in args and "--launch-count" in args
    i = args.index("harness.profile")
    assert args[i - 2 : i + 5] == [sys.executable, "-m", "harness.profile", "--tool", "none", "--out", str(out)]
    assert args[-len(CELL) :] == CELL
    table = (out / "top_kernels.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| decode") or line.startswith("| gemv")]
    assert lines[0].startswith("| decode_attention | 2 | 2.500 |") and "83.3%" in lines[0]
    assert lines[1].startswith("| gemv | 1 | 0.500 |")


def test_bench_profile_cli_passes_the_cell_after_the_double_dash(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    seen = {}

    def fake_main(tool, tokens, out, top, tool_args):
        seen.update(tool=tool, tokens=tokens, out=out, top=top, tool_args=tool_args)
        return 3

    monkeypatch.setattr(profile, "main", fake_main)
    res = CliRunner().invoke(
        app,
        [
            "profile",
            "--tool",
            "ncu",
            "--out",
            str(tmp_path),
            "--top",
            "7",
            "--tool-args",
            "--set full --launch-count 5",
            "--",
            *CELL,
        ],
    )
    assert res.exit_code == 3, res.output
    assert seen == {
        "tool": "ncu",
        "tokens": CELL,
        "out": tmp_path,
        "top": 7,
        "tool_args": ["--set", "full", "--launch-count", "5"],
    }
