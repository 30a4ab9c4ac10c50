"""What the load generator itself costs and adds to what it measures: the harness's client against a paced fake
engine (a raw asyncio server in a subprocess that, every `--step-ms`, writes one OpenAI-style SSE chunk to each open
stream: a decode step of C sequences), for each HTTP client (anvil's adapters/http_stream.py, httpx) and event loop
(uvloop, asyncio). Per run: the client's CPU µs per streamed chunk (getrusage of this process), the stream rate, and
TPOT p50 / ITL p99 as measured beside the server's own mean step period over the same run (the truth the client
should report). Writes one JSON.

  python benchmarks/loadgen_cost.py --out results/cpu/loadgen-cost/cost.json [--concurrency 32,64]
      [--step-ms 5.59,6.36] [--output-len 256] [--requests-per-stream 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = ('data: {"id":"cmpl-0123456789abcdef","object":"text_completion","created":1796229684,"model":"m",'
         '"choices":[{"index":0,"text":" word","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n')  # fmt: skip


def serve(port_out, step_s: float, ticks, tick_time) -> None:
    """The paced fake engine (subprocess): one chunk per open stream per step; a final usage chunk and [DONE]."""
    frame = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK.encode())
    streams: dict[object, list] = {}

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            now = time.perf_counter()
            if streams:
                with ticks.get_lock():
                    ticks.value += 1
                    tick_time.value += now - last
            last = now
            for w, st in list(streams.items()):
                w.write(frame)
                st[0] -= 1
                if st[0] <= 0:
                    end = (b'data: {"choices":[],"usage":{"prompt_tokens":16,"completion_tokens":%d}}\n\n'
                           b"data: [DONE]\n\n") % st[1]  # fmt: skip
                    w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
                    del streams[w]
                    st[2].set()
            await asyncio.sleep(max(0.0, step_s - (time.perf_counter() - now)))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
                body = json.loads(await r.readexactly(n))
                w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                done = asyncio.Event()
                streams[w] = [int(body["max_tokens"]), int(body["max_tokens"]), done]
                await done.wait()
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            streams.pop(w, None)
            w.close()

    async def main() -> None:
        asyncio.ensure_future(ticker())
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.put(srv.sockets[0].getsockname()[1])
        async with srv:
            await srv.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def one_run(base: str, client: str, loop: str, c: int, n: int, out_len: int) -> dict:
    from harness.loadgen import LengthDist, LoadConfig, Workload, run_load, summarize

    os.environ["ANVIL_LOADGEN_LOOP"] = loop
    cfg = LoadConfig(base_url=base, concurrency=c, num_requests=n, warmup_requests=0, http_client=client)
    work = Workload(prompt_len=LengthDist("fixed", 16), output_len=LengthDist("fixed", out_len))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    res = run_load(cfg, work)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    s = summarize(res)
    chunks = sum(o.output_tokens for o in res.outcomes if o.ok)
    return {"client": client, "loop": loop, "concurrency": c, "requests": n, "chunks": chunks, "wall_s": wall,
            "chunks_per_s": chunks / wall, "client_cpu_s": cpu, "client_cpu_frac": cpu / wall,
            "client_cpu_us_per_chunk": 1e6 * cpu / max(1, chunks), "failed": sum(not o.ok for o in res.outcomes),
            "tpot_p50_ms": s.get("tpot_p50_ms"), "itl_p50_ms": s.get("itl_p50_ms"), "itl_p99_ms": s.get("itl_p99_ms")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", default="32,64")
    ap.add_argument("--step-ms", default="5.59,6.36", help="the fake engine's step (H200 anvil TPOT at c=32 / c=64)")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--requests-per-stream", type=int, default=2, help="requests = this x concurrency")
    ap.add_argument("--clients", default="anvil,httpx")
    ap.add_argument("--loops", default="uvloop,asyncio")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    steps = [float(x) for x in args.step_ms.split(",")]
    if len(steps) not in (1, len(levels)):
        ap.error("--step-ms: one value, or one per --concurrency value")
    steps = steps * len(levels) if len(steps) == 1 else steps
    rows = []
    for c, step in zip(levels, steps, strict=True):
        ctx = mp.get_context("spawn")
        q, ticks, tick_time = ctx.Queue(), ctx.Value("l", 0), ctx.Value("d", 0.0)
        proc = ctx.Process(target=serve, args=(q, step / 1e3, ticks, tick_time), daemon=True)
        proc.start()
        base = f"http://127.0.0.1:{q.get(timeout=60)}"
        try:
            one_run(base, "anvil", "asyncio", min(c, 4), 4, 8)  # warm-up
            combos = list(itertools.product(args.clients.split(","), args.loops.split(",")))
            for _rep, (client, loop) in itertools.product(range(args.repeats), combos):
                k0, s0 = ticks.value, tick_time.value
                row = one_run(base, client, loop, c, c * args.requests_per_stream, args.output_len)
                row["server_step_ms"] = 1e3 * (tick_time.value - s0) / max(1, ticks.value - k0)
                row["target_step_ms"] = step
                rows.append(row)
                print(f"c={c} {client:5s} {loop:7s}: {row['client_cpu_us_per_chunk']:6.1f} us CPU/chunk "
                      f"({100 * row['client_cpu_frac']:.0f}% of a core), {row['chunks_per_s']:,.0f} chunks/s, "
                      f"TPOT p50 {row['tpot_p50_ms']:.3f} ms vs server step {row['server_step_ms']:.3f} ms, "
                      f"ITL p99 {row['itl_p99_ms']:.2f} ms, failed {row['failed']}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.join(10)
    commit = os.environ.get("ANVIL_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                              capture_output=True, text=True).stdout.strip() or None
    env = {"machine": platform.machine(), "cpu": platform.processor(), "cores": os.cpu_count(),
           "python": platform.python_version(), "commit": commit,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "bench": "loadgen_cost", "output_len": args.output_len,
                                          "unit": "client_cpu_us_per_chunk: µs of this process's CPU per SSE chunk",
                                          "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
