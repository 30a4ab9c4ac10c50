"""`python -m harness.report_build [--out docs/]`: the technical report (docs/report.md, docs/report.html, docs/img/*.png)
from the files under results/ that exist when it runs (harness/report_sections.py: a section whose file is missing
says "not measured yet" and names the file) and the hand-written prose of docs/lessons.md, whose numbers are
placeholders this module fills:

    {{core-h200/core-bench.json:decode.decode.1.decode_tok_s|.1f}}
    {{gpu/core-h200/gpu-decode-records.jsonl[engine=anvil,batch=1,prompt_len=128]:metrics.decode_tok_s|,.0f}}
    {{gpu/kernels-h100.json:results[kernel=prefill seq=4096,impl=anvil].tflops|.0f}}

FILE is relative to results/ (or to results/gpu/); a .jsonl file is the list of its lines. The key path after ':'
walks dicts by key (a key holding dots is matched whole) and lists by index or by a selector [k=v,...] that must
match exactly one item (k is a dotted path in the item; a key the item lacks is looked up in its 'params'). The
format after '|' is a Python format spec. A placeholder that cannot be resolved is an error naming it. The document
is a list of blocks (("h", level, text), ("p", text), ("table", ...), ("img", ...)), rendered as markdown and HTML.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.html_report import CSS, _html_table
from harness.report import _pipe_table, fmt

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)


class PlaceholderError(ValueError):
    """One or more placeholders could not be resolved; the message names each with the reason."""


# ---------------------------------------------------------------------------------------------------- placeholders
def _split_path(path: str) -> list[str]:
    """'a.b[k=v.1].c' -> ['a', 'b[k=v.1]', 'c']: dots inside brackets do not split."""
    return re.findall(r"(?:[^.\[]|\[[^\]]*\])+", path)


def _get(obj: Any, parts: list[str]) -> Any:
    """Walk obj by the parts of a key path (see the module docstring)."""
    if not parts:
        return obj
    head = parts[0]
    m = re.fullmatch(r"(.*?)\[(.*)\]", head)
    if m:
        base, sel = m.groups()
        items = _get(obj, [base]) if base else obj
        if not isinstance(items, list):
            raise KeyError(f"{head}: selector on a {type(items).__name__}, not a list")
        return _get(_select(items, sel), parts[1:])
    if isinstance(obj, dict):
        for n in range(len(parts), 0, -1):  # longest key first: a key may itself hold dots
            key = ".".join(parts[:n])
            if key in obj:
                return _get(obj[key], parts[n:])
        raise KeyError(f"no key {head!r} (keys: {', '.join(map(str, list(obj)[:12]))})")
    if isinstance(obj, list):
        try:
            return _get(obj[int(head)], parts[1:])
        except (ValueError, IndexError):
            raise KeyError(f"{head!r}: not an index of a list of {len(obj)}") from None
    raise KeyError(f"{head!r}: cannot index a {type(obj).__name__}")


def _select(items: list, sel: str) -> Any:
    conds = [c.partition("=") for c in sel.split(",")]
    if not all(eq for _, eq, _ in conds):
        raise KeyError(f"selector [{sel}]: every condition must be key=value")

    def field(item: Any, k: str) -> Any:
        for root in (item, item.get("params", {}) if isinstance(item, dict) else {}):
            try:
                return _get(root, _split_path(k.strip()))
            except KeyError:
                continue
        return KeyError

    hits = [it for it in items if all(str(field(it, k)) == v.strip() for k, _, v in conds)]
    if len(hits) != 1:
        raise KeyError(f"selector [{sel}] matches {len(hits)} of {len(items)} items (needs exactly 1)")
    return hits[0]


def _load(results: Path, rel: str) -> Any:
    cands = [p for p in (results / rel, results / "gpu" / rel) if p.is_file()]
    if not cands:
        raise KeyError(f"no file results/{rel} (nor results/gpu/{rel})")
    if len(cands) > 1:
        raise KeyError(f"ambiguous file {rel}: both results/{rel} and results/gpu/{rel} exist")
    text = cands[0].read_text(encoding="utf-8")
    if cands[0].suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def resolve(expr: str, results: Path, used: set[str] | None = None) -> str:
    """The text one placeholder expression ('FILE[:PATH][|FMT]') stands for; KeyError/ValueError with the reason."""
    body, _, spec = expr.strip().partition("|")
    m = re.fullmatch(r"([^:\[\]]+?)((?:\[[^\]]*\])?)(?::(.*))?", body.strip())
    if not m:
        raise KeyError("expected FILE[:key.path][|format]")
    rel, sel, path = m.group(1).strip(), m.group(2), (m.group(3) or "").strip()
    data = _load(results, rel)
    if used is not None:
        used.add(rel)
    parts = ([sel] if sel else []) + (_split_path(path) if path else [])
    value = _get(data, parts)
    if isinstance(value, (dict, list)):
        raise ValueError(f"resolves to a {type(value).__name__}, not a value")
    spec = spec.strip()
    if not spec:
        return fmt(value) if isinstance(value, float) else str(value)
    return format(value, spec)


def fill(text: str, results: Path, where: str = "", used: set[str] | None = None) -> str:
    """Every {{...}} of text replaced by its value; PlaceholderError naming each one that does not resolve."""
    errors: list[str] = []

    def sub(m: re.Match) -> str:
        try:
            return resolve(m.group(1), results, used)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            errors.append(f"{where}: {{{{{m.group(1).strip()}}}}}: {msg}")
            return m.group(0)

    out = PLACEHOLDER.sub(sub, text)
    if "{{" in PLACEHOLDER.sub("", out) and not errors:
        errors.append(f"{where}: an unclosed '{{{{' (no matching '}}}}')")
    if errors:
        raise PlaceholderError("unresolved placeholder(s):\n  " + "\n  ".join(errors))
    return out


_MD_ROW = re.compile(r"^\|\s*(.+?)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)%\s*\|$")
_TXT_ROW = re.compile(r"^\s*([\d.]+)%\s+([\d.]+) us\s+x(\d+)\s+(.+)$")


def parse_profiles(text: str) -> dict[str, list[tuple[str, int, float, float]]]:
    """{profile: [(kernel, calls, total ms, share %)]} from `bench profile`'s top-kernel tables and the
    `profile <name>:` blocks of the decode benchmark's logs."""
    out: dict[str, list] = {}
    name = "top kernels"
    for line in text.splitlines():
        if m := re.match(r"^(?:profile |# Top CUDA kernels by self device time: )(.+?):?$", line.strip()):
            name = m.group(1)
        elif m := _MD_ROW.match(line.strip()):
            out.setdefault(name, []).append((m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(5))))
        elif m := _TXT_ROW.match(line):
            out.setdefault(name, []).append((m.group(4), int(m.group(3)), float(m.group(2)) / 1000, float(m.group(1))))
    return out


# ---------------------------------------------------------------------------------------------------- blocks
def parse_markdown(text: str) -> list[tuple]:
    """The subset of markdown lessons.md uses -> blocks: '#' headings, paragraphs, '-' lists, fenced code."""
    blocks: list[tuple] = []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("```"):
            j = next((k for k in range(i + 1, len(lines)) if lines[k].strip().startswith("```")), len(lines))
            blocks.append(("code", s[3:].strip(), "\n".join(lines[i + 1:j])))
            i = j
        elif m := re.match(r"(#{1,6}) (.*)", s):
            blocks.append(("h", len(m.group(1)), m.group(2).strip()))
        elif s.startswith(("- ", "* ")):
            if blocks and blocks[-1][0] == "ul" and lines[i - 1].strip():
                blocks[-1][1].append(s[2:].strip())
            else:
                blocks.append(("ul", [s[2:].strip()]))
        elif s and i and lines[i - 1].strip() and blocks and blocks[-1][0] in ("p", "ul") and not \
                re.match(r"#{1,6} ", lines[i - 1].strip()):
            if blocks[-1][0] == "ul":
                blocks[-1][1][-1] += " " + s
            else:
                blocks[-1] = ("p", blocks[-1][1] + " " + s)
        elif s:
            blocks.append(("p", s))
        i += 1
    return blocks


def inline_html(text: str) -> str:
    """Inline markdown (`code`, **bold**, *italic*, [text](url)) -> HTML, everything else escaped."""
    parts = re.split(r"`([^`]+)`", text)  # odd items are code spans
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else _inline_rest(p) for i, p in enumerate(parts))


def _inline_rest(s: str) -> str:
    s = html.escape(s, quote=False)
    s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", text.lower()).strip().replace(" ", "-")


MD = {"h": lambda b: "#" * b[1] + " " + b[2], "p": lambda b: b[1], "ul": lambda b: "\n".join(f"- {x}" for x in b[1]),
      "table": lambda b: _pipe_table(b[1], b[2]), "img": lambda b: f"![{b[1]}]({b[2]})",
      "code": lambda b: f"```{b[1]}\n{b[2]}\n```", "toc": lambda b: "\n".join(f"- [{t}](#{_anchor(t)})" for t in b[1])}
HTML = {"h": lambda b: f"<h{b[1]} id='{_anchor(b[2])}'>{inline_html(b[2])}</h{b[1]}>",
        "p": lambda b: f"<p>{inline_html(b[1])}</p>",
        "ul": lambda b: "<ul>" + "".join(f"<li>{inline_html(x)}</li>" for x in b[1]) + "</ul>",
        "table": lambda b: _html_table(b[1], [[str(c).strip("`") for c in row] for row in b[2]]),
        "img": lambda b: f"<figure><img alt='{html.escape(b[1])}' src='{html.escape(b[2])}'><figcaption>"
                         f"{html.escape(b[1])}</figcaption></figure>",
        "code": lambda b: f"<pre class='mermaid'>{html.escape(b[2])}</pre>" if b[1] == "mermaid" else
                          f"<pre><code>{html.escape(b[2])}</code></pre>",
        "toc": lambda b: "<ul>" + "".join(f"<li><a href='#{_anchor(t)}'>{html.escape(t)}</a></li>" for t in b[1]) + "</ul>"}
MERMAID = ("<script type='module'>import mermaid from 'https://cdn.jsdelivr.net/npm/mermaid@10/dist/mermaid.esm.min.mjs';"
           "mermaid.initialize({startOnLoad:true});</script>")  # draws the flowchart where the page can load it


def to_markdown(blocks: list[tuple]) -> str:
    return "\n\n".join(MD[b[0]](b) for b in blocks) + "\n"


def to_html(blocks: list[tuple], title: str) -> str:
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                      f"<style>{CSS}\npre.mermaid{{background:#fff}}</style></head><body>", *(HTML[b[0]](b) for b in blocks),
                      *([MERMAID] if any(b[:2] == ("code", "mermaid") for b in blocks) else []), "</body></html>"]) + "\n"


def figures(blocks: list[tuple]) -> list[str]:
    return [b[2] for b in blocks if b[0] == "img"]


# ---------------------------------------------------------------------------------------------------- values
SCALAR = (int, float, str, bool, type(None))


def _names(gpus: Any) -> str | None:
    names = [str(g.get("name")) for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []
    return " + ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in sorted(set(names))) or None


def env_of(d: Any) -> dict:
    envs = [d[k] for k in ("env", "environment") if isinstance(d, dict) and isinstance(d.get(k), dict)]
    return envs[0] if envs else {k: d[k] for k in ("gpu", "driver", "torch", "commit") if isinstance(d, dict) and k in d}


def num(v: Any, d: int = 1) -> str:
    if isinstance(v, (bool, str)):
        return str(v)[:80]
    if not isinstance(v, (int, float)) or v != v:
        return "-"
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{d}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"


def prov(env: dict, src: str, stated: bool = False) -> tuple:
    hw = env.get("gpu") or _names(env.get("gpus")) or (f"CPU ({env['cpu']})" if env.get("cpu") else None)
    items = (("hardware", hw), ("driver", env.get("driver")), ("torch", env.get("torch")), ("commit", env.get("commit")))
    how = " (as stated in the file's text or its README: it has no env fields)" if stated else ""
    return ("p", f"*Source:* `results/{src}`; " + ", ".join(f"{k}: {v or 'not recorded'}" for k, v in items) + how + ".")


def text_env(text: str) -> dict:
    """Hardware / driver / torch / commit as a log or README states them in prose (files without env fields)."""
    pats = {"gpu": r"(?:NVIDIA )?H[12]00(?: 80GB HBM3)?", "driver": r"driver (\d+\.\d+(?:\.\d+)?)",
            "torch": r"torch (\d+\.\d+\.\d+[^\s,;)]*)", "commit": r"commit ([0-9a-f]{7,40})"}
    return {k: (m.group(1) if m.groups() else m.group(0)) for k, p in pats.items() if (m := re.search(p, text))}



# ---------------------------------------------------------------------------------------------------- module graph
def module_graph(root: Path = REPO, package: str = "engine") -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(node -> number of modules, (importer, imported) -> import statements) over package/**/*.py, read with ast.
    A node is a subpackage of the package (engine.core) or one of its top-level modules (engine.config)."""
    tracked = [root / p for p in _git(root, "ls-files", "--", f"{package}/*.py").split() if (root / p).is_file()]
    files = sorted(tracked) or sorted((root / package).rglob("*.py"))
    mods = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}

    nodes: dict[str, int] = {}
    edges: dict[tuple[str, str], int] = {}
    for mod, path in sorted(mods.items()):
        node = ".".join(mod.split(".")[:2])  # engine.core.scheduler -> engine.core; engine.config stays
        nodes[node] = nodes.get(node, 0) + 1
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, OSError, UnicodeDecodeError):
            continue
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for n in ast.walk(tree):
            targets: list[str] = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                src = n.module or ""
                if n.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                    src = ".".join(up + ([src] if src else []))
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in n.names]
            for t in targets:
                if t == package or not t.startswith(package + "."):
                    continue
                if node != (b := ".".join(t.split(".")[:2])):
                    edges[(node, b)] = edges.get((node, b), 0) + 1
    return nodes, edges


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def draw_module_graph(nodes: dict[str, int], edges: dict[tuple[str, str], int], img: Path,
                      use_dot: bool | None = None) -> tuple[Path, str]:
    """Write img/modules.png (graphviz `dot` when it exists, else matplotlib) and img/modules.dot; (png, renderer)."""
    img.mkdir(parents=True, exist_ok=True)
    lines = ["digraph engine {", "  rankdir=TB; nodesep=0.25; ranksep=0.45;",
             '  node [fontname="Helvetica", fontsize=10, style=filled];']
    for n, count in sorted(nodes.items()):
        pkg = count > 1 or n.split(".")[-1] in {"core", "worker", "model", "attention", "kernels", "quant", "spec",
                                                "distributed", "server"}
        label = n.removeprefix("engine.") + (f"/ ({count})" if pkg else "")
        shape = 'shape=box, fillcolor="#cfe2f3"' if pkg else 'shape=ellipse, fillcolor="#eeeeee"'
        lines.append(f'  "{n}" [label="{label}", {shape}];')
    for (a, b), k in sorted(edges.items()):
        lines.append(f'  "{a}" -> "{b}" [penwidth={min(0.6 + 0.25 * k, 3.0):.2f}, color="#555555"];')
    lines.append("}")
    dot_src = "\n".join(lines) + "\n"
    (img / "modules.dot").write_text(dot_src, encoding="utf-8")
    png = img / "modules.png"
    if (use_dot is None and shutil.which("dot")) or use_dot:
        try:
            subprocess.run(["dot", "-Tpng", "-Gdpi=72", "-o", str(png)], input=dot_src, text=True, check=True,
                           capture_output=True, timeout=60)
            return png, "graphviz dot"
        except (OSError, subprocess.SubprocessError):
            pass
    _draw_matplotlib(nodes, edges, png)
    return png, "matplotlib (graphviz dot not found)"


def _draw_matplotlib(nodes: dict[str, int], edges: dict[tuple[str, str], int], png: Path) -> None:
    """The fallback drawing: nodes on a circle (subpackages shaded), an arrow per importing pair."""
    import math

    from harness.plots import _plt

    names = sorted(nodes, key=lambda n: (nodes[n] == 1, n))
    pos = {n: (math.cos(2 * math.pi * i / len(names)), math.sin(2 * math.pi * i / len(names)))
           for i, n in enumerate(names)}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 10))
    for (a, b), k in edges.items():
        ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops=dict(arrowstyle="->", color="#888", lw=0.4 + 0.2 * k,
                                                                   shrinkA=14, shrinkB=14))
    for n, (x, y) in pos.items():
        ax.text(x, y, n.removeprefix("engine."), ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="#cfe2f3" if nodes[n] > 1 else "#eeeeee", ec="#666"))
    ax.set(xlim=(-1.25, 1.25), ylim=(-1.25, 1.25))
    ax.set_axis_off()
    fig.savefig(png, dpi=72)
    plt.close(fig)


def architecture(ctx) -> list[tuple]:
    """Section 1: the module graph of engine/ (drawn from its imports) and the path of a request (mermaid)."""
    nodes, edges = module_graph(ctx.root)
    png, how = draw_module_graph(nodes, edges, ctx.img)
    into = {n: sum(k for (_, b), k in edges.items() if b == n) for n in nodes}
    rows = [[n, nodes[n], len({b for (a, b) in edges if a == n}), into[n]] for n in sorted(nodes, key=lambda n: -into[n])]
    flow = ("flowchart LR\n  A[LLM.add_request / AsyncLLM] --> B[Scheduler: token budget,<br>chunked prefill + decode, "
            "preemption]\n  B --> C[BlockManager: paged KV blocks,<br>prefix hashing]\n  B --> D[ModelRunner: "
            "ForwardBatch,<br>pinned inputs]\n  D -->|decode-only step| E[CUDA graph replay]\n  D -->|mixed step| "
            "F[eager forward]\n  E --> G[model/llama.py: the one forward]\n  F --> G\n  G --> H[LinearMethod: tuned "
            "GEMV / cuBLAS / int4]\n  G --> I[AttentionBackend: Triton paged decode,<br>SDPA fresh prompts, paged "
            "prefill]\n  H --> J[kernels: Triton + CUDA extension]\n  I --> J\n  G --> K[sampler: tokens stay on the "
            "device]\n  K -->|next step launched before the host reads them| B")
    return [("p", "One generation core serves every path: a static batch, the server, speculative decoding and tensor "
                  "parallelism are all `EngineCore.step()` over requests. The figure is the real import graph: every "
                  f"git-tracked `engine/**/*.py` at commit `{_git(ctx.root, 'rev-parse', '--short', 'HEAD')}` read "
                  f"with `ast`, rendered with {how}. Boxes are subpackages (with "
                  "their module count), ellipses top-level modules; A -> B means A imports from B, thicker = more "
                  "import statements. DOT source: `img/modules.dot`."),
            ("img", "engine/ module graph (imports)", png.relative_to(ctx.out).as_posix()),
            ("table", ["node", "modules", "imports from (nodes)", "imported by (statements)"], rows),
            ("p", "The path of one request: scheduler -> model runner -> forward -> kernels (engine/core/, "
                  "engine/worker/, engine/model/, engine/attention/, engine/kernels/)."),
            ("code", "mermaid", flow)]


def sources(ctx) -> list[tuple]:
    tracked = set(_git(ctx.root, "ls-files", "results").split())
    rows = [[f"`results/{rel}`", "committed" if f"results/{rel}" in tracked else "not committed",
             f"{(ctx.results / rel).stat().st_size / 1024:,.1f} KB", ctx.sources[rel]] for rel in sorted(ctx.sources)]
    return [("p", "Every result file the report read (git: whether this checkout has it committed). Not measured yet, "
                  "with the file that would hold it:"), ("ul", ctx.missing or ["nothing"]),
            ("table", ["file", "git", "size", "note"], rows), ("p", "Result files no section reads (yet): " + (", ".join(
                f"`results/{r}`" for r in ctx.find(".", claim=False) if r not in ctx.sources) or "none") + ".")]


SECTIONS = (  # (title, the function of harness.report_sections that builds it; architecture is here)
    ("1. Architecture", "architecture"), ("2. Baseline: decode throughput, TTFT and memory", "baseline"),
    ("3. Kernels vs SDPA / cuDNN", "kernels"), ("4. Decode and prefill vs the bandwidth and compute floors", "roofline"),
    ("5. Continuous vs static batching", "batching"), ("6. Int4 weights", "int4"), ("7. Speculative decoding", "speculative"),
    ("8. Serving (vs vLLM)", "serving"), ("9. Long context", "long_context"), ("10. Tensor parallelism", "tensor_parallel"),
    ("11. Profiles", "profiles"),
)


def all_sections(ctx, lessons_blocks) -> list[tuple]:
    from harness import report_sections as rs  # lazily: the sections import this module's helpers

    head = _git(ctx.root, "rev-parse", "--short", "HEAD") or "unknown"
    titles = [t for t, _ in SECTIONS] + ["12. Lessons learned", "Sources"]
    blocks: list[tuple] = [
        ("h", 1, "Anvil: technical report"),
        ("p", "For an engineer choosing or building an LLM inference stack: how Anvil is built and what it measured "
              "next to HF transformers and the other engines, on the GPUs it ran on. Generated by `python -m "
              f"harness.report_build` at commit `{head}` from the files under `results/` (listed under Sources): no "
              "number here is typed by hand but the datasheet peaks, which live in `results/hardware/h100-h200.json`. A "
              "section whose results are not in yet says so and names the file."),
        ("toc", titles)]
    for title, fn in SECTIONS:
        blocks.append(("h", 2, title))
        try:
            blocks += (architecture if fn == "architecture" else getattr(rs, fn))(ctx)
        except Exception as exc:  # a result file of a new shape must not take the whole report down: say so instead
            ctx.missing.append(f"{title}: could not be built ({type(exc).__name__}: {exc})")
            blocks.append(("p", f"*Could not be built from its files:* `{type(exc).__name__}: {exc}`"))
    return blocks + [("h", 2, "12. Lessons learned"), *lessons_blocks(), ("h", 2, "Sources"), *sources(ctx)]


# ---------------------------------------------------------------------------------------------------- build
def build(out: str | Path = "docs", results: str | Path | None = None, lessons: str | Path | None = None,
          root: Path = REPO) -> dict[str, Any]:
    """Write out/report.md, out/report.html and out/img/*.png; returns {md, html, figures, sources, missing}."""
    out = Path(out)
    results = Path(results) if results else root / "results"
    lessons = Path(lessons) if lessons else root / "docs" / "lessons.md"
    img = out / "img"
    from harness.report_sections import Ctx

    ctx = Ctx(results=results, img=img, out=out, root=root)
    prose = _lessons(lessons, results, ctx)  # first: an unresolvable placeholder fails before any figure is drawn
    blocks = all_sections(ctx, lessons_blocks=lambda: prose)
    for png in img.rglob("*.png"):  # figures of an earlier build that this one no longer draws
        _ = png.unlink() if png.relative_to(out).as_posix() not in figures(blocks) else None
    missing = [f for f in figures(blocks) if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(f"figures referenced but not written: {', '.join(missing)}")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_path.write_text(to_html(blocks, "Anvil: technical report"), encoding="utf-8")
    return {"md": md_path, "html": html_path, "figures": figures(blocks), "sources": sorted(ctx.sources),
            "missing": list(ctx.missing)}


def _lessons(path: Path, results: Path, ctx) -> list[tuple]:
    if not path.is_file():
        return [("p", f"*Not written yet:* the lessons are hand-written prose in `{path.name}`.")]
    used: set[str] = set()
    text = fill(path.read_text(encoding="utf-8"), results, where=str(path.name), used=used)
    for rel in used:
        ctx.source(rel if (results / rel).is_file() else f"gpu/{rel}", "cited by lessons.md")
    return [b for b in parse_markdown(text) if b[:2] != ("h", 1)]  # its '#' title: the report has the section's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.report_build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs"), help="folder for report.md, report.html, img/ (docs/)")
    ap.add_argument("--results", default=None, help="results folder to read (default: results/ of this checkout)")
    ap.add_argument("--lessons", default=None, help="hand-written lessons (default: docs/lessons.md)")
    args = ap.parse_args(argv)
    try:
        info = build(args.out, args.results, args.lessons)
    except (PlaceholderError, FileNotFoundError) as exc:
        print(f"report_build: error: {exc}", file=sys.stderr)
        return 1
    for m in info["missing"]:
        print(f"not measured yet: {m}")
    print(f"wrote {info['md']} and {info['html']} ({len(info['figures'])} figures, {len(info['sources'])} sources)")
    return 0


if __name__ == "__main__":  # one instance of this module: report_sections imports harness.report_build
    from harness.report_build import main as _main

    sys.exit(_main())
