"""A launched server's output goes to a log file in the run folder: a chatty server must not deadlock the cell."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("httpx")

from harness.scenarios import serving  # noqa: E402

HERE = Path(__file__).resolve().parent


def chatty_params() -> dict:
    return {
        "launch": shlex.join([sys.executable, str(HERE / "chatty_server.py")]) + " {port}",
        "launch_timeout_s": 20,
        "num_requests": 12,
        "warmup_requests": 0,
        "concurrency": 4,
        "output_len": 4,
        "prompt_len": 8,
        "request_timeout_s": 20,
        "max_duration_s": 30,
    }


def test_a_chatty_launched_server_serves_every_request_and_logs_to_the_run_folder(tmp_path):
    ctx = SimpleNamespace(engine="openai_http", case_id="s0.serving/m0/concurrency=4", vocab_size=512,
                          out_dir=tmp_path, model_name="tiny", model_path="")
    metrics, samples = serving.run(None, chatty_params(), ctx)
    assert metrics["completed"] == 12 and metrics["failed"] == 0, samples["info"]
    log = Path(samples["info"]["server_log"])
    assert log.parent == tmp_path / "artifacts" / "serving" and log.name.endswith(".server.log")
    assert log.stat().st_size > 4 * 2**20  # both streams, all of it: nothing was held in a pipe


def test_without_a_run_folder_the_log_is_temporary_and_a_failed_start_shows_its_tail(tmp_path):
    out = serving.run_serving(chatty_params())
    assert out["metrics"]["completed"] == 12
    script = "import sys; print('listening failed: port in use'); sys.stderr.write('x' * 300000); sys.exit(3)"
    with pytest.raises(RuntimeError, match="exited with code 3") as err:
        with serving.launched_server([sys.executable, "-c", script], {}, 10, tmp_path / "s.log"):
            pass
    assert "xxxx" in str(err.value) and (tmp_path / "s.log").stat().st_size > 300000
