"""The sections of the technical report (harness/report_build.py): each reads the result files under results/ that
exist when it runs and returns blocks. A missing file gives a "not measured yet" line naming the file that would hold
it; a file of a shape no section knows is shown generically, never skipped. Every table is followed by its provenance
(hardware, driver, torch, commit) read from the file's env fields."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.plots import _plt
from harness.report_build import SCALAR, _names, env_of, num, prov, text_env
from harness.report_int4 import int4  # noqa: F401  (section 6 lives there; report_build looks sections up here)
from harness.results import Record, load_records

HARDWARE = "hardware/h100-h200.json"


def _plain(rel: str) -> str:
    """A records file's name without the .gz of a compressed one (load_records reads both)."""
    return rel.removesuffix(".gz") if rel.endswith(".jsonl.gz") else rel


def is_records(rel: str) -> bool:
    return _plain(rel).endswith(".jsonl")


@dataclass
class Ctx:
    results: Path  # the results/ folder read
    img: Path  # where figures go (out/img)
    out: Path  # the folder of report.md: figure paths are relative to it
    root: Path  # the checkout (engine/ for the module graph, git for what is committed)
    sources: dict[str, str] = field(default_factory=dict)  # every results/ file read -> note
    missing: list[str] = field(default_factory=list)  # "not measured yet" lines, for the summary
    claimed: set[str] = field(default_factory=set)  # files a section already showed

    def source(self, rel: str, note: str = "") -> None:
        self.sources.setdefault(rel, note)

    def json(self, rel: str) -> Any:
        if (p := self.results / rel).is_file():
            self.source(rel)
            return json.loads(p.read_text(encoding="utf-8"))
        return None

    def records(self, rel: str) -> list[Record]:  # none (noted under Sources) when it is not a records file
        try:
            recs = load_records(self.results / rel)
        except ValueError as exc:
            self.sources[rel] = f"not read as records: {str(exc)[:100]}"
            return []
        self.source(rel)
        return recs

    def find(self, pattern: str, ext: tuple[str, ...] = (".json", ".jsonl"), claim: bool = True) -> list[str]:
        """Files under results/ (never runs/) whose relative path matches the regex and no section claimed yet."""
        rels = sorted(p.relative_to(self.results).as_posix() for p in self.results.rglob("*") if p.is_file())
        out = [r for r in rels if Path(_plain(r)).suffix in ext and not r.startswith("runs/")
               and r not in self.claimed and re.search(pattern, _plain(r), re.I)]  # fmt: skip
        if claim:
            self.claimed.update(out)
        return out

    def not_measured(self, what: str, where: str) -> tuple:
        self.missing.append(f"{what} ({where})")
        return ("p", f"*Not measured yet:* {what}; it would be in `{where}`.")

    def plot(self, name: str, title: str, draw, size=(8, 4), ncols: int = 1) -> tuple:
        """One figure: draw(axes) fills it, saved small (80 dpi) as img/<name>; the image block."""
        fig, axes = _plt().subplots(1, ncols, figsize=size, squeeze=False)
        draw(*axes[0])
        for ax in axes[0]:
            ax.grid(True, alpha=0.25)
            _ = ax.legend(fontsize=6) if ax.get_legend_handles_labels()[0] else None
        self.img.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(self.img / name, dpi=80)
        _plt().close(fig)
        return ("img", title, (self.img / name).relative_to(self.out).as_posix())


def ratio(a: Any, b: Any, pct: bool = False) -> str:
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and b):
        return "-"
    return f"{100 * a / b:.1f}%" if pct else f"{a / b:.2f}x"


def rec_env(recs: list[Record]) -> dict:
    """The env of a run's records; a field that differs between records lists every value."""
    out = {k: " / ".join(dict.fromkeys(str(r.env[k]) for r in recs if r.env.get(k))) for k in
           ("driver", "torch", "commit", "cpu")}
    out["gpu"] = " / ".join(dict.fromkeys(g for r in recs if (g := _names(r.env.get("gpus")))))
    return {k: v for k, v in out.items() if v}


def generic(data: Any, rel: str, limit: int = 40) -> list[tuple]:
    """A file of an unknown shape: its list of row dicts, or a dict of row dicts, as a table; else its scalar fields
    (depth-first, the first `limit`). Always with its provenance."""
    what = [("p", str(data["what"]))] if isinstance(data, dict) and isinstance(data.get("what"), str) else []
    rows = data if isinstance(data, list) else None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        dicts = [(k, v) for k, v in data.items() if k not in ("env", "environment") and isinstance(v, dict)
                 and len(v) > 1 and all(isinstance(x, dict) for x in v.values())]
        rows = lists[0] if lists else ([{"": kk, **vv} for kk, vv in dicts[0][1].items()] if dicts else None)
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, SCALAR)))[:12]
        more = [("p", f"({len(rows) - limit} more rows in the file.)")] if len(rows) > limit else []
        return [*what, ("table", cols, [[num(r.get(c)) for c in cols] for r in rows[:limit]]), *more, prov(env_of(data), rel)]
    flat, todo = [], [("", data)]
    while todo and len(flat) < limit:  # depth-first over the dicts, scalars kept
        path, x = todo.pop(0)
        if isinstance(x, dict):
            todo[:0] = [(f"{path}.{k}".lstrip("."), v) for k, v in x.items() if k not in ("env", "environment")]
        elif isinstance(x, SCALAR):
            flat.append([path, num(x)])
    return [*what, ("table", ["field", "value"], flat), prov(env_of(data), rel)]


def shown(ctx: Ctx, rel: str) -> list[tuple]:
    """A file no section knows the shape of: throughput records as cells(), other records and JSON via generic()."""
    if not (is_records(rel) and (recs := ctx.records(rel))):
        return generic(ctx.json(rel) if rel.endswith(".json") else {}, rel)
    return cells(recs, rel) if all(r.scenario == "throughput" for r in recs) else [*generic([{
        "engine": r.engine, "scenario": r.scenario, "model": r.model, "status": r.status, **r.params, **r.metrics}
        for r in recs], rel)[:-1], prov(rec_env(recs), rel)]


def _group(items, key) -> dict:
    return {k: [it for it in items if key(it) == k] for k in dict.fromkeys(map(key, items))}


def wgb(r: Record) -> float | None:
    """GB of weights one decode step of the record reads: as the engine stores them (4-bit packed) where it says."""
    b, m = (r.engine_info or {}).get("weight_bytes_per_step"), r.metrics
    return round(b / 1e9, 2) if b else (round(m["weight_gb_s"] * m["step_ms"] / 1000, 2) if m.get("step_ms") else None)


def cells(recs: list[Record], rel: str) -> list[tuple]:
    """Every throughput cell of a run, one row each, with its provenance."""
    keys = ("decode_tok_s", "step_ms", "ttft_p50_ms", "prefill_tok_s", "weight_pct_copy", "gpu_mem_peak_mb", "j_per_token")
    return [("table", ["engine", "model", "weights GB/step", "batch", "prompt", "decode tok/s", "step ms", "TTFT p50 ms",
                       "prefill tok/s", "weights % of copy", "GPU mem MB", "J/token"],
             [[r.engine if r.status == "ok" else f"{r.engine} ({r.status}: {r.reason[:90]})",
               r.model.removeprefix("synthetic:"), num(wgb(r), 2), r.params.get("batch"), r.params.get("prompt_len"),
               *(num(r.metrics.get(k), 2) for k in keys)] for r in recs]),
            prov(rec_env(recs), rel)]


def _gpu_records(ctx: Ctx) -> list[tuple[str, list[Record]]]:
    """(file, ok throughput records on CUDA) of every records file under results/gpu/."""
    out = []
    for rel in ctx.find(r"^gpu/.*\.jsonl$", claim=False):
        recs = [r for r in ctx.records(rel) if r.scenario == "throughput" and r.status == "ok" and r.device == "cuda"]
        out += [(rel, recs)] if recs else []
    return out


def lines(ctx: Ctx, name: str, title: str, groups: dict, xlab: str, ylab: str, log: str = "", one: bool = False):
    """A line plot of {label: [(x, y)]}; log names the log axes ('x', 'xy'); one draws y = 1."""
    def draw(ax):
        xs = sorted({p[0] for pts in groups.values() for p in pts})
        for lab, pts in groups.items():
            pts = sorted(p for p in pts if p[1] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab, ls="--" if "hf" in lab else "-")
        _ = ax.axhline(1, color="k", lw=0.8) if one else None
        ax.set(xlabel=xlab, ylabel=ylab, title=title[:80], yscale="log" if "y" in log else "linear")
        _ = (ax.set_xscale("log", base=2), ax.set_xticks(xs, [num(x) for x in xs]), ax.minorticks_off()) if "x" in log else None
    return ctx.plot(name, title, draw)


def baseline(ctx: Ctx) -> list[tuple]:
    runs = _gpu_records(ctx)
    if not runs:
        return [ctx.not_measured("the gpu-decode suite", "results/gpu/<run>/records.jsonl")]
    body, series, detail = [], {}, []
    for rel, recs in runs:
        for (eng, model, w), grp in _group(recs, lambda r: (r.engine, r.model.removeprefix("synthetic:"),
                                                              round(wgb(r), 1) if wgb(r) else None)).items():
            gpu = (_names(grp[0].env.get("gpus")) or "?").replace("NVIDIA ", "")
            cell = {(r.params.get("batch"), r.params.get("prompt_len")): r.metrics for r in grp}
            pk = min(p for _, p in cell)
            body.append([gpu, model, num(w), eng, grp[0].engine_version,
                         *(num(cell.get((b, pk), {}).get("decode_tok_s")) for b in (1, 8, 32)),
                         *(num(cell.get((1, p), {}).get("ttft_p50_ms")) for p in (128, 2048)),
                         num(max((m.get("gpu_mem_peak_mb") or 0) for m in cell.values()) or None), f"`{rel}`"])
            if "before" not in rel:
                series[f"{eng} {gpu} {model} {num(w)} GB ({rel.split('/')[1]})"] = [(b, m.get("decode_tok_s")) for (b, p), m in cell.items() if p == pk]
        detail += cells(recs, rel)
    engines = {r.engine for _, recs in runs for r in recs}
    absent = [ctx.not_measured(f"{name} on the gpu-decode suite", f"results/gpu/<run>/records.jsonl, engine={e}")
              for e, name in (("vllm", "vLLM"), ("llamacpp", "llama.cpp (CUDA)"), ("sglang", "SGLang")) if e not in engines]
    return [("p", "`bench run suites/gpu-decode.toml`: every engine gets the same token ids; decode tok/s counts the "
                  "tokens after the last prompt finished, TTFT is p50, peak GPU memory is NVML's device-wide maximum "
                  "over the run's cells. Synthetic weights with the real shapes: speed only. Decode columns are at "
                  "each run's shortest prompt; `before-prefill-graphs` is an earlier commit kept as history."),
            ("table", ["GPU", "model", "weights GB/step", "engine", "version", "b1 tok/s", "b8 tok/s", "b32 tok/s", "TTFT b1 p128 ms",
                       "TTFT b1 p2048 ms", "peak GPU mem MB", "source"], body),
            *(prov(rec_env(recs), rel) for rel, recs in runs), *absent,
            lines(ctx, "baseline_decode.png", "Decode tok/s vs batch (shortest prompt), every GPU run", series, "batch",
                  "decode tok/s", log="xy"), ("h", 3, "Every cell"), *detail]


def _kernel_rows(data: dict) -> tuple[dict, dict]:
    """({kernel: {impl: value}} for the default configurations, {kernel: best tuned anvil value})."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    tuned: dict[str, float] = {}
    for r in data.get("results", []):
        v, base = r.get("tflops", r.get("gbps")), re.sub(r" (v\d+|prefetch=\d+ waves=\d+)$", "", r["kernel"])
        if base != r["kernel"]:
            tuned[base] = max(tuned.get(base, 0.0), v)
        else:
            table[base][r["impl"]] = v
    return dict(table), tuned


FLASH, CUDNN, SDPA, EAGER = "sdpa-flash (enable_gqa)", "sdpa-default (enable_gqa)", "sdpa (enable_gqa)", "torch eager"


def kernels(ctx: Ctx) -> list[tuple]:
    files = ctx.find(r"^gpu/kernels-.*\.json$")
    out = [] if files else [ctx.not_measured("kernel micro-benchmarks", "results/gpu/kernels-<gpu>.json")]
    for rel in files:
        data = ctx.json(rel)
        env, (table, tuned) = env_of(data), _kernel_rows(data)
        copy = env.get("copy_gb_s") or data.get("targets", {}).get("copy_bandwidth_gbps")
        how = "measured in the run" if env.get("copy_gb_s") else "the file states (targets.copy_bandwidth_gbps)"
        pre = {k: v for k, v in table.items() if k.startswith("prefill")}
        mem = {k: v for k, v in table.items() if k not in pre}

        def draw(a0, a1, pre=pre, mem=mem, copy=copy):
            for i, (impl, lab) in enumerate((("anvil", "anvil"), (FLASH, "SDPA flash"), (CUDNN, "SDPA cuDNN"))):
                a0.bar([x + 0.27 * i for x in range(len(pre))], [v.get(impl) or 0 for v in pre.values()], 0.27, label=lab)
            a0.set_xticks([x + 0.27 for x in range(len(pre))], [k[8:] for k in pre], fontsize=7, rotation=15)
            a1.barh(list(mem), [v.get("anvil") or 0 for v in mem.values()], label="anvil")
            a1.axvline(copy or 0, color="k", ls="--", lw=1, label=f"copy {num(copy)} GB/s")
            a0.set(ylabel="TFLOP/s", title="prefill attention")
            a1.set(xlabel="GB/s", title="memory-bound kernels")
            a1.tick_params(axis="y", labelsize=7)

        out += [("h", 3, f"{env.get('gpu', rel)}: `{rel}`"),
                ("p", "Prefill attention (TFLOP/s, causal, bf16) against PyTorch SDPA's flash backend and its default "
                      "(cuDNN on Hopper); 'best tuned' is the fastest variant of the file's tuning sweep."),
                ("table", ["kernel", "anvil", "SDPA flash", "SDPA default (cuDNN)", "anvil best tuned", "anvil / flash",
                           "anvil / cuDNN"], [[k, num(v.get("anvil")), num(v.get(FLASH)), num(v.get(CUDNN)),
                                               num(tuned.get(k)), ratio(v.get("anvil"), v.get(FLASH)),
                                               ratio(v.get("anvil"), v.get(CUDNN))] for k, v in pre.items()]),
                ("p", f"Decode attention over the KV cache and elementwise kernels (GB/s) against SDPA / torch eager; "
                      f"% of copy is of {num(copy)} GB/s, the copy ceiling {how}."),
                ("table", ["kernel", "anvil GB/s", "anvil best tuned", "SDPA or torch eager GB/s", "anvil / torch",
                           "% of copy"], [[k, num(v.get("anvil")), num(tuned.get(k)), num(v.get(SDPA, v.get(EAGER))),
                                           ratio(v.get("anvil"), v.get(SDPA, v.get(EAGER))),
                                           ratio(v.get("anvil"), copy, pct=True)] for k, v in mem.items()]),
                *([("p", f"*The file's notes:* {data['notes']}")] if data.get("notes") else []), prov(env, rel),
                ctx.plot(f"kernels-{Path(rel).stem}.png", f"Kernels vs SDPA / torch ({rel})", draw, (11, 4), 2)]
    return out


def roofline(ctx: Ctx) -> list[tuple]:
    hw = ctx.json(HARDWARE)
    runs = [(rel, recs) for rel, recs in _gpu_records(ctx) if "before" not in rel]
    if not hw or not runs:
        return [ctx.not_measured("bf16 peaks and GPU decode cells", f"results/{HARDWARE}, results/gpu/<run>/records.jsonl")]
    rows, pts, used = [], [], []
    for rel, recs in runs:
        pmin = min(x.params.get("prompt_len") for x in recs)
        full = {m: max(wgb(x) or 0 for x in recs if x.model == m) for m in {x.model for x in recs}}  # bf16 bytes
        for r in recs:
            m, gpu, b, p = r.metrics, _names(r.env.get("gpus")) or "", r.params.get("batch"), r.params.get("prompt_len")
            peak, copy = hw["gpus"].get(gpu, {}).get("bf16_dense_tflops"), r.env.get("gpu_copy_gb_s")
            if not (m.get("weight_gb_s") and m.get("step_ms") and copy and peak):
                continue
            used += [rel] if rel not in used else []
            w_gb, f_gb = wgb(r), full[r.model]  # GB read per step; the model's bf16 GB = 2 x params: FLOPs / token
            dec_tf = f_gb * b / m["step_ms"]  # 2 FLOP / param / token x batch tokens per step
            pts.append((gpu, r.engine, "decode", b * f_gb / w_gb, dec_tf, copy))
            cell = [gpu.replace("NVIDIA ", ""), r.model.removeprefix("synthetic:"), num(w_gb), r.engine]
            if p == pmin:
                rows.append([*cell, "decode", f"b{b} p{p}", num(m["step_ms"], 2), num(1000 * w_gb / copy, 2),
                             ratio(1000 * w_gb / copy, m["step_ms"], pct=True), num(dec_tf), ratio(dec_tf, peak, pct=True)])
            if b == 1 and m.get("prefill_tok_s"):
                pre_tf = f_gb * m["prefill_tok_s"] / 1000
                pts.append((gpu, r.engine, "prefill", p * f_gb / w_gb, pre_tf, copy))
                rows.append([*cell, "prefill", f"b1 p{p}", "-", "-", "-", num(pre_tf), ratio(pre_tf, peak, pct=True)])

    def draw(ax):
        for gpu, spec in sorted(hw["gpus"].items()):
            c, pk = max([q[5] for q in pts if q[0] == gpu], default=None), spec["bf16_dense_tflops"]
            if c:
                ax.plot([0.5, pk * 1000 / c, 8192], [c * 0.5 / 1000, pk, pk],
                        label=f"{gpu.replace('NVIDIA ', '')}: copy {num(c)} GB/s, bf16 peak {num(pk)} TFLOP/s")
        for (gpu, eng, kind), grp in _group(pts, lambda t: t[:3]).items():
            ax.scatter([g[3] for g in grp], [g[4] for g in grp], marker="o" if kind == "decode" else "s", s=22,
                       label=f"{eng} {kind} {gpu.replace('NVIDIA ', '')}")
        ax.set(xscale="log", yscale="log", xlabel="FLOP per weight byte read (bf16: tokens per weight read)",
               ylabel="TFLOP/s (weights' 2 FLOP/param/token)", title="Roofline: decode and prefill cells")

    return [("p", "Decode reads every weight once per step: its floor is the step's weight bytes over the copy "
                  "bandwidth the same run measured (`env.gpu_copy_gb_s`). Prefill reads them once per prompt and is "
                  "bound by the GPU's dense bf16 peak (NVIDIA's datasheet, in `results/hardware/h100-h200.json` with "
                  "its citation). FLOPs count the weights only (2 per parameter per token, parameters = the bf16 weight bytes / 2 of "
                  "the same model in the run; attention left out), so "
                  "long-prompt prefill points are lower bounds. Intensity: FLOPs per weight byte read (bf16 decode: the "
                  "batch; bf16 prefill at batch 1: the prompt tokens)."),
            ctx.plot("roofline.png", "Roofline: measured cells vs copy bandwidth and bf16 peak", draw, (8, 5)),
            ("table", ["GPU", "model", "weights GB", "engine", "phase", "cell", "step ms", "bandwidth floor ms", "floor / step",
                       "TFLOP/s", "% of bf16 peak"], rows),
            *(prov(rec_env(recs), rel) for rel, recs in runs if rel in used),
            ("p", f"*Peaks:* `results/{HARDWARE}`: " + "; ".join(f"{g}: {v['source']}" for g, v in hw["gpus"].items()))]


def batching(ctx: Ctx) -> list[tuple]:
    rows, provs, bars = [], [], []
    for rel in ctx.find(r"(^|/)(core-bench|continuous|.*batching).*\.json$", claim=False):
        data = ctx.json(rel)
        cb = data.get("continuous_batching") if isinstance(data, dict) else None
        if not isinstance(cb, dict) or "continuous" not in cb:
            continue
        env, st, co = env_of(data), cb.get("static", {}), cb["continuous"]
        dev, model = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)", data.get("preset") or data.get("model")
        rows.append([dev, model, data.get("dtype"), cb.get("requests"), cb.get("prompt_len"), cb.get("output_len"),
                     num(co.get("output_tok_s")), num(st.get("output_tok_s")), st.get("batch"),
                     ratio(co.get("output_tok_s"), st.get("output_tok_s")), co.get("preemptions")])
        provs.append(prov(env, rel))
        bars.append((f"{dev[:24]}\n{model}", co.get("output_tok_s") or 0, st.get("output_tok_s") or 0))
    if not rows:
        return [ctx.not_measured("continuous vs static batching", "results/gpu/core-h200/core-bench.json")]

    def draw(*axes):
        for ax, (lab, c, s) in zip(axes, bars, strict=True):
            ax.bar(["continuous", "static"], [c, s], color=["#3a7", "#999"])
            ax.set(title=lab, ylabel="output tok/s")

    return [("p", "`benchmarks/core_bench.py`: the same engine and the same requests, all added at once (continuous "
                  "batching, chunked prefill mixed with decode) or in static batches run to completion."),
            ("table", ["device", "model", "dtype", "requests", "prompt", "output", "continuous tok/s", "static tok/s",
                       "static batch", "speed-up", "preemptions"], rows), *provs,
            ctx.plot("batching.png", "Continuous vs static batching (output tok/s)", draw, (4 * len(bars), 3.4), len(bars))]


def speculative(ctx: Ctx) -> list[tuple]:
    files = ctx.find(r"(^|/)spec[-_.]|speculative|medusa|draft")
    out = [] if files else [ctx.not_measured("speculative decoding", "results/cpu/spec-tiny.json, results/gpu/"
                                             "spec-verify-cost.json (benchmarks/spec_bench.py)")]
    for rel in files:
        data = ctx.json(rel) if rel.endswith(".json") else None
        out.append(("h", 3, f"`{rel}`"))
        rows = data.get("rows") if isinstance(data, dict) and isinstance(data.get("rows"), list) else []
        env = env_of(data)
        if rows and isinstance(rows[0], dict) and "spec" in rows[0]:
            groups = _group([r for r in rows if r["spec"] != "plain"], lambda r: f"{r['spec']} b{r.get('batch')}")
            out += [("p", str(data.get("what", ""))),
                    ("table", ["spec", "k", "batch", "tok/s", "speed-up", "acceptance", "mean accepted len", "ms/token",
                               "lossless"], [[r["spec"], r.get("k"), r.get("batch"), num(r.get("tok_s")),
                                              ratio(r.get("speedup"), 1), num(r.get("acceptance_rate"), 3),
                                              num(r.get("mean_accepted_len"), 2), num(r.get("ms_per_token"), 2),
                                              r.get("lossless")] for r in rows]), prov(env, rel),
                    lines(ctx, f"spec-{Path(rel).stem}.png", f"Speculative speed-up vs k ({rel})",
                          {k: [(r.get("k") or 0, r.get("speedup")) for r in g] for k, g in groups.items()},
                          "k (drafted tokens per step)", "speed-up over plain decode", one=True)]
        else:
            out += shown(ctx, rel)
    return out


def serving(ctx: Ctx) -> list[tuple]:
    from harness import plots

    out, engines, vllm_run = [], set(), False
    keys = ("request_throughput_req_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "e2e_p99_ms",
            "goodput_req_s")
    for rel in ctx.find(r"\.jsonl$", ext=(".jsonl",), claim=False):
        if not (recs := [r for r in ctx.records(rel) if r.scenario == "serving"]):
            continue
        ctx.claimed.add(rel)
        engines |= {r.engine_version.lower() for r in recs} | {r.engine for r in recs}
        vllm_run |= "vllm" in rel.lower()  # an openai_http run against `vllm serve` names it only in its folder
        rows = [[r.engine, r.engine_version, r.model, r.device, f"c={r.params['concurrency']}" if r.params.get(
            "concurrency") else f"rate={r.params.get('request_rate')}", r.status, *(num(r.metrics.get(k)) for k in keys)]
            for r in recs]
        png = plots.serving_sweep(recs, ctx.img / ("serving-" + re.sub(r"[^a-z0-9]+", "-", str(Path(rel).parent).lower())))
        out += [("h", 3, f"`{rel}`"), ("table", ["engine", "version", "model", "device", "load", "status", "req/s",
                                                 "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "E2E p99 ms",
                                                 "goodput req/s"], rows), prov(rec_env(recs), rel),
                *([("img", f"Serving sweep ({rel})", png.relative_to(ctx.out).as_posix())] if png else [])]
    for rel in ctx.find(r"serv|vllm|sglang"):
        out += [("h", 3, f"`{rel}`"), *shown(ctx, rel)]
    if not (vllm_run or any("vllm" in e for e in engines)):
        out.insert(0, ctx.not_measured("serving against vLLM on the same GPU", "results/gpu/<run>/records.jsonl, "
                                       "serving scenario, engine vllm or openai_http against `vllm serve`"))
    return out


def longest_ok_prompt(ctx: Ctx, rel: str) -> int:
    """The longest prompt of a suite records file's completed long_context cells (0 if none)."""
    lens = [int(r.params.get("prompt_len") or 0) for r in ctx.records(rel)
            if r.scenario == "long_context" and r.status == "ok"]  # fmt: skip
    return max(lens, default=0)


def long_context(ctx: Ctx) -> list[tuple]:
    out, bars, longest = [], [], 0
    for rel in ctx.find(r"long[-_]?context|(^|/)long-|(^|/)core-bench\.json$", claim=False):
        data = ctx.json(rel) if rel.endswith(".json") else None
        lc = data.get("long_context") if isinstance(data, dict) else None
        if isinstance(lc, dict) and isinstance(lc.get("runs"), dict):
            out += [("table", ["prompt", "chunk", "TTFT s", "prefill tok/s", "peak activations GB", "decode tok/s then"],
                     [[num(lc.get("prompt_len")), ch, num(v.get("ttft_s"), 2), num(v.get("prefill_tok_s")),
                       num(v.get("peak_activation_gb"), 2), num(v.get("decode_tok_s"))] for ch, v in lc["runs"].items()]),
                    prov(env_of(data), rel)]
            bars += [(f"{lc.get('prompt_len')}\nchunk {ch}", v) for ch, v in lc["runs"].items()]
        elif isinstance(data, dict) and data.get("long_error"):
            out.append(("p", f"`results/{rel}`: its long-context part recorded an error: `{data['long_error']}`."))
        elif is_records(rel) or (isinstance(data, dict) and "core-bench" not in rel):
            out += [("h", 3, f"`{rel}`"), *shown(ctx, rel)]
            longest = max(longest, longest_ok_prompt(ctx, rel) if is_records(rel) else 0)
        ctx.claimed.add(rel)

    def draw(a0, a1):
        a0.bar([b[0] for b in bars], [b[1].get("prefill_tok_s") or 0 for b in bars])
        a1.bar([b[0] for b in bars], [b[1].get("peak_activation_gb") or 0 for b in bars], color="#c63")
        a0.set(ylabel="prefill tok/s", title="prefill speed")
        a1.set(ylabel="GB", title="peak activation memory")

    big = [] if longest >= 128 * 1024 - 64 or any(b[0].startswith(("131", "128")) for b in bars) else \
        [ctx.not_measured("a 128k-token prefill in a result file", "results/gpu/<gpu>/long-context-128k.json")]
    return [("p", "Chunked prefill bounds activation memory by the chunk size; the price is the attention of every "
                  "chunk over the cached prefix.")] + out + big + \
        [ctx.plot("long_context.png", "Chunked prefill: speed and activation memory", draw, (10, 3.6), 2)] * bool(bars)


def tensor_parallel(ctx: Ctx) -> list[tuple]:
    files = ctx.find(r"(^|[/_-])tp\d*([/_.-]|$)|tensor[-_]?parallel")
    out = [] if files else [ctx.not_measured("tensor-parallel scaling", "results/gpu/tp-<gpus>-<model>.json "
                                             "(benchmarks/tp_bench.py)")]
    gpu = any(not str(rel).startswith("cpu/") for rel in files) or not files
    out += [] if gpu else [ctx.not_measured("tensor-parallel scaling on GPUs", "results/gpu/tp-<gpus>-<model>.json")]
    for rel in files:
        data = ctx.json(rel) if rel.endswith(".json") else None
        out.append(("h", 3, f"`{rel}`"))
        if not (isinstance(data, dict) and isinstance(data.get("cases"), list)):  # not benchmarks/tp_bench.py output
            out += shown(ctx, rel)
            continue
        cases, dev = data["cases"], data.get("args", {}).get("device")
        bs = sorted({b for c in cases for b in c.get("decode", {})}, key=int)
        rows = [[c.get("model"), c.get("n_layers"), c.get("tp"), c.get("failed") or c.get("skipped") or "ok",
                 *(num(c.get("decode", {}).get(b, {}).get("decode_tok_s")) for b in bs),
                 *(num(c.get("decode", {}).get(b, {}).get("comm", {}).get(k, {}).get("ms_per_step"), 3)
                   for b in bs[:1] for k in ("all_reduce", "all_gather")),
                 num(c.get("ttft_ms", {}).get("median"))] for c in cases]
        scale = [[s.get("model"), s.get("n_layers"), s.get("tp"), ratio(s.get("ttft_speedup"), 1),
                  *(ratio(s.get("decode_speedup", {}).get(b), 1) for b in bs)] for s in data.get("scaling", [])]
        groups = {f"{c['model']}:{c.get('n_layers')} TP={c['tp']}": [(int(b), v.get("decode_tok_s")) for b, v in
                                                                   c["decode"].items()] for c in cases if "decode" in c}
        out += [*([("p", "*A CPU dry run:* its numbers only show that the benchmark runs.")] if dev == "cpu" else []),
                ("table", ["model", "layers", "TP", "status", *(f"b{b} tok/s" for b in bs), f"all-reduce ms/step b{bs[0]}"
                           if bs else "all-reduce", "all-gather ms/step", "TTFT ms"], rows),
                *([("table", ["model", "layers", "TP", "TTFT speed-up", *(f"b{b} decode speed-up" for b in bs)], scale)]
                  if scale else []), *generic({"rows": data.get("tiny_check") or []}, rel)[:-1], prov(env_of(data), rel),
                lines(ctx, f"tp-{Path(rel).stem}.png", f"Decode tok/s by TP size ({rel})", groups, "batch",
                      "decode tok/s", log="x")]
    return out


def profiles(ctx: Ctx) -> list[tuple]:
    from harness.report_build import parse_profiles  # lazily: report_build imports this module
    files = ctx.find(r"^gpu/profile-", ext=(".json", ".md", ".log", ".txt"))
    out = [] if files else [ctx.not_measured("profiles", "results/gpu/profile-*")]
    for rel in (f for f in files if Path(f).name != "README.md"):
        path = ctx.results / rel
        readme = path.parent / "README.md" if "/" in rel.removeprefix("gpu/") else None
        text = path.read_text(encoding="utf-8", errors="replace")
        env = text_env(text + (readme.read_text(encoding="utf-8") if readme and readme.is_file() else ""))
        ctx.source(rel)
        if rel.endswith(".json"):
            out += [("h", 3, f"`{rel}`"), *generic(json.loads(text), rel, limit=12)]
        for i, (name, rows) in enumerate(parse_profiles(text).items()):
            top = sorted(rows, key=lambda r: -r[3])[:10]

            def draw(ax, top=top, name=name):
                ax.barh([k[:40] for k, *_ in top][::-1], [s for *_, s in top][::-1])
                ax.set(xlabel="share of GPU time (%)", title=name[:70])
                ax.tick_params(axis="y", labelsize=7)

            stem = re.sub(r"[^a-z0-9]+", "-", rel.removeprefix("gpu/").rsplit(".", 1)[0].lower())
            out += [("h", 3, f"`{rel}`: {name[:90]}"), ("table", ["kernel", "calls", "total ms", "share"],
                                                         [[k[:80], c, num(t, 2), f"{s:.1f}%"] for k, c, t, s in top]),
                    prov(env, rel, stated=True),
                    ctx.plot(f"{stem}-{i}.png", f"Top kernels: {name[:70]}", draw, (8, 0.35 * len(top) + 1.2))]
    return out
