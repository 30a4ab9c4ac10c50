"""Async load generator for OpenAI-compatible streaming endpoints: arrivals, concurrency, per-request timings, SLO metrics.

Definitions follow vLLM's serve benchmark so numbers read the way users expect:
- TTFT: request sent -> first streamed token event. ITL: gaps between consecutive token events (pooled over requests).
- TPOT: (e2e - TTFT) / (output tokens - 1), per request. E2E: request sent -> stream finished.
- Arrivals: request_rate = inf sends everything at once (bounded by `concurrency`); otherwise inter-arrival gaps are
  gamma(shape=burstiness, scale=1/(rate*burstiness)): burstiness 1.0 is a Poisson process, < 1 burstier, > 1 steadier.
- Goodput: completed requests that meet every per-request SLO (TTFT, TPOT, E2E), per second of benchmark time.
  The MLPerf-style aggregate check (e.g. TTFT p99 <= 2 s and TPOT p99 <= 100 ms) is reported beside it as slo_pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapters.http_stream import CLIENTS, make_client
from adapters.sse import SSEParser
from harness.metrics import percentile, stdev

# Words that are one token each in the Llama / Mistral vocabularies (leading space), for text-only servers.
_WORDS = "the of and to in is that for it as with was on be by at this from or an are have not but".split()


class LoadgenError(ValueError):
    """A load configuration that must not run (non-loopback target, bad distribution, bad dataset)."""


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed `value`, or uniform over [low, high] inclusive."""

    kind: str = "fixed"  # fixed | uniform
    value: int = 128  # for fixed
    low: int = 0  # for uniform
    high: int = 0  # for uniform

    @classmethod
    def parse(cls, spec: Any, what: str) -> LengthDist:
        """128 -> fixed; {"kind": "uniform", "low": 64, "high": 256} or [64, 256] -> uniform."""
        if isinstance(spec, LengthDist):
            return spec
        if isinstance(spec, bool):
            raise LoadgenError(f"{what}: expected a length, got {spec!r}")
        if isinstance(spec, int):
            dist = cls("fixed", value=spec)
        elif isinstance(spec, list | tuple) and len(spec) == 2:
            dist = cls("uniform", low=int(spec[0]), high=int(spec[1]))
        elif isinstance(spec, dict):
            kind = spec.get("kind", "fixed")
            if kind == "fixed":
                dist = cls("fixed", value=int(spec["value"]))
            elif kind == "uniform":
                dist = cls("uniform", low=int(spec["low"]), high=int(spec["high"]))
            else:
                raise LoadgenError(
                    f"{what}: unknown distribution kind {kind!r} (fixed | uniform; use dataset= for files)"
                )
        else:
            raise LoadgenError(f"{what}: expected an int, [low, high] or a table, got {spec!r}")
        if dist.kind == "fixed" and dist.value < 1:
            raise LoadgenError(f"{what}: length must be >= 1, got {dist.value}")
        if dist.kind == "uniform" and not 1 <= dist.low <= dist.high:
            raise LoadgenError(f"{what}: need 1 <= low <= high, got [{dist.low}, {dist.high}]")
        return dist

    @classmethod
    def around(cls, value: int, range_ratio: float = 0.0) -> LengthDist:
        """vLLM's random-dataset convention: uniform over [value * (1 - r), value * (1 + r)]; r = 0 is fixed."""
        if not 0.0 <= range_ratio < 1.0:
            raise LoadgenError(f"range_ratio must be in [0, 1), got {range_ratio}")
        if range_ratio == 0.0:
            return cls.parse(int(value), "length")
        low = max(1, math.floor(value * (1.0 - range_ratio)))
        return cls.parse([low, math.ceil(value * (1.0 + range_ratio))], "length")

    def sample(self, rng: random.Random) -> int:
        return self.value if self.kind == "fixed" else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Workload:
    """What each request asks for. A dataset (jsonl) overrides the synthetic prompt lengths."""

    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    dataset: str | None = None  # jsonl lines: {"prompt": str} or {"prompt_ids": [int]}, optional "output_len"
    prompt_format: str = "ids"  # ids: token-id prompts (exact lengths) | text: synthetic words (~1 token each)
    vocab_size: int = 512  # synthetic ids are drawn from [10, vocab_size) to stay clear of special tokens
    seed: int = 0


@dataclass
class RequestSpec:
    prompt: str | list[int]  # what is sent as "prompt" (or as the user message for chat endpoints)
    prompt_len: int | None  # tokens, where known before sending (token-id prompts, datasets with ids)
    max_tokens: int  # output tokens asked for


def build_requests(work: Workload, n: int) -> list[RequestSpec]:
    """`n` requests, deterministic for a given seed; dataset rows are cycled in file order."""
    rng = random.Random(work.seed)
    if work.prompt_format not in ("ids", "text"):
        raise LoadgenError(f"prompt_format must be 'ids' or 'text', got {work.prompt_format!r}")
    if work.dataset:
        rows = load_dataset(work.dataset)
        out = []
        for i in range(n):
            row = rows[i % len(rows)]
            max_tokens = int(row.get("output_len") or work.output_len.sample(rng))
            if "prompt_ids" in row:
                out.append(RequestSpec(list(row["prompt_ids"]), len(row["prompt_ids"]), max_tokens))
            else:
                out.append(RequestSpec(str(row["prompt"]), None, max_tokens))
        return out
    out = []
    for _ in range(n):
        plen, olen = work.prompt_len.sample(rng), work.output_len.sample(rng)
        if work.prompt_format == "ids":
            lo = min(10, work.vocab_size - 1)
            out.append(RequestSpec([rng.randrange(lo, work.vocab_size) for _ in range(plen)], plen, olen))
        else:
            out.append(RequestSpec(" ".join(rng.choice(_WORDS) for _ in range(plen)), None, olen))
    return out


def load_dataset(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise LoadgenError(f"dataset {path}: no such file")
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoadgenError(f"dataset {path}:{lineno}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not ("prompt" in row or "prompt_ids" in row):
            raise LoadgenError(f"dataset {path}:{lineno}: each line needs 'prompt' (text) or 'prompt_ids' (ints)")
        rows.append(row)
    if not rows:
        raise LoadgenError(f"dataset {path}: empty")
    return rows


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (the /v1/... path is `endpoint`)
    model: str = ""  # sent as "model"; servers with one model ignore it
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    num_requests: int = 32  # measured requests (warm-up excluded)
    warmup_requests: int = 2  # sent first, one at a time, and left out of every metric
    concurrency: int | None = None  # most requests in flight; None = unbounded
    request_rate: float = math.inf  # requests/s; inf = send as fast as `concurrency` allows
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1.0 = Poisson
    seed: int = 0  # arrivals
    request_timeout_s: float = 300.0  # one request, send to last byte (asyncio.timeout around the stream)
    max_duration_s: float = 600.0  # the whole measured phase; requests still running then are cancelled (errors)
    allow_remote: bool = False  # a non-loopback base_url is refused unless this is set
    ignore_eos: bool = True  # ask for exactly max_tokens (vLLM / llama.cpp extension field)
    temperature: float = 0.0
    include_usage: bool = True  # ask for a final usage chunk (exact output token counts)
    http_client: str = "anvil"  # anvil (adapters/http_stream.py, lean) | httpx (its CPU cost per chunk is ~4x)

    def validate(self) -> None:
        check_target(self.base_url, self.allow_remote)
        if not 1 <= self.num_requests <= 100_000:
            raise LoadgenError(f"num_requests must be in [1, 100000], got {self.num_requests}")
        if self.warmup_requests < 0:
            raise LoadgenError(f"warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadgenError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise LoadgenError(f"request_rate must be > 0 (inf for all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise LoadgenError(f"burstiness must be > 0, got {self.burstiness}")
        if not 0 < self.max_duration_s <= 24 * 3600:
            raise LoadgenError(f"max_duration_s must be in (0, 86400], got {self.max_duration_s}")
        if self.endpoint not in ("/v1/completions", "/v1/chat/completions"):
            raise LoadgenError(f"endpoint must be /v1/completions or /v1/chat/completions, got {self.endpoint!r}")
        if self.http_client not in CLIENTS:
            raise LoadgenError(f"http_client must be one of {', '.join(CLIENTS)}, got {self.http_client!r}")


def check_target(base_url: str, allow_remote: bool = False) -> None:
    """Refuse anything but http(s) to a loopback host unless `allow_remote`; never resolves names."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"base_url {base_url!r}: expected http://HOST:PORT")
    if allow_remote:
        return
    host = parts.hostname
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadgenError(
            f"base_url {base_url!r} is not a loopback address; the load generator only targets 127.0.0.1/::1/localhost "
            "unless allow_remote = true is set explicitly"
        )


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from start) of `n` requests: all 0 for rate inf, else cumulative gamma gaps (mean 1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out


@dataclass
class RequestOutcome:
    """One request's raw timings (seconds) and counts: the sample every metric is computed from."""

    index: int  # position in the measured phase (-1 for warm-up)
    start: float  # send time, seconds since the measured phase began
    prompt_len: int | None  # from the server's usage when given, else as sent
    max_tokens: int  # asked for
    output_tokens: int = 0  # from the server's usage when given, else token events counted
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between token events
    e2e: float | None = None
    ok: bool = False
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _token_event(chunk: dict) -> bool:
    """A chunk that carries generated text (or a token); a trailing chunk with only finish_reason does not count."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content")
    if text:
        return True
    return c.get("finish_reason") is None and text is not None


def _body(cfg: LoadConfig, req: RequestSpec) -> dict:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.max_tokens,
        "stream": True,
        "temperature": cfg.temperature,
    }
    if cfg.endpoint.endswith("chat/completions"):
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = req.max_tokens
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def send_one(client, cfg: LoadConfig, req: RequestSpec, index: int, t0: float) -> RequestOutcome:
    """Send one streaming request and time every token event on the host clock (when its bytes arrived)."""
    out = RequestOutcome(
        index=index, start=time.perf_counter() - t0, prompt_len=req.prompt_len, max_tokens=req.max_tokens
    )
    sent = time.perf_counter()
    last = sent
    events = 0
    try:
        async with asyncio.timeout(cfg.request_timeout_s), client.post(cfg.endpoint, _body(cfg, req)) as resp:
            if resp.status_code != 200:
                text = (await resp.read()).decode(errors="replace")[:300]
                out.error = f"HTTP {resp.status_code}: {text}"
                return out
            parser = SSEParser()  # the project's one SSE parser (framing, split lines, comments)
            finished = False
            async for now, chunk in resp.pieces():
                for ev in parser.feed(chunk):
                    if ev.done:
                        finished = True
                        break
                    item = ev.json()
                    if not isinstance(item, dict):
                        continue
                    if item.get("error"):
                        raise RuntimeError(f"server error in stream: {str(item['error'])[:300]}")
                    if _token_event(item):
                        if events == 0:
                            out.ttft = now - sent
                        else:
                            out.itl.append(now - last)
                        last = now
                        events += 1
                    usage = item.get("usage")
                    if usage:
                        out.output_tokens = int(usage.get("completion_tokens") or 0)
                        out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
                if finished:
                    break
        out.e2e = time.perf_counter() - sent
        if events == 0:
            out.error = "stream ended without any token"
            return out
        out.output_tokens = out.output_tokens or events
        out.ok = True
    except asyncio.CancelledError:
        out.error = "cancelled: max_duration_s reached"
    except TimeoutError:
        out.error = f"timed out: no complete answer within request_timeout_s = {cfg.request_timeout_s:g} s"
    except Exception as exc:  # one bad request is a sample, not a crash of the run
        out.error = f"{type(exc).__name__}: {exc}"
    return out


@dataclass
class LoadResult:
    config: dict  # the LoadConfig as sent
    outcomes: list[RequestOutcome]  # measured requests only, in index order
    warmup: list[RequestOutcome]  # excluded from metrics, kept for debugging
    duration_s: float  # first send -> last completion (or the max_duration_s cut-off)
    truncated: bool  # max_duration_s cut the run short


async def run_load_async(cfg: LoadConfig, requests: list[RequestSpec], warmup: list[RequestSpec]) -> LoadResult:
    cfg.validate()
    limit = cfg.concurrency or max(1, len(requests))
    async with make_client(cfg.http_client, cfg.base_url, limit, cfg.request_timeout_s) as client:
        t_w = time.perf_counter()
        warm = [await send_one(client, cfg, r, -1, t_w) for r in warmup]
        sem = asyncio.Semaphore(limit)
        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        t0 = time.perf_counter()

        async def one(i: int, req: RequestSpec) -> RequestOutcome:
            delay = offsets[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                return await send_one(client, cfg, req, i, t0)

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
        done, pending = await asyncio.wait(tasks, timeout=cfg.max_duration_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    outcomes = []
    for i, t in enumerate(tasks):
        res = None if t.cancelled() else t.result()
        outcomes.append(
            res
            or RequestOutcome(
                i,
                offsets[i],
                requests[i].prompt_len,
                requests[i].max_tokens,
                error="cancelled: max_duration_s reached before it was sent",
            )
        )
    ends = [o.start + o.e2e for o in outcomes if o.ok and o.e2e is not None]
    if not pending and ends:
        duration = max(ends)
    return LoadResult(asdict(cfg), outcomes, warm, duration, bool(pending))


def run_load(cfg: LoadConfig, work: Workload) -> LoadResult:
    """Build the requests and run the load (blocking). Warm-up requests use the same workload, other seeds."""
    cfg.validate()
    reqs = build_requests(work, cfg.num_requests + cfg.warmup_requests)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_load_async(cfg, reqs[cfg.warmup_requests :], reqs[: cfg.warmup_requests]))


def _loop_factory():
    """uvloop's event loop where installed (the `serve` extra; its socket reads and polling cost the client about
    half of asyncio's per streamed chunk), else asyncio's. Env ANVIL_LOADGEN_LOOP=asyncio forces asyncio's."""
    if os.environ.get("ANVIL_LOADGEN_LOOP", "") != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            pass
    return None


def _stats(prefix: str, xs_s: list[float], out: dict[str, float]) -> None:
    ms = [x * 1000.0 for x in xs_s]
    out[f"{prefix}_mean_ms"] = sum(ms) / len(ms) if ms else math.nan
    for q in (50, 90, 99):
        out[f"{prefix}_p{q}_ms"] = percentile(ms, q)
    out[f"{prefix}_std_ms"] = stdev(ms)


def summarize(res: LoadResult, slo: dict[str, float] | None = None, slo_percentile: float = 99.0) -> dict[str, float]:
    """Flat metrics from the raw outcomes. `slo` keys: ttft_ms, tpot_ms, e2e_ms (each optional, milliseconds)."""
    slo = dict(slo or {})
    unknown = set(slo) - {"ttft_ms", "tpot_ms", "e2e_ms"}
    if unknown:
        raise LoadgenError(f"unknown SLO keys {sorted(unknown)}; known: ttft_ms, tpot_ms, e2e_ms")
    ok = [o for o in res.outcomes if o.ok]
    dur = max(res.duration_s, 1e-9)
    out_tok = sum(o.output_tokens for o in ok)
    in_tok = sum(o.prompt_len or 0 for o in ok)
    m: dict[str, float] = {
        "requests": float(len(res.outcomes)),
        "completed": float(len(ok)),
        "failed": float(len(res.outcomes) - len(ok)),
        "duration_s": res.duration_s,
        "request_throughput_req_s": len(ok) / dur,
        "output_tok_s": out_tok / dur,
        "total_tok_s": (out_tok + in_tok) / dur,
        "output_tokens": float(out_tok),
        "input_tokens": float(in_tok),
    }
    _stats("ttft", [o.ttft for o in ok if o.ttft is not None], m)
    _stats("tpot", [t for o in ok if (t := o.tpot) is not None], m)
    _stats("itl", [x for o in ok for x in o.itl], m)
    _stats("e2e", [o.e2e for o in ok if o.e2e is not None], m)
    if slo:
        good = 0
        for o in ok:
            checks = {"ttft_ms": o.ttft, "tpot_ms": o.tpot if o.tpot is not None else 0.0, "e2e_ms": o.e2e}
            if all(checks[k] is not None and checks[k] * 1000.0 <= v for k, v in slo.items()):
                good += 1
        m["good_requests"] = float(good)
        m["goodput_req_s"] = good / dur
        m["good_fraction"] = good / len(res.outcomes) if res.outcomes else 0.0
        agg = {k: percentile([x * 1000.0 for x in _series(ok, k)], slo_percentile) for k in slo}
        m["slo_pass"] = float(bool(ok) and len(ok) == len(res.outcomes) and all(agg[k] <= v for k, v in slo.items()))
    return m


def _series(ok: list[RequestOutcome], key: str) -> list[float]:
    if key == "ttft_ms":
        return [o.ttft for o in ok if o.ttft is not None]
    if key == "tpot_ms":
        return [t for o in ok if (t := o.tpot) is not None]
    return [o.e2e for o in ok if o.e2e is not None]


def samples(res: LoadResult) -> list[dict]:
    """Raw per-request samples for the record (seconds, as measured)."""
    return [asdict(o) | {"tpot": o.tpot} for o in res.outcomes]
