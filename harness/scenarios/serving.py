"""Serving scenario: drive an OpenAI-compatible server with the async load generator; TTFT/TPOT/ITL/E2E, goodput.

The server is, in order: `base_url` from the cell; else one started by `launch` (a command line in which "{port}",
"{host}", "{model}", "{model_path}", "{dtype}", "{device}" are filled in, e.g. anvil's own
`bench serve {model} --port {port} --dtype {dtype} --device {device}`; polled on GET /v1/models until ready, stopped after the cell;
its stdout and stderr go to artifacts/serving/<cell>.server.log in the run folder, never to a pipe nobody reads);
else the adapter's own `base_url` (the openai_http engine). Only loopback targets unless allow_remote = true.
The suite sweeps `concurrency` (fixed in-flight ceiling) or `request_rate` (Poisson / gamma arrivals, vLLM's
burstiness convention) into one cell per value. Definitions of every metric: harness/loadgen.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from adapters.http_stream import CLIENTS
from harness import loadgen
from harness import metrics as M
from harness.loadgen import LengthDist, LoadConfig, LoadgenError, Workload
from harness.scenarios import Param
from harness.telemetry import Telemetry, flat_metrics

PARAMS = {
    "base_url": Param(str, "", help="http://127.0.0.1:PORT of a running server ('' = the adapter's, or launch)"),
    "launch": Param(str, "", help="command line that starts the server for this cell ('' = none)"),
    "launch_timeout_s": Param(float, 120.0, min=1, help="wait this long for GET /v1/models to answer"),
    "endpoint": Param(str, "/v1/completions", help="/v1/completions | /v1/chat/completions"),
    "num_requests": Param(int, 32, min=1, help="measured requests (warm-up excluded)"),
    "warmup_requests": Param(int, 2, min=0, help="sent first, one at a time, left out of every metric"),
    "concurrency": Param(int, 0, sweep=True, min=0, help="most requests in flight (0 = unbounded)"),
    "request_rate": Param(float, math.inf, sweep=True, help="requests/s (inf = all at once)"),
    "burstiness": Param(float, 1.0, sweep=True, help="gamma shape of inter-arrival gaps (1 = Poisson)"),
    "prompt_len": Param(int, 128, sweep=True, min=1, help="prompt tokens (centre of the range)"),
    "output_len": Param(int, 64, sweep=True, min=1, help="output tokens asked for (EOS ignored)"),
    "range_ratio": Param(float, 0.0, min=0, help="lengths uniform in [len*(1-r), len*(1+r)] (0 = fixed)"),
    "dataset": Param(str, "", help="jsonl of prompts: {prompt | prompt_ids, output_len?} ('' = synthetic)"),
    "prompt_format": Param(str, "ids", help="ids (token ids, exact lengths) | text (synthetic words)"),
    "slo_ttft_ms": Param(float, 0.0, min=0, help="per-request TTFT SLO for goodput (0 = none)"),
    "slo_tpot_ms": Param(float, 0.0, min=0, help="per-request TPOT SLO for goodput (0 = none)"),
    "slo_e2e_ms": Param(float, 0.0, min=0, help="per-request end-to-end SLO for goodput (0 = none)"),
    "slo_percentile": Param(float, 99.0, min=0, help="percentile of the aggregate (MLPerf-style) SLO check"),
    "max_duration_s": Param(float, 600.0, min=0.001, help="cap on the measured phase; later requests fail"),
    "max_failed_frac": Param(float, 0.0, min=0, help="failed share a cell may have and be 'partial' (else 'failed')"),
    "request_timeout_s": Param(float, 300.0, min=0.001),
    "allow_remote": Param(bool, False, help="allow a non-loopback base_url"),
    "model_name": Param(str, "", help='sent as "model" (servers with one model ignore it)'),
    "seed": Param(int, 0, sweep=True, help="prompts and arrivals; a list runs one cell per seed (run-to-run spread, "
                  "and prompts no earlier cell sent, so no prefix-cache hits across cells)"),
    "telemetry_interval_s": Param(float, 0.2, min=0.01),
    "http_client": Param(str, "anvil", help="the load generator's HTTP client: anvil (lean, the default) | httpx "
                         "(~4x its CPU per streamed chunk: A/B runs of what the client adds to TPOT / ITL)"),
}
OWN_TELEMETRY = True  # samples around the measured phase only (not warm-up or server start)
KEY_METRICS = (
    "request_throughput_req_s", "output_tok_s", "goodput_req_s",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
)


def validate(params: dict, engines: tuple[str, ...]) -> tuple[str, str] | None:
    if params["endpoint"] not in ("/v1/completions", "/v1/chat/completions"):
        return "endpoint", f"expected /v1/completions or /v1/chat/completions, got {params['endpoint']!r}"
    if params["http_client"] not in CLIENTS:
        return "http_client", f"expected one of {', '.join(CLIENTS)}, got {params['http_client']!r}"
    if params["prompt_format"] not in ("ids", "text"):
        return "prompt_format", f"expected ids or text, got {params['prompt_format']!r}"
    if not params["range_ratio"] < 1:
        return "range_ratio", f"must be < 1, got {params['range_ratio']}"
    for key in ("request_rate", "burstiness"):
        vals = params[key] if isinstance(params[key], tuple) else (params[key],)
        if any(not v > 0 for v in vals):
            return key, f"must be > 0, got {params[key]}"
    if params["base_url"]:
        try:
            loadgen.check_target(params["base_url"], params["allow_remote"])
        except LoadgenError as exc:
            return "base_url", str(exc)
    return None


def plan(
    params: dict[str, Any], base_url: str | None = None, vocab_size: int = 512
) -> tuple[LoadConfig, Workload, dict[str, float]]:
    """Validated load configuration, workload and SLOs from cell params (defaults filled for missing keys)."""
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise LoadgenError(f"serving: unknown params {sorted(unknown)}; known: {', '.join(sorted(PARAMS))}")
    p = {k: v.default for k, v in PARAMS.items()} | dict(params)
    if not 0.0 <= float(p["max_failed_frac"]) <= 1.0:
        raise LoadgenError(f"serving: max_failed_frac must be in [0, 1], got {p['max_failed_frac']}")
    url = base_url or p["base_url"]
    if not url:
        raise LoadgenError("serving: no server: give base_url, use the openai_http engine, or launch = '...'")
    cfg = LoadConfig(
        base_url=str(url),
        model=str(p["model_name"]),
        endpoint=str(p["endpoint"]),
        num_requests=int(p["num_requests"]),
        warmup_requests=int(p["warmup_requests"]),
        concurrency=int(p["concurrency"]) or None,
        request_rate=float(p["request_rate"]),
        burstiness=float(p["burstiness"]),
        seed=int(p["seed"]),
        request_timeout_s=float(p["request_timeout_s"]),
        max_duration_s=float(p["max_duration_s"]),
        allow_remote=bool(p["allow_remote"]),
        http_client=str(p["http_client"]),
    )
    cfg.validate()
    if p["prompt_format"] == "ids" and not p["dataset"] and vocab_size < 11:
        raise LoadgenError(
            "serving: token-id prompts need the model's vocabulary, which is unknown for this model; "
            "set prompt_format = 'text' (or name a model whose config.json is local)"
        )
    ratio = float(p["range_ratio"])
    work = Workload(
        prompt_len=LengthDist.around(int(p["prompt_len"]), ratio),
        output_len=LengthDist.around(int(p["output_len"]), ratio),
        dataset=p["dataset"] or None,
        prompt_format=str(p["prompt_format"]),
        vocab_size=int(vocab_size),
        seed=int(p["seed"]),
    )
    slo = {k.removeprefix("slo_"): float(p[k]) for k in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms") if p[k]}
    return cfg, work, slo


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@contextlib.contextmanager
def launched_server(cmd: list[str] | str, fill: dict[str, str], timeout_s: float = 120.0,
                    log_path: str | os.PathLike | None = None, with_process: bool = False) -> Iterator:
    """Start a server process, wait until GET {base}/v1/models answers, yield its base_url (with_process: the pair
    base_url, Popen), then stop it. Its stdout + stderr go to `log_path` (a pipe nobody drains would block a chatty
    server once it fills); without one, to a temporary file removed afterwards."""
    import httpx

    fill = dict(fill)
    fill.setdefault("host", "127.0.0.1")
    fill.setdefault("port", str(free_port(fill["host"])))
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    argv = [a.format(**fill) for a in argv]
    base = f"http://{fill['host']}:{fill['port']}"
    loadgen.check_target(base)
    temporary = log_path is None
    if temporary:
        fd, log = tempfile.mkstemp(prefix="anvil-server-", suffix=".log")
        os.close(fd)
    else:
        log = os.fspath(log_path)
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    with open(log, "ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=os.environ.copy())
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was ready: {argv}\n"
                                   f"last output ({log}):\n{_tail(log)}")
            try:
                if httpx.get(base + "/v1/models", timeout=2.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s:.0f} s: {argv}\nlast output ({log}):\n"
                                   f"{_tail(log)}")
            time.sleep(0.25)
        yield (base, proc) if with_process else base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(log)


def run(adapter, params: dict, ctx) -> tuple[dict, dict]:
    """Registry entry point: one serving cell. The server: params base_url, else the one `launch` starts, else the
    adapter's own base_url (the openai_http engine)."""
    url = params.get("base_url") or (None if params.get("launch") else getattr(adapter, "base_url", None)) or None
    fill = {"model": str(getattr(ctx, "model_name", "") or ""), "model_path": str(getattr(ctx, "model_path", "") or "")}
    spec = getattr(ctx, "model", None)  # `bench serve {model} --dtype {dtype} --device {device}` (anvil's server)
    fill |= {"dtype": str(getattr(spec, "dtype", "") or "float32"), "device": str(getattr(spec, "device", "") or "cpu")}
    log = None
    if getattr(ctx, "out_dir", None) is not None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ctx.case_id}-{ctx.engine}")
        if len(name) > 120:  # a case id spells out every param (a launch command too): past NAME_MAX otherwise
            name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}-{ctx.engine}"
        log = os.path.join(ctx.out_dir, "artifacts", "serving", f"{name}.server.log")
    out = run_serving(params, url, fill, vocab_size=ctx.vocab_size, log_path=log)
    samples = {"requests": out["samples"], "telemetry": out["telemetry"], "info": out["info"]}
    return M.clean(out["metrics"]), samples


def run_serving(
    params: dict[str, Any], base_url: str | None = None, fill: dict[str, str] | None = None, vocab_size: int = 512,
    log_path: str | os.PathLike | None = None,
) -> dict:
    """One serving cell -> {"metrics": flat floats, "samples": per-request raw timings, "telemetry", "info"}.
    `base_url` wins over params["base_url"]; without either, params["launch"] starts a server first (its output
    to `log_path`, named in info.server_log)."""
    url = base_url or params.get("base_url")
    if params.get("launch") and not url:
        timeout = float(params.get("launch_timeout_s", PARAMS["launch_timeout_s"].default))
        with launched_server(params["launch"], fill or {}, timeout, log_path) as launched:
            out = _measure(params, launched, vocab_size)
        out["info"]["server_log"] = os.fspath(log_path) if log_path else None
        return out
    return _measure(params, url, vocab_size)


_PREFIX_CACHE = re.compile(r"^(?:vllm|anvil):prefix_cache_(hits|queries)_total(?:\{[^}]*\})?\s+(\S+)\s*$", re.M)


def parse_prefix_cache(text: str) -> dict[str, float] | None:
    """{"hits", "queries"} prompt tokens from a Prometheus text page with vLLM's or anvil's prefix-cache counters
    (summed over label sets); None when the page has neither."""
    found: dict[str, float] = {}
    for kind, value in _PREFIX_CACHE.findall(text):
        with contextlib.suppress(ValueError):
            found[kind] = found.get(kind, 0.0) + float(value)
    return found if {"hits", "queries"} <= set(found) else None


def server_prefix_cache(base_url: str) -> dict[str, float] | None:
    """The server's prefix-cache counters from GET {base_url}/metrics (loopback, already checked), or None."""
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=5.0, trust_env=False)
    except httpx.HTTPError:
        return None
    return parse_prefix_cache(r.text) if r.status_code == 200 else None


def _measure(params: dict[str, Any], base_url: str | None, vocab_size: int) -> dict:
    cfg, work, slo = plan(params, base_url, vocab_size)
    interval = float(params.get("telemetry_interval_s", PARAMS["telemetry_interval_s"].default))
    before = server_prefix_cache(cfg.base_url)
    with Telemetry(interval_s=interval) as tel:
        res = loadgen.run_load(cfg, work)
    after = server_prefix_cache(cfg.base_url) if before is not None else None
    metrics = loadgen.summarize(res, slo, float(params.get("slo_percentile", 99.0)))
    if after is not None:  # the cell's prompt tokens (warm-up included) the server took from its prefix cache
        q, h = after["queries"] - before["queries"], after["hits"] - before["hits"]
        metrics |= {"server_prefix_cache_queries": q, "server_prefix_cache_hits": h,
                    "server_prefix_cache_hit_rate": h / q if q > 0 else 0.0}  # fmt: skip
    tsum = tel.summary(generated_tokens=int(metrics["output_tokens"]) or None)
    metrics |= flat_metrics(tsum)
    errors = sorted({o.error for o in res.outcomes if o.error})
    return {
        "metrics": metrics,
        "samples": loadgen.samples(res),
        "telemetry": tsum,
        "info": {
            "base_url": cfg.base_url,
            "slo": slo,
            "truncated": res.truncated,
            "warmup_requests": len(res.warmup),
            "warmup_failed": sum(not o.ok for o in res.warmup),
            "errors": errors[:10],
        },
    }
