"""benchmarks/core_bench.py on the CPU: the ttft part's JSON (options applied and recorded, a median per length from
real runs) and the refusal of bad --options (the GPU numbers: results/gpu/core-h200/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "core_bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_ttft_part_on_the_cpu_records_options_and_a_median_per_length(tmp_path):
    out = tmp_path / "ttft.json"
    r = _run("--out", str(out), "--device", "cpu", "--model", "tiny", "--parts", "ttft", "--ttft-lens", "16,33",
             "--options", '{"max_num_batched_tokens": 64, "prefill_chunk": 32}')  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["options"] == {"max_num_batched_tokens": 64, "prefill_chunk": 32}
    t = d["ttft"]["ttft_ms"]
    assert list(t) == ["16", "33"]
    for row in t.values():
        assert len(row["all"]) == 7 and all(x > 0 for x in row["all"])
        assert row["min"] == min(row["all"]) and sorted(row["all"])[3] == row["median"]
    assert "TTFT 33:" in r.stdout


@pytest.mark.parametrize("opts,msg", [('{"bogus": 1}', "bogus: unknown engine option"),
                                      ("[1]", "expected a JSON object"), ("{", "Expecting")])  # fmt: skip
def test_bad_options_are_refused_before_any_work(tmp_path, opts, msg):
    r = _run("--out", str(tmp_path / "x.json"), "--device", "cpu", "--model", "tiny", "--parts", "ttft", "--options", opts)
    assert r.returncode == 2 and msg in r.stderr and "--options" in r.stderr
    assert not (tmp_path / "x.json").exists()
