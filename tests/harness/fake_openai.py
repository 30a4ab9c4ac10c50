"""A fake streaming OpenAI-compatible server on 127.0.0.1 with planted delays, for load-generator tests."""

from __future__ import annotations

import asyncio
import json
import threading


class FakeOpenAIServer:
    """Streams `max_tokens` tokens per request: first after `ttft` s, then one every `tpot` s.
    Every `slow_every`-th request (1-based) waits `slow_ttft` instead; every `fail_every`-th answers HTTP 500."""

    def __init__(
        self,
        ttft: float = 0.05,
        tpot: float = 0.01,
        slow_every: int = 0,
        slow_ttft: float = 0.3,
        fail_every: int = 0,
        usage: bool = True,
        port: int = 0,
        prefix_metrics: bool = False,
    ):
        self.ttft, self.tpot, self.slow_every, self.slow_ttft = ttft, tpot, slow_every, slow_ttft
        self.fail_every, self.usage, self.prefix_metrics = fail_every, usage, prefix_metrics
        self.requests = 0  # every request seen, warm-up included
        self.bodies: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: serve requests until the client closes
                head = await reader.readuntil(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
                length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
                body = json.loads(await reader.readexactly(length)) if length else {}
                if head.startswith(b"GET /metrics") and self.prefix_metrics:  # vLLM's counters: 100 / 40 a request
                    n = self.requests
                    msg = (f'vllm:prefix_cache_queries_total{{engine="0",model_name="fake"}} {100.0 * n}\n'
                           f'vllm:prefix_cache_hits_total{{engine="0",model_name="fake"}} {40.0 * n}\n').encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
                    await writer.drain()
                    continue
                if head.startswith(b"GET"):  # /v1/models: the readiness probe
                    msg = b'{"object": "list", "data": [{"id": "fake"}]}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
                    await writer.drain()
                    continue
                await self._respond(body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(self, body: dict, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        n = self.requests
        self.bodies.append(body)
        if self.fail_every and n % self.fail_every == 0:
            msg = b'{"error": "planted failure"}'
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg)
            )
            await writer.drain()
            return
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            chat = "messages" in body
            slow = self.slow_every and n % self.slow_every == 0
            await asyncio.sleep(self.slow_ttft if slow else self.ttft)
            ntok = int(body.get("max_tokens", 16))
            for i in range(ntok):
                if i:
                    await asyncio.sleep(self.tpot)
                choice = {"index": 0, "finish_reason": None}
                choice |= {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                await self._event(writer, {"choices": [choice]})
            end = {"index": 0, "finish_reason": "length"} | ({"delta": {}} if chat else {"text": ""})
            await self._event(writer, {"choices": [end]})
            if self.usage:
                plen = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 7
                await self._event(writer, {"choices": [], "usage": {"prompt_tokens": plen, "completion_tokens": ntok}})
            await self._chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.inflight -= 1

    async def _event(self, writer: asyncio.StreamWriter, obj: dict) -> None:
        await self._chunk(writer, b"data: " + json.dumps(obj).encode() + b"\n\n")

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()


if __name__ == "__main__":  # a stand-alone server for launch tests: python fake_openai.py PORT
    import sys
    import time

    with FakeOpenAIServer(port=int(sys.argv[1])):
        time.sleep(600)
