"""benchmarks/serve_host_cost.py end to end on the CPU: it starts `bench serve` on loopback with the tiny model,
streams from concurrent clients, and writes per-thread CPU time (the engine thread found by its OS name) and the
server's engine timing from /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU times come from /proc (Linux)")
def test_serve_host_cost_reports_threads_and_engine_timing(tmp_path):
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, "benchmarks/serve_host_cost.py", "--out", str(out), "--concurrency", "1,3",
                        "--max-tokens", "5", "--prompt", "7"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["model"] == "tiny" and d["device"] == "cpu" and d["prompt"] == 7 and d["max_tokens"] == 5
    rows = {row["concurrency"]: row for row in d["rows"]}
    assert sorted(rows) == [1, 3]
    for c, row in rows.items():
        assert row["tokens"] == 5 * c  # every token generated (the server may put several in one SSE chunk)
        assert c <= row["sse_chunks"] <= 5 * c + c
        assert row["engine_steps"] >= 5 and row["step_ms"] > 0 and row["wall_s"] > 0
        # the engine thread found by its name (threads it starts inherit the name: torch's CPU pool on a CPU run)
        assert row["threads"]["engine"] >= 1 and row["threads"]["loop"] == 1
        assert min(row["cpu_s"].values()) >= 0  # clock ticks: a short run may spend less than one
        assert row["device_wait_ms_per_step"] >= 0 and row["between_steps_ms"] >= 0
    assert "c=3: 15 tokens" in r.stdout
