"""OpenAI-HTTP adapter and the SSE parser, against an in-test streaming server with planted delays and failures."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import pytest

pytest.importorskip("httpx", reason="httpx not installed: pip install httpx")

from adapters.base import GenRequest, ModelSpec, Sampling  # noqa: E402
from adapters.openai_http import OpenAIHTTPAdapter, split_evenly, spread_times  # noqa: E402
from adapters.sse import SSEParser, parse_all  # noqa: E402

TTFT, GAP = 0.3, 0.1  # planted delays of the "slow" scenario


# -- SSE framing -------------------------------------------------------------------------------------------------------
def test_sse_framing_split_anywhere():
    body = ('data: {"a": 1}\r\n\r\n: keep-alive\n\nevent: error\ndata: line1\ndata:line2\nid: 7\n\n'
            'data: caf\u00e9\r\rdata: [DONE]\n\n').encode()
    want = parse_all(body)
    assert [e.data for e in want] == ['{"a": 1}', "line1\nline2", "caf\u00e9", "[DONE]"]
    assert want[1].event == "error" and want[1].id == "7" and want[3].done and want[0].json() == {"a": 1}
    for size in (1, 2, 3, 5, 7):  # byte-sized chunks split \r\n pairs and the two-byte UTF-8 character
        p = SSEParser()
        got = [e for i in range(0, len(body), size) for e in p.feed(body[i:i + size])] + p.close()
        assert got == want, size


def test_sse_unterminated_last_event_is_flushed():
    p = SSEParser()
    assert [e.data for e in p.feed(b"data: x\n\ndata: tail")] == ["x"]
    assert [e.data for e in p.close()] == ["tail"]


def test_time_spreading_convention():
    assert split_evenly(8, 3) == [3, 3, 2] and split_evenly(2, 3) == [1, 1, 0]
    # first chunk: all its tokens at its arrival; later chunks: spread over (previous arrival, arrival]
    assert spread_times([1.0, 2.0, 2.3], [2, 4, 1]) == [1.0, 1.0, 1.25, 1.5, 1.75, 2.0, 2.3]


# -- a fake server -----------------------------------------------------------------------------------------------------
def _chunk(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    payload = f"data: {data}\n\n".encode()
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _text(text, finish=None, **extra) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish, **extra}]}


class FakeServer:
    """Streams a scenario picked by the request's "model": slow, ids, usage, chat, fail500, drop, hang, error_event."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tasks: set[asyncio.Task] = set()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        def stop():
            self._server.close()
            for t in self._tasks:
                t.cancel()
            self._loop.call_later(0.05, self._loop.stop)

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(5)
        assert not self._thread.is_alive()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
            body = json.loads(await reader.readexactly(length))
            self.bodies.append(body)
            await self._scenario(body["model"], body, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())

    async def _scenario(self, name, body, writer) -> None:
        if name == "fail500":
            msg = b'{"error": "boom"}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg))
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")

        async def send(obj, delay=0.0):
            if delay:
                await asyncio.sleep(delay)
            writer.write(_chunk(obj))
            await writer.drain()

        if name == "slow":
            n = body["max_tokens"]
            for i in range(n):
                await send(_text(f" t{i}", "length" if i == n - 1 else None), TTFT if i == 0 else GAP)
            await send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        elif name == "ids":  # three tokens per chunk, with their ids
            for c in range(3):
                ids = [10 * c + j for j in range(3)]
                await send(_text("abc", "length" if c == 2 else None, token_ids=ids), 0.1 if c == 0 else 0.2)
        elif name == "usage":  # text-only chunks; only the final usage tells there were 2 tokens per chunk
            for c in range(4):
                await send(_text(f"ab{c}", "length" if c == 3 else None), 0.05)
            await send({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 8}})
        elif name == "chat":
            await send({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}, 0.05)
            for i, w in enumerate(["Hel", "lo", "!"]):
                await send({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": "stop" if i == 2 else None}]}, 0.02)
        elif name == "drop":  # two tokens, then the connection dies mid-body
            await send(_text(" a"), 0.05)
            await send(_text(" b"), 0.05)
            writer.transport.abort()
            return
        elif name == "hang":
            await send(_text(" a"), 0.05)
            await asyncio.sleep(30)
        elif name == "error_event":
            await send(_text(" a"), 0.02)
            await send({"error": {"message": "CUDA out of memory", "code": 500}}, 0.02)
        await send("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture(scope="module")
def server():
    with FakeServer() as srv:
        yield srv


def _adapter(server, model, **opts) -> OpenAIHTTPAdapter:
    ad = OpenAIHTTPAdapter()
    ad.load(ModelSpec(model, None), {"base_url": server.url + "/v1", "timeout": 5.0, **opts})
    return ad


def test_ttft_and_itl_match_planted_delays(server):
    ad = _adapter(server, "slow")
    (res,) = ad.generate([GenRequest([1, 2, 3], 6)])
    assert res.finish_reason == "length", res.error
    assert len(res.output_ids) == len(res.token_times) == 6 and res.output_ids == [-1] * 6  # text-only server
    assert res.text == "".join(f" t{i}" for i in range(6)) and res.prompt_tokens == 3
    assert TTFT - 0.01 <= res.ttft <= TTFT + 0.25
    assert all(GAP * 0.5 <= d <= GAP + 0.15 for d in res.itl), res.itl
    assert abs(statistics.mean(res.itl) - GAP) < 0.04, res.itl
    body = server.bodies[-1]
    assert body["prompt"] == [1, 2, 3] and body["stream"] and body["max_tokens"] == 6 and body["temperature"] == 0.0
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}


def test_concurrent_requests_overlap(server):
    ad = _adapter(server, "slow")
    t0 = time.perf_counter()
    res = ad.generate([GenRequest([1], 4) for _ in range(4)])
    assert time.perf_counter() - t0 < 2.0  # one request takes ~0.6 s; serially it would be ~2.4 s
    assert all(r.finish_reason == "length" and len(r.output_ids) == 4 for r in res)
    ad.opts["max_concurrency"] = 1
    t0 = time.perf_counter()
    ad.generate([GenRequest([1], 2) for _ in range(3)])
    assert time.perf_counter() - t0 >= 3 * (TTFT + GAP) - 0.05


def test_chunks_carrying_several_tokens(server):
    (res,) = _adapter(server, "ids").generate([GenRequest([1], 9)])
    assert res.output_ids == [0, 1, 2, 10, 11, 12, 20, 21, 22] and res.finish_reason == "length"
    t = res.token_times
    assert t[0] == t[1] == t[2]  # first chunk: all at its arrival
    within = [t[4] - t[3], t[5] - t[4]]
    assert all(abs(d - within[0]) < 1e-9 for d in within) and 0.04 < within[0] < 0.15  # 0.2 s split over 3 tokens


def test_final_usage_splits_tokens_over_chunks(server):
    (res,) = _adapter(server, "usage").generate([GenRequest([1, 2], 8)])
    assert len(res.token_times) == 8 and res.finish_reason == "length" and res.text == "ab0ab1ab2ab3"
    assert res.token_times == sorted(res.token_times) and res.prompt_tokens == 2


def test_chat_text_prompt(server):
    ad = _adapter(server, "chat", endpoint="chat")
    (res,) = ad.generate([GenRequest([1], 3, prompt_text="hi", sampling=Sampling(0.5, 20, 0.9, 11))])
    assert res.text == "Hello!" and len(res.output_ids) == 3 and res.finish_reason == "stop"
    body = server.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "hi"}] and (body["top_k"], body["seed"]) == (20, 11)
    (res,) = ad.generate([GenRequest([1], 3)])  # chat without text cannot be sent: a failed request, not a crash
    assert res.finish_reason == "error" and "prompt_text" in res.error


@pytest.mark.parametrize(("model", "expect", "n_tokens"), [
    ("fail500", "HTTP 500", 0), ("drop", "", 2), ("hang", "timeout", 1), ("error_event", "CUDA out of memory", 1)])
def test_failures_are_recorded_per_request(server, model, expect, n_tokens):
    ad = _adapter(server, model, timeout=1.0)
    good = _adapter(server, "slow")
    t0 = time.perf_counter()
    res, ok = ad.generate([GenRequest([1], 4)])[0], good.generate([GenRequest([1], 2)])[0]
    assert time.perf_counter() - t0 < 10
    assert res.finish_reason == "error" and expect in res.error and len(res.token_times) == n_tokens, res
    assert ok.finish_reason == "length"


def test_connection_refused_and_stream(server):
    ad = OpenAIHTTPAdapter()
    ad.load(ModelSpec("x", None), {"base_url": "http://127.0.0.1:9", "timeout": 2.0})
    (res,) = ad.generate([GenRequest([1], 2)])
    assert res.finish_reason == "error" and res.error
    toks = list(_adapter(server, "slow").stream(GenRequest([1], 3)))
    assert len(toks) == 3 and [t for _, t in toks] == sorted(t for _, t in toks)
    with pytest.raises(RuntimeError, match="HTTP 500"):
        list(_adapter(server, "fail500").stream(GenRequest([1], 3)))
    with pytest.raises(ValueError, match="base_url"):
        OpenAIHTTPAdapter().load(ModelSpec("x", None), {})
