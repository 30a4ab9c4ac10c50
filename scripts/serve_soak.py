"""Usage: python scripts/serve_soak.py [--model tiny] [--minutes 3] [--rate 1.5] [--out results/cpu/serve-soak-tiny.json]

A bounded soak of `bench serve` on loopback: Poisson arrivals for N minutes of mixed requests (token-id and text
prompts of 16-384 tokens, 4-96 output tokens, streaming and not, completions and chat, two-turn sessions, and a
share of clients that hang up mid-stream on purpose), then checks that the server is idle again (no running request,
KV usage 0) and shuts it down with SIGTERM. Writes JSON: requests sent / ok / failed (with the first reasons),
deliberate disconnects, the server's RSS at start, end and peak, latency percentiles, final /metrics values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10, trust_env=False).text):
        for s in fam.samples:
            out[s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")] = s.value
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Soak:
    def __init__(self, base: str, vocab: int, seed: int) -> None:
        self.base, self.vocab, self.rng = base, vocab, random.Random(seed)
        self.ok = self.failed = self.hung_up = 0
        self.kinds: dict[str, int] = {}
        self.failures: list[str] = []
        self.ttft: list[float] = []
        self.e2e: list[float] = []
        self.output_tokens = 0

    def body(self) -> tuple[str, str, dict, bool]:
        """(kind, path, body, hang up mid-stream)."""
        r = self.rng
        plen, olen = r.randint(16, 384), r.randint(4, 96)
        stream = r.random() < 0.7
        kind = r.choices(["ids", "text", "chat", "session"], [0.45, 0.2, 0.2, 0.15])[0]
        common = {"max_tokens": olen, "temperature": r.choice([0.0, 0.7]), "seed": r.randint(0, 9999), "stream": stream}
        if stream:
            common["stream_options"] = {"include_usage": True}
        hang = stream and r.random() < 0.08
        if kind == "chat":
            words = " ".join(r.choice(["def", "return", "self", "import", "class", "value"]) for _ in range(plen // 2))
            return kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], **common}, hang
        if kind == "text":
            words = " ".join(r.choice(["for", "in", "range", "print", "if", "else", "x", "y"]) for _ in range(plen // 2))
            return kind, "/v1/completions", {"prompt": words, **common}, hang
        ids = [r.randrange(3, self.vocab) for _ in range(plen)]
        body = {"prompt": ids, **common}
        if kind == "session":
            body["user"] = f"soak-{r.randrange(1 << 30)}"
        return kind, "/v1/completions", body, hang

    async def one(self, c: httpx.AsyncClient) -> None:
        kind, path, body, hang = self.body()
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        turns = 2 if kind == "session" else 1
        try:
            for turn in range(turns):
                t0 = time.perf_counter()
                if body["stream"]:
                    first, text, n, done = None, "", 0, False
                    async with c.stream("POST", path, json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(f"stream error: {chunk['error']}")
                            if chunk.get("choices"):
                                first = first or time.perf_counter()
                                ch = chunk["choices"][0]
                                text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                            if chunk.get("usage"):
                                n = chunk["usage"]["completion_tokens"]
                            if hang and first is not None:
                                self.hung_up += 1
                                return  # leaves the stream: the server must abort it and free its blocks
                    if not done:
                        raise RuntimeError("stream ended without [DONE]")
                    self.ttft.append((first or time.perf_counter()) - t0)
                else:
                    r = await c.post(path, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    out = r.json()
                    n = out["usage"]["completion_tokens"]
                    text = out["choices"][0].get("text") or out["choices"][0]["message"]["content"]
                self.e2e.append(time.perf_counter() - t0)
                self.output_tokens += n
                if n < 1:
                    raise RuntimeError("no tokens")
                if turn + 1 < turns:  # the session's next turn: the history plus a few new ids
                    body = {**body, "prompt": body["prompt"] + [self.rng.randrange(3, self.vocab) for _ in range(12)]}
            self.ok += 1
        except Exception as e:
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append(f"{kind}: {type(e).__name__}: {e}"[:300])

    async def run(self, minutes: float, rate: float) -> int:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base, timeout=300, trust_env=False, limits=limits) as c:
            tasks, end = [], time.monotonic() + minutes * 60
            while time.monotonic() < end:
                tasks.append(asyncio.create_task(self.one(c)))
                await asyncio.sleep(self.rng.expovariate(rate))
            await asyncio.gather(*tasks)
            return len(tasks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=1.5, help="Poisson arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", action="append", default=["max_model_len=1024", "max_num_seqs=32"])
    ap.add_argument("--out", default=str(REPO / "results" / "cpu" / "serve-soak-tiny.json"))
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "harness", "serve", args.model, "--port", str(port), "--log-level", "warning"]
    for o in args.option:
        cmd += ["--option", o]
    log = open(Path(tempfile.gettempdir()) / f"serve-soak-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}: see {log.name}")
            try:
                if httpx.get(base + "/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.3)
        info = httpx.get(base + "/v1/models", trust_env=False).json()["data"][0]
        kv_mb = None
        vocab = 4096 if args.model == "tiny" else 32000
        rss_start = rss_mb(proc.pid)
        peak = [rss_start]

        async def sample_rss(stop: asyncio.Event) -> None:
            while not stop.is_set():
                peak.append(rss_mb(proc.pid))
                await asyncio.sleep(10)

        soak = Soak(base, vocab, args.seed)

        async def go() -> int:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(stop))
            n = await soak.run(args.minutes, args.rate)
            stop.set()
            await sampler
            return n

        t0 = time.time()
        sent = asyncio.run(go())
        wall = time.time() - t0
        idle_deadline = time.monotonic() + 30
        while True:  # hung-up streams are aborted at once: the engine must come back to idle
            m = metrics(base)
            if m["anvil:num_requests_running"] == 0 and m["anvil:kv_cache_usage_perc"] == 0:
                break
            if time.monotonic() > idle_deadline:
                break
            time.sleep(0.2)
        rss_end = rss_mb(proc.pid)
        log.flush()
        banner = Path(log.name).read_text()  # "anvil serving ... (max_model_len N, B KV blocks)"
        found = re.search(r"(\d+)\s+KV\s+blocks", banner)
        blocks = int(found.group(1)) if found else None
        if blocks and args.model == "tiny":  # 5 layers x K and V x 2 KV heads x 16 slots x 64 dims x 4 bytes
            kv_mb = round((blocks + 1) * 5 * 2 * 2 * 16 * 64 * 4 / 2**20, 1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    ms = lambda xs, q: None if pct(xs, q) is None else round(pct(xs, q) * 1000, 1)  # noqa: E731
    result = {
        "what": "bench serve soak on loopback (scripts/serve_soak.py)",
        "model": args.model, "options": args.option, "max_model_len": info.get("max_model_len"),
        "minutes": args.minutes, "rate_req_s": args.rate, "seed": args.seed, "wall_s": round(wall, 1),
        "requests_sent": sent, "requests_ok": soak.ok, "requests_failed": soak.failed,
        "deliberate_disconnects": soak.hung_up, "kinds": soak.kinds, "failures": soak.failures,
        "output_tokens": soak.output_tokens,
        "ttft_ms": {"p50": ms(soak.ttft, 50), "p99": ms(soak.ttft, 99)},
        "e2e_ms": {"p50": ms(soak.e2e, 50), "p99": ms(soak.e2e, 99)},
        "server_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1), "peak": round(max(peak), 1),
                          "every_10_s": [round(x) for x in peak]},
        # the KV pool is torch.empty: its pages count in RSS only once a block is first written, and blocks are
        # handed out round-robin, so RSS climbs by up to the pool's size while the soak reaches every block
        "kv_pool_mb": kv_mb, "server_log": log.name,
        "after_soak": {k: m.get(k) for k in ("anvil:num_requests_running", "anvil:num_requests_waiting",
                                             "anvil:kv_cache_usage_perc", "anvil:num_preemptions_total",
                                             "anvil:prefix_cache_hit_rate", "anvil:generation_tokens_total")},
        "server_exit_code_after_sigterm": code,
        "env": {"commit": commit.strip(), "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests_sent", "requests_ok", "requests_failed",
                                             "deliberate_disconnects", "server_rss_mb", "after_soak")}, indent=1))  # fmt: skip
    return 1 if soak.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
