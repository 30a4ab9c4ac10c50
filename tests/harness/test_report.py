"""bench report: markdown + standalone HTML with plots, telemetry and environment from a run folder."""

from __future__ import annotations

import pytest

from harness import html_report, plots
from harness.results import Record, RecordWriter

ENV = {"hostname": "box", "cpu": "Test CPU", "cpu_count": 2, "python": "3.11", "torch": "2.x", "gpus": []}


def rec(engine, scenario, params, metrics=None, samples=None, status="ok", reason="") -> Record:
    case = f"{scenario}/" + ",".join(f"{k}={v}" for k, v in params.items())
    return Record(
        run_id="run1",
        suite="demo",
        cell_id=f"{case}/{engine}",
        scenario=scenario,
        engine=engine,
        engine_version=f"{engine} 1.0",
        model="tiny",
        dtype="float32",
        device="cpu",
        params=params,
        metrics=metrics or {},
        samples=samples or {},
        status=status,
        reason=reason,
        env=ENV,
        engine_info={"ops_backend": "reference"} if engine == "anvil" else {},
    )


def demo_records() -> list[Record]:
    out = []
    for engine, speed in (("anvil", 1.0), ("hf", 1.5)):
        for b in (1, 4, 16):
            out.append(
                rec(
                    engine,
                    "throughput",
                    {"batch": b, "prompt_len": 32, "gen_len": 16},
                    {"decode_tok_s": 10 * b * speed, "gen_tok_s": 9 * b * speed, "prefill_tok_s": 500.0},
                )
            )
        out.append(
            rec(
                engine,
                "latency",
                {"batch": 1, "prompt_len": 16, "gen_len": 8},
                {"ttft_p50_ms": 20.0, "itl_p50_ms": 5.0},
                {"ttft_s": [0.02, 0.021], "itl_s": [0.005, 0.006, 0.004]},
            )
        )
        for n in (1024, 4096):
            out.append(
                rec(
                    engine,
                    "long_context",
                    {"prompt_len": n, "decode_tokens": 8},
                    {"ttft_ms": n / 10 * speed, "prefill_tok_s": 10000 / speed, "decode_tok_s": 50.0},
                )
            )
    tel = {
        "gpu_present": False,
        "gpu_note": "no GPU telemetry (CPU only)",
        "cpu_util_mean": 87.5,
        "rss_peak_mb": 321.0,
        "series": {},
    }
    for c in (1, 4):
        reqs = [{"ok": True, "ttft": 0.05 + i * 0.01, "itl": [0.01, 0.012]} for i in range(5)]
        out.append(
            rec(
                "openai_http",
                "serving",
                {"concurrency": c, "request_rate": float("inf")},
                {"output_tok_s": 100.0 * c, "ttft_p99_ms": 90.0, "tpot_p99_ms": 12.0},
                {"requests": reqs, "telemetry": tel},
            )
        )
    out.append(
        rec(
            "llamacpp",
            "throughput",
            {"batch": 1, "prompt_len": 32, "gen_len": 16},
            status="skipped",
            reason="not installed: pip install llama-cpp-python",
        )
    )
    out.append(
        rec(
            "anvil",
            "long_context",
            {"prompt_len": 65536, "decode_tokens": 8},
            status="failed",
            reason="ContextTooLong: prompt of 65536 tokens + 8 new tokens exceeds the model's context",
        )
    )
    return out


def write_run(path, records):
    with RecordWriter(path / "records.jsonl") as w:
        for r in records:
            w.write(r)
    (path / "suite.toml").write_text('[suite]\nname = "demo"\n')
    return path


def test_report_renders_markdown_html_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path, demo_records())
    assert html_report.main(run) == 0
    md = (run / "report.md").read_text()
    for section in (
        "# Anvil bench report: demo",
        "## Engines",
        "## Results",
        "## Plots",
        "## Telemetry",
        "## Environment",
        "## Suite",
        "## long_context",
        "## serving",
    ):
        assert section in md, section
    assert "16 records" in md and "1 failed" in md and "1 skipped" in md
    assert "ContextTooLong" in md and "not installed" in md
    assert "ops_backend=reference" in md and "Test CPU" in md
    assert "none (CPU only)" in md and "87.5" in md
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == ["latency_cdf.png", "serving_sweep.png", "throughput_vs_batch.png", "ttft_vs_prompt_len.png"]
    assert all((run / "plots" / p).stat().st_size > 5000 for p in pngs)
    for p in pngs:
        assert f"(plots/{p})" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # standalone: every figure embedded
    assert '<tr class="failed">' in page and '<tr class="skipped">' in page
    assert "&lt;" not in md and "<script" not in page


def test_without_matplotlib_the_report_still_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: (False, "matplotlib is not installed: pip install -e '.[plots]'"))
    run = write_run(tmp_path, demo_records())
    md_path, html_path, notes = html_report.render(run, tmp_path / "out")
    assert notes == ["plots: matplotlib is not installed: pip install -e '.[plots]'"]
    assert "## Plots" not in md_path.read_text() and "pip install" in html_path.read_text()


def test_plots_skip_what_the_run_does_not_have(tmp_path):
    pytest.importorskip("matplotlib")
    only_parity = [rec("anvil", "parity", {"prompt_len": 8}, {"max_logit_diff": 0.0})]
    figs, note = plots.make_plots(only_parity, tmp_path)
    assert figs == [] and note == "no plottable cells in this run"


def test_missing_run_folder_exits_2(tmp_path, capsys):
    assert html_report.main(tmp_path / "nope") == 2
    assert "report: error" in capsys.readouterr().out


def test_bench_report_cli(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    run = write_run(tmp_path, demo_records())
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "report.html").is_file()
    assert CliRunner().invoke(app, ["report", str(tmp_path / "missing")]).exit_code == 2
