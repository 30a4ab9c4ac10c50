"""GET /metrics: Prometheus text from the server's own registry (one per app, so tests may build several).

Gauges and the engine's counters are read from AsyncLLM's per-step snapshot at scrape time (running / waiting
requests, KV-cache usage, preemptions, prefix-cache hits); latency histograms are observed as tokens reach the
server: TTFT = first token - submit, inter-token = gaps between a request's tokens, end-to-end = last token - submit.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.async_llm import AsyncLLM, StreamOutput

PREFIX = "anvil:"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)  # fmt: skip
_ITL = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Reads the engine snapshot at scrape time."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self):
        s = self.llm.snapshot
        pc = s.get("prefix_cache", {})
        yield _gauge("num_requests_running", "requests in the running batch", s.get("running", 0))
        yield _gauge("num_requests_waiting", "requests waiting for a seat or for KV blocks", self.llm.num_waiting())
        yield _gauge("kv_cache_usage_perc", "share of KV blocks in use (idle cached blocks count as free), 0..1",
                     s.get("kv_usage", 0.0))  # fmt: skip
        yield _gauge("prefix_cache_hit_rate", "prefix cache: hit prompt tokens / prompt tokens, since start",
                     pc.get("hit_rate", 0.0))  # fmt: skip
        yield _gauge("prefix_cache_blocks", "KV blocks named by the prefix cache (sessions; every request with APC)",
                     pc.get("cached_blocks", 0))  # fmt: skip
        yield _counter("num_preemptions", "requests preempted (KV freed, recomputed later)", s.get("preemptions", 0))
        yield _counter("prefix_cache_queries", "prompt tokens of admitted requests (looked up in the prefix cache)",
                       pc.get("query_tokens", 0))  # fmt: skip
        yield _counter("prefix_cache_hits", "prompt tokens found in the prefix cache", pc.get("hit_tokens", 0))
        yield _counter("prefix_cache_evictions", "idle cached blocks evicted", pc.get("evictions", 0))
        tm, core = self.llm.timing, self.llm.core.stats
        yield _counter("engine_step_seconds", "seconds the engine thread spent in step() (device waits included)",
                       tm["step_s"])  # fmt: skip
        yield _counter("engine_device_wait_seconds", "of engine_step_seconds, blocked on the device for a step's "
                       "tokens (near the step time: the GPU is the bound; near 0: the host is)",
                       core.get("device_wait_s", 0.0))  # fmt: skip
        yield _counter("engine_between_steps_seconds", "engine-thread seconds between consecutive steps with requests "
                       "in flight (commands, hand-off to the event loop, waiting for the GIL)", tm["between_steps_s"])  # fmt: skip
        steps = CounterMetricFamily(PREFIX + "engine_steps", "forwards by path: graph (a decode step's CUDA graph), "
                                    "graph_mixed (a mixed step's tokens as rows of one), eager", labels=["path"])  # fmt: skip
        for path, n in dict(getattr(self.llm.core.runner, "steps", {})).items():
            steps.add_metric([path], float(n))
        yield steps


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=float(value))


class Metrics:
    def __init__(self, llm: AsyncLLM) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_EngineCollector(llm))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "submit -> first token", buckets=_LATENCY,
                              registry=r)  # fmt: skip
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "gap between a request's tokens", buckets=_ITL,
                             registry=r)  # fmt: skip
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "submit -> last token", buckets=_LATENCY,
                             registry=r)  # fmt: skip
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=r)
        self.requests = Counter(PREFIX + "request_success", "finished requests", ["finished_reason"], registry=r)
        self.rejected = Counter(PREFIX + "request_rejected", "requests refused", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival: float, num_prompt_tokens: int) -> RequestTimer:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTimer(self, arrival)


class RequestTimer:
    """One request's latencies, observed as its outputs arrive."""

    def __init__(self, m: Metrics, arrival: float) -> None:
        self.m, self.arrival, self.last, self.finished = m, arrival, None, False

    def observe(self, out: StreamOutput) -> None:
        for t in out.token_times:
            if self.last is None:
                self.m.ttft.observe(max(0.0, t - self.arrival))
            else:
                self.m.itl.observe(max(0.0, t - self.last))
            self.last = t
        if out.token_ids:
            self.m.generation_tokens.inc(len(out.token_ids))
        if out.finished:
            self.done(out.finish_reason or "unknown")

    def done(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.m.requests.labels(reason).inc()
        end = self.last if self.last is not None else time.perf_counter()
        self.m.e2e.observe(max(0.0, end - self.arrival))
