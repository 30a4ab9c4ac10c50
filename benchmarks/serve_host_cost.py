"""Where a streaming server's host time goes, per thread: `bench serve` in a subprocess on loopback, C concurrent
streaming clients (token-id prompts, EOS ignored) from this process, and the server's CPU seconds per thread from
/proc (Linux): the engine thread (named anvil-engine; threads it starts inherit the name, e.g. torch's CPU pool in a
CPU run, and are counted with it), the event loop (the main thread: HTTP, SSE, detokenizing)
and the rest (torch's CPU threads, uvicorn's helpers). With the server's /metrics: per streamed token the event
loop's CPU, per engine step the engine thread's CPU, its step time, the device wait inside it and the time between
steps. A GPU-bound server shows a device wait near the step time; a host-bound one a wait near zero or time between
steps. Writes one JSON.

  python benchmarks/serve_host_cost.py --out results/cpu/serve-host-cost-tiny.json [--model tiny]
      [--concurrency 1,32,64] [--prompt 16] [--max-tokens 64] [--device cpu] [--option KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from adapters.http_stream import StreamClient
from adapters.sse import SSEParser
from harness.scenarios.serving import launched_server

ROOT = Path(__file__).resolve().parents[1]


def thread_cpu(pid: int, counts: dict[str, int] | None = None) -> dict[str, float]:
    """CPU seconds (user + system, in clock ticks: 10 ms on most kernels) of the process's threads, summed by role:
    engine / loop (the main thread) / other; `counts` (if given) gets the number of threads of each role."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"engine": 0.0, "loop": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        role = "engine" if name == "anvil-engine" else "loop" if task.name == str(pid) else "other"
        out[role] += (int(f[11]) + int(f[12])) / tick
        if counts is not None:
            counts[role] = counts.get(role, 0) + 1
    return out


def metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10, trust_env=False).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))] = s.value
    return out


async def load(base: str, n: int, prompt: int, max_tokens: int, seed: int) -> tuple[int, float]:
    """n concurrent streaming completions (the load generator's lean client, adapters/http_stream.py); (SSE data
    chunks received, wall seconds)."""

    async def one(c: StreamClient, i: int) -> int:
        body = {"prompt": [3 + (seed + i * 7919 + j * 31) % 250 for j in range(prompt)], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
        chunks = 0
        async with c.post("/v1/completions", body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.read())[:300]!r}")
            parser = SSEParser()
            async for _, piece in r.pieces():
                chunks += sum(ev.data.startswith("{") for ev in parser.feed(piece))
        return chunks

    async with StreamClient(base, max_connections=n + 8) as c:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(c, i) for i in range(n)))
        return sum(got), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--concurrency", default="1,32,64")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="passed to bench serve")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args()
    if not Path("/proc/self/task").is_dir():
        ap.error("per-thread CPU times come from /proc: Linux only")
    levels = [int(x) for x in args.concurrency.split(",")]
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    top = max(levels)
    opts = [f"max_num_seqs={max(top, 4)}", *args.option]
    cmd = [sys.executable, "-m", "harness", "serve", args.model, "--host", "{host}", "--port", "{port}",
           "--device", args.device, "--dtype", dtype, "--log-level", "warning",
           *(x for o in opts for x in ("--option", o))]  # fmt: skip
    rows = []
    with launched_server(cmd, {}, timeout_s=args.start_timeout, with_process=True) as (base, proc):
        asyncio.run(load(base, 4, args.prompt, 4, seed=1))  # warm-up
        for i, c in enumerate(levels):
            m0, cpu0 = metrics(base), thread_cpu(proc.pid)
            chunks, wall = asyncio.run(load(base, c, args.prompt, args.max_tokens, seed=100 * (i + 1)))
            threads: dict[str, int] = {}
            m1, cpu1 = metrics(base), thread_cpu(proc.pid, threads)

            def d(name: str, m0=m0, m1=m1) -> float:
                return m1.get(name, 0.0) - m0.get(name, 0.0)

            toks = d("anvil:generation_tokens_total")
            steps = max(1.0, sum(d(k) for k in m1 if k.startswith("anvil:engine_steps_total{")))  # forwards, by path
            cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
            row = {"concurrency": c, "requests": c, "tokens": toks, "sse_chunks": chunks, "wall_s": wall,
                   "output_tok_s": toks / wall, "engine_steps": steps, "cpu_s": cpu, "threads": threads,
                   "loop_cpu_us_per_token": 1e6 * cpu["loop"] / max(toks, 1),
                   "engine_cpu_us_per_step": 1e6 * cpu["engine"] / steps,
                   "step_ms": 1e3 * d("anvil:engine_step_seconds_total") / steps,
                   "device_wait_ms_per_step": 1e3 * d("anvil:engine_device_wait_seconds_total") / steps,
                   "between_steps_ms": 1e3 * d("anvil:engine_between_steps_seconds_total") / steps}  # fmt: skip
            rows.append(row)
            print(f"c={c}: {toks:.0f} tokens in {wall:.2f} s ({row['output_tok_s']:.0f} tok/s), "
                  f"loop {row['loop_cpu_us_per_token']:.1f} us CPU/token, engine {row['engine_cpu_us_per_step']:.0f} "
                  f"us CPU/step, step {row['step_ms']:.2f} ms (device wait {row['device_wait_ms_per_step']:.2f}, "
                  f"between {row['between_steps_ms']:.2f})", flush=True)  # fmt: skip
    commit = os.environ.get("ANVIL_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                              capture_output=True, text=True).stdout.strip() or None
    from engine.server.app import server_io  # what the server process picked (the same environment)

    env = {"machine": platform.machine(), "cpu": platform.processor(), "cores": os.cpu_count(),
           "python": platform.python_version(), "commit": commit, "server_io": "/".join(server_io()),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    try:
        import torch

        env["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "model": args.model, "device": args.device, "dtype": dtype,
                                          "prompt": args.prompt, "max_tokens": args.max_tokens, "options": opts,
                                          "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
