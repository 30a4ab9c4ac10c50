"""The technical report generator (harness/report_build.py, harness/report_sections.py): it renders from the committed
results, every figure it references exists, every placeholder resolves (or the build fails naming it), a missing
result file degrades to "not measured yet", and a planted change in a result file changes the output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from harness import report_build as rb  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"
SECTIONS = ["1. Architecture", "2. Baseline", "3. Kernels", "4. Decode and prefill vs the bandwidth", "5. Continuous",
            "6. Int4", "7. Speculative", "8. Serving", "9. Long context", "10. Tensor parallelism", "11. Profiles",
            "12. Lessons learned", "Sources"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return rb.build(out), out


def test_renders_markdown_and_html(built):
    info, out = built
    md, page = info["md"].read_text(encoding="utf-8"), info["html"].read_text(encoding="utf-8")
    for title in SECTIONS:
        assert re.search(rf"^## {re.escape(title)}", md, re.M), title
        assert f">{title}" in page, title
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count("<table>") == md.count("\n|---") + md.startswith("|---")  # every markdown table is in the HTML
    assert "```mermaid" in md and "class='mermaid'" in page
    # every table says where it came from: hardware, driver, torch and commit
    assert md.count("*Source:*") >= 10
    for line in re.findall(r"^\*Source:\*.*$", md, re.M):
        assert all(k in line for k in ("hardware:", "driver:", "torch:", "commit:")), line


def test_every_figure_exists_and_is_small(built):
    info, out = built
    md, page = info["md"].read_text(encoding="utf-8"), info["html"].read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert refs and set(refs) == set(info["figures"])
    assert set(re.findall(r"<img alt='[^']*' src='([^']+)'", page)) == set(refs)
    for ref in refs:
        p = out / ref
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", ref
        assert p.stat().st_size < 300_000, (ref, p.stat().st_size)
    assert "img/modules.png" in refs and "img/roofline.png" in refs


def test_placeholders_all_resolved(built):
    info, _ = built
    md = info["md"].read_text(encoding="utf-8")
    assert "{{" not in md and "}}" not in md
    lessons = (REPO / "docs" / "lessons.md").read_text(encoding="utf-8")
    assert lessons.count("{{") >= 10  # the prose cites its numbers through placeholders
    typed = set(re.findall(r"[^\s(]*\d[^\s),.:;]*", rb.PLACEHOLDER.sub("", lessons)))
    names = {"Llama-3-8B", "Mistral-7B", "H100", "H200", "N+1", "N", "2k-token", "4k", "FlashAttention-2-style",
             "batch-1", "1", "bf16", "H200's", "int4"}  # names and configurations ("batch 1"), not measurements
    assert typed <= names, f"numbers typed into lessons.md: {sorted(typed - names)}"


def test_placeholder_syntax():
    r = RESULTS
    d = json.loads((r / "gpu/core-h200/core-bench.json").read_text())
    assert rb.resolve("core-h200/core-bench.json:continuous_batching.requests", r) == str(d["continuous_batching"]["requests"])
    v = d["decode"]["decode"]["1"]["decode_tok_s"]
    assert rb.resolve("core-h200/core-bench.json:decode.decode.1.decode_tok_s|.1f", r) == f"{v:.1f}"
    rec = [json.loads(x) for x in (r / "gpu/core-h200/gpu-decode-records.jsonl").read_text().splitlines() if x.strip()]
    want = next(x for x in rec if x["engine"] == "anvil" and x["params"]["batch"] == 8 and x["params"]["prompt_len"] == 128)
    got = rb.resolve("gpu/core-h200/gpu-decode-records.jsonl[engine=anvil,batch=8,prompt_len=128]:metrics.step_ms|.3f", r)
    assert got == f"{want['metrics']['step_ms']:.3f}"
    assert rb.resolve("gpu/kernels-h100.json:results[kernel=prefill seq=4096,impl=anvil].tflops|.0f", r).isdigit()
    with pytest.raises(rb.PlaceholderError, match=r"\{\{nope/missing.json:a\.b\}\}.*no file"):
        rb.fill("x {{nope/missing.json:a.b}} y", r, where="t.md")
    n_anvil = sum(x["engine"] == "anvil" for x in rec)
    with pytest.raises(rb.PlaceholderError, match=rf"matches {n_anvil} of {len(rec)}"):
        rb.fill("{{gpu/core-h200/gpu-decode-records.jsonl[engine=anvil]:metrics.step_ms}}", r)
    with pytest.raises(rb.PlaceholderError, match=r"no key 'nokey'"):
        rb.fill("{{core-h200/core-bench.json:decode.nokey}}", r)
    with pytest.raises(rb.PlaceholderError, match=r"not a value"):
        rb.fill("{{core-h200/core-bench.json:decode}}", r)
    with pytest.raises(rb.PlaceholderError, match=r"unclosed"):
        rb.fill("{{core-h200/core-bench.json:copy_gb_s", r)


def test_unresolvable_placeholder_fails_the_build(tmp_path):
    lessons = tmp_path / "lessons.md"
    lessons.write_text("# L\n\nSpeed was {{gpu/core-h200/core-bench.json:decode.decode.64.decode_tok_s|.1f}} tok/s.\n")
    with pytest.raises(rb.PlaceholderError, match=r"lessons\.md: \{\{gpu/core-h200/core-bench\.json:decode\.decode\.64"):
        rb.build(tmp_path / "out", lessons=lessons)
    assert rb.main(["--out", str(tmp_path / "out2"), "--lessons", str(lessons)]) == 1


def test_planted_result_change_changes_the_report(tmp_path, built):
    info, _ = built
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res, ignore=shutil.ignore_patterns("runs"))
    p = res / "gpu/core-h200/core-bench.json"
    d = json.loads(p.read_text())
    d["continuous_batching"]["speedup"] = 9.87
    d["continuous_batching"]["continuous"]["output_tok_s"] = 12345.6
    p.write_text(json.dumps(d))
    recs = [json.loads(x) for x in (res / "gpu/core-h200/gpu-decode-records.jsonl").read_text().splitlines() if x.strip()]
    for rec in recs:  # the cell lessons.md cites and the baseline table shows
        if rec["engine"] == "anvil" and rec["params"]["batch"] == 1 and rec["params"]["prompt_len"] == 128:
            rec["metrics"]["decode_tok_s"] = 777.7
    (res / "gpu/core-h200/gpu-decode-records.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    for prof in res.glob("gpu/profile-*"):  # missing files: the section says so, the rest still builds
        shutil.rmtree(prof) if prof.is_dir() else prof.unlink()
    out = rb.build(tmp_path / "out", results=res)
    md = out["md"].read_text(encoding="utf-8")
    assert md != info["md"].read_text(encoding="utf-8")
    assert "9.87x" in md  # lessons.md's placeholder and the batching table
    assert "12,346" in md and "777.7" in md
    assert "*Not measured yet:* profiles; it would be in `results/gpu/profile-*`" in md
    assert "profiles (results/gpu/profile-*)" in out["missing"]
    (res / "gpu/kernels-h100.json").unlink()  # a file lessons.md cites: the build fails and names the placeholder
    with pytest.raises(rb.PlaceholderError, match=r"gpu/kernels-h100\.json:results\[kernel=rms_norm"):
        rb.build(tmp_path / "out3", results=res)


def test_missing_sections_say_what_file_would_hold_them(built):
    info, _ = built
    md = info["md"].read_text(encoding="utf-8")
    files = {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_file()}
    if not any(re.search(r"(^|[/_-])tp\d*([/_.-]|$)|tensor[-_]?parallel", f) for f in files):
        assert "*Not measured yet:* tensor-parallel scaling" in md
    for m in info["missing"]:
        assert m.split(" (")[0] in md


def test_module_graph_without_graphviz(tmp_path):
    nodes, edges = rb.module_graph(REPO)
    assert {"engine.core", "engine.worker", "engine.model", "engine.attention", "engine.kernels"} <= set(nodes)
    assert ("engine.core", "engine.request") in edges or any(a == "engine.core" for a, _ in edges)
    png, how = rb.draw_module_graph(nodes, edges, tmp_path, use_dot=False)
    assert how.startswith("matplotlib") and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "modules.dot").read_text().startswith("digraph engine {")


def test_markdown_subset_to_html():
    blocks = rb.parse_markdown("# T\n\npara `a<b` and **bold**\nmore\n\n- one\n  cont\n- two\n\n```mermaid\nx-->y\n```\n")
    assert blocks == [("h", 1, "T"), ("p", "para `a<b` and **bold** more"), ("ul", ["one cont", "two"]),
                      ("code", "mermaid", "x-->y")]
    page = rb.to_html(blocks, "t")
    assert "<code>a&lt;b</code>" in page and "<strong>bold</strong>" in page and "<li>one cont</li>" in page


def test_int4_history_shows_the_newest_run_in_full_and_earlier_runs_as_rows():
    from harness.report_int4 import history_blocks, is_kernel_file, newest_run

    def run(commit, date, w13_ms):
        rows = [{"shape": "w13", "N": 28672, "K": 4096, "M": m, "kernel": k, "median_ms": t, "speedup_vs_dense": 1.0,
                 "status": "ok"} for m, k, t in ((1, "int4_cuda", w13_ms), (1, "int4_mma", 9.0), (1, "bf16_cublas", 0.001),
                                                (8, "int4_cuda", 0.002))]  # fmt: skip
        return {"rows": rows, "env": {"commit": commit, "date": date}}

    kern = {"a.json": run("old1", "2026-12-01T10:00", 0.0314), "b.json": run("new", "2026-12-03T10:00", 0.0287),
            "c.json": run("new", "2026-12-03T09:00", 0.03), "d.json": run("old2", "2026-12-02T10:00", 0.05)}
    assert all(is_kernel_file(d) for d in kern.values()) and not is_kernel_file({"rows": [{"engine": "x"}]})
    last, older = newest_run(kern)
    assert (last, older) == ("new", ["a.json", "d.json"])  # every file of the newest run stays in full
    (_, _, head), (_, text), (_, cols, rows) = history_blocks(kern, older, last)
    assert head == "Earlier int4 kernel runs" and "newest run (new)" in text and cols[-1] == "fastest at M = 1 (µs)"
    # M = 1 only, bf16 cuBLAS left out, the fastest int4 kernel per shape
    assert rows == [["`a.json`", "old1", "2026-12-01", 4, "w13 31.4"], ["`d.json`", "old2", "2026-12-02", 4, "w13 50.0"]]
    assert history_blocks(kern, [], last) == [] and newest_run({}) == ("", [])


def test_long_context_counts_a_128k_suite_cell_as_measured(tmp_path):
    """A 128k prompt measured by `bench run suites/long_context.toml` (a records file) is not "not measured yet";
    without an ok 128k cell the section says what file would hold one."""
    from harness.report_sections import Ctx, long_context

    rec = {"run_id": "r", "suite": "long_context", "cell_id": "c", "scenario": "long_context", "engine": "anvil",
           "engine_version": "x", "model": "m", "dtype": "bfloat16", "device": "cuda", "params": {"prompt_len": 131040},
           "status": "ok", "metrics": {"ttft_ms": 12700.0}, "schema_version": 1}  # fmt: skip
    d = tmp_path / "gpu/long-context-x"
    d.mkdir(parents=True)
    (d / "records.jsonl").write_text(json.dumps(rec) + "\n")
    text = lambda blocks: json.dumps(blocks, default=str)  # noqa: E731

    def run() -> str:
        (tmp_path / "out/img").mkdir(parents=True, exist_ok=True)
        return text(long_context(Ctx(results=tmp_path, img=tmp_path / "out/img", out=tmp_path / "out", root=REPO)))

    assert "128k-token prefill" not in run()
    rec["status"] = "failed"
    (d / "records.jsonl").write_text(json.dumps(rec) + "\n")
    assert "128k-token prefill" in run()


def test_serving_against_vllm_is_found_by_its_folder(tmp_path):
    """An openai_http serving run against `vllm serve` names vLLM only in its folder (results/gpu/serving-h200/
    vllm-0.26.0/): the serving section counts it; the same records elsewhere leave "not measured yet"."""
    from harness.report_sections import Ctx, serving

    src = RESULTS / "gpu/serving-h200/vllm-0.26.0/records.jsonl"
    if not src.is_file():
        pytest.skip("the committed vLLM serving run is not in this checkout")

    def run(folder: str) -> str:
        res = tmp_path / folder
        (res / "gpu/x" / folder).mkdir(parents=True)
        shutil.copy(src, res / "gpu/x" / folder / "records.jsonl")
        (res / "img").mkdir()
        return json.dumps(serving(Ctx(results=res, img=res / "img", out=res, root=REPO)), default=str)

    assert "serving against vLLM on the same GPU" not in run("vllm-0.26.0")
    assert "serving against vLLM on the same GPU" in run("some-server")


def test_gzipped_records_reach_the_baseline_table(built):
    """results/gpu/peers-h200/sglang-0.5.11/records.jsonl.gz (compressed when committed) is read like a plain one."""
    if not (RESULTS / "gpu/peers-h200/sglang-0.5.11/records.jsonl.gz").is_file():
        pytest.skip("the committed SGLang run is not in this checkout")
    md = built[0]["md"].read_text(encoding="utf-8")
    assert "| sglang | sglang 0.5.11 |" in md and "SGLang on the gpu-decode suite" not in md
