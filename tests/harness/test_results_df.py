"""Results people can read: harness.results.load -> DataFrame, serving cells with failed requests are partial or
failed, terminal tables within 120 columns with each reason once as a footnote, table.md / table.csv on the frame."""

from __future__ import annotations

import csv
import io
import math

import pytest

pytest.importorskip("pandas")
from rich.console import Console  # noqa: E402

from harness import report  # noqa: E402
from harness.results import Record, RecordWriter, load, request_status  # noqa: E402

NOT_INSTALLED = "not installed: pip install llama-cpp-python (builds from source: ~10-20 min on 2 cores) [No module]"
ENV = {"python": "3.11.7", "cpu": "Test CPU", "gpus": [], "commit": "abc123"}


def rec(engine, scenario, params, metrics=None, status="ok", reason="", model="tiny", samples=None) -> Record:
    return Record(run_id="r1", suite="demo", cell_id=f"{scenario}-{engine}-{sorted(params.items())}",
                  scenario=scenario, engine=engine, engine_version=f"{engine} 1.0", model=model, dtype="float32",
                  device="cpu", params=params, status=status, reason=reason, metrics=metrics or {},
                  samples=samples or {}, env=ENV)


def tput(b):
    return {"batch": b, "prompt_len": 32, "gen_len": 12, "warmup": 1, "repeats": 3, "seed": 0}


def serving_metrics(failed, completed=32 - 3):
    return {"request_throughput_req_s": 19.46, "output_tok_s": 4982.3, "ttft_p50_ms": 86.1, "tpot_p50_ms": 5.95,
            "itl_p50_ms": 5.9, "e2e_p99_ms": 1650.2, "goodput_req_s": 18.0, "failed": float(failed),
            "completed": float(completed)}


def demo() -> list[Record]:
    out = []
    for b in (1, 4, 32):
        out.append(rec("anvil", "throughput", tput(b), {
            "output_tok_s": 6250.4 * b, "decode_tok_s": 6300.1 * b, "prefill_tok_s": 167000.0 * b,
            "ttft_p50_ms": 46.4, "tpot_p50_ms": 5.12, "step_ms": 5.12, "weight_gb_s": 2929.7, "gen_tok_s": 1.0}))
        out.append(rec("vllm", "throughput", tput(b), {
            "output_tok_s": 5921.0 * b, "decode_tok_s": 6001.0 * b, "ttft_p50_ms": 49.6, "tpot_p50_ms": 5.4,
            "step_ms": 5.4, "weight_gb_s": 2777.7,
            "prefill_tok_s_note": "not measurable: prefill and decode interleaved: request 2's first token came at "
                                  "60 ms, after request 0's second token at 40 ms (repeat 0; 3 of 3 repeats interleaved)"}))
        out.append(rec("llamacpp", "throughput", tput(b), status="skipped", reason=NOT_INSTALLED))
    out.append(rec("llamacpp", "latency", {"batch": 1, "prompt_len": 32, "gen_len": 16}, status="skipped",
                   reason=NOT_INSTALLED))
    out.append(rec("anvil", "latency", {"batch": 1, "prompt_len": 32, "gen_len": 16},
                   {"ttft_p50_ms": 12.3, "tpot_mean_ms": 4.56, "itl_p50_ms": 4.5, "itl_p90_ms": 4.9, "itl_p99_ms": 7.7,
                    "output_tok_s": 210.0}))
    out.append(rec("anvil", "parity", {"reference": "hf", "prompt_len": 32, "n_tokens": 16, "seed": 2, "layers": True},
                   {"max_logit_diff": 1.34e-05, "argmax_match_frac": 1.0, "greedy_match_tokens": 16,
                    "first_mismatch": None, "first_bad_layer": 3, "layer_max_diff": 0.01, "layer_tol": 0.001}))
    out.append(rec("hf", "parity", {"reference": "hf", "prompt_len": 32, "n_tokens": 16, "seed": 2, "layers": True},
                   {"max_logit_diff": 0.0, "argmax_match_frac": 1.0, "greedy_match_tokens": 16, "first_mismatch": None,
                    "first_bad_layer": None}))
    for c, failed in ((8, 0), (32, 3), (64, 3)):
        p = {"concurrency": c, "prompt_len": 512, "output_len": 256, "num_requests": 32}
        if c == 64:
            p["max_failed_frac"] = 0.1
        out.append(rec("openai_http", "serving", p, serving_metrics(failed, 32 - failed),
                       samples={"info": {"errors": ["HTTP 500: engine overloaded"]}}))
    return out


def test_failed_requests_make_a_serving_cell_partial_or_failed():
    r = rec("x", "serving", {"concurrency": 1}, {"failed": 0.0, "completed": 32.0})
    assert request_status(r) == ("ok", "") and r.status == "ok"
    r = rec("x", "serving", {"concurrency": 1}, {"failed": 3.0, "completed": 29.0},
            samples={"info": {"errors": ["HTTP 500"]}})
    assert (r.status, r.reason) == ("failed", "3 of 32 requests failed (9.4%, max_failed_frac 0): HTTP 500")
    r = rec("x", "serving", {"concurrency": 1, "max_failed_frac": 0.1}, {"failed": 3.0, "completed": 29.0})
    assert (r.status, r.reason) == ("partial", "3 of 32 requests failed (9.4%, max_failed_frac 0.1)")
    r = rec("x", "serving", {"max_failed_frac": 0.05}, {"failed": 3.0, "completed": 29.0})
    assert r.status == "failed"
    assert rec("x", "throughput", {}, {"failed": 3.0}).status == "ok"  # only serving counts requests
    r = Record.from_dict(rec("x", "serving", {}, {"failed": 1.0, "completed": 0.0}).to_dict() | {"status": "ok"})
    assert r.status == "failed"  # records written before this rule read the same way


def test_load_gives_one_row_per_record_with_flattened_columns(tmp_path):
    with RecordWriter(tmp_path / "records.jsonl") as w:
        for r in demo():
            w.write(r)
    df = load(tmp_path)
    assert len(df) == len(demo())
    assert list(df.columns[:10]) == ["run", "cell", "engine", "engine_version", "model", "dtype", "device",
                                     "scenario", "status", "reason"]
    assert {"param.batch", "param.concurrency", "param.max_failed_frac", "output_tok_s", "first_bad_layer",
            "env.python", "env.commit", "env.gpus"} <= set(df.columns)
    tp = df[(df.scenario == "throughput") & (df.engine == "anvil")].sort_values("param.batch")
    assert list(tp["param.batch"]) == [1, 4, 32] and list(tp["output_tok_s"]) == pytest.approx([6250.4, 25001.6, 200012.8])
    assert set(df["env.python"]) == {"3.11.7"} and set(df["run"]) == {"r1"}
    vllm = df[(df.engine == "vllm")].iloc[0]
    assert math.isnan(vllm["prefill_tok_s"]) and vllm["prefill_tok_s_note"].startswith("not measurable")
    serving = df[df.scenario == "serving"].sort_values("param.concurrency")
    assert list(serving["status"]) == ["ok", "failed", "partial"] and list(serving["failed"]) == [0.0, 3.0, 3.0]
    assert set(df[df.engine == "llamacpp"]["reason"]) == {NOT_INSTALLED}


def render(records) -> tuple[str, int]:
    """The terminal output at 120 columns, and the widest table's natural width."""
    console = Console(width=120, record=True, file=io.StringIO())
    wide = Console(width=400, file=io.StringIO())
    widest = 0
    for t in report.rich_tables(records):  # the tables, then the footnotes (plain text, wrapped at 120)
        console.print(t)
        if hasattr(t, "columns"):
            widest = max(widest, wide.measure(t).maximum)
    return console.export_text(), widest


def test_terminal_tables_fit_120_columns_and_print_each_reason_once():
    text, widest = render(demo())
    assert widest <= 120, widest
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.count("not installed: pip install llama-cpp-python") == 1  # 4 skipped rows, one footnote
    assert "skipped [2]" in text and "[2] not installed" in text
    assert text.count("request 2's first token came at 60 ms") == 1 and "n/a [1]" in text
    assert "3 of 32 requests failed (9.4%, max_failed_frac 0)" in text
    assert "3 of 32 requests failed (9.4%, max_failed_frac 0.1)" in text
    lines = [line.strip() for line in text.splitlines()]
    row = next(line for line in lines if line.startswith("anvil") and "200,013" in line)  # batch 32, one line
    assert "167,000" not in row and "5,344,000" in row  # prefill 167k x 32, no exponent
    assert "throughput tiny float32 cpu prompt_len=32 gen_len=12" in text  # shared model and params: the title
    serving = [line for line in lines if line.startswith("openai_http")]
    assert [line.split()[2] for line in serving] == ["ok", "failed", "partial"]  # engine, params, status
    assert [line.split()[-1] for line in serving] == ["0", "3", "3"]  # failed requests: the last column
    parity = next(line for line in lines if line.startswith("anvil") and "1.34e-05" in line)
    assert parity.split()[-1] == "3"  # first bad layer


def test_markdown_and_csv_are_built_on_the_frame(tmp_path):
    md, cs = report.write_tables(demo(), tmp_path)
    text = md.read_text()
    assert text.count("| throughput |") == 9 and text.count("| anvil |") == 5
    assert text.count(NOT_INSTALLED) == 2  # once under each table it appears in (throughput, latency)
    assert "| n/a [1] |" in text and "| skipped [2] |" in text  # numbered per table in markdown
    assert "| 25002 |" in text and "| 668000 |" in text  # no exponent below 1e9
    assert "## serving" in text and "| failed |" in text
    with open(cs, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(demo()) and rows[0]["scenario"] == "throughput"
    assert [r["reason"] for r in rows if r["engine"] == "llamacpp"] == [NOT_INSTALLED] * 4  # csv: per row
    serving = [r for r in rows if r["scenario"] == "serving"]
    assert [(r["status"], r["failed"]) for r in serving] == [("ok", "0"), ("failed", "3"), ("partial", "3")]
    header, body = report.rows(demo(), "parity")
    assert header[:5] == list(report.BASE_COLUMNS) and header[-1] == "reason"
    assert body[0][header.index("first_bad_layer")] == "3" and body[1][header.index("first_bad_layer")] == "-"
