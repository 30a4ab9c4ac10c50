"""The load generator's HTTP/1.1 client (adapters/http_stream.py) against raw servers that frame answers every legal
way (chunked in pieces split anywhere, Content-Length, close-delimited), reuse and close connections, and break the
framing."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from adapters.http_stream import HTTPStreamError, StreamClient, make_client


def _chunked(parts: list[bytes], ext: bool = False, trailer: bool = False) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if ext else b"", p) for p in parts)
    return out + b"0\r\n" + (b"X-Trailer: 1\r\n" if trailer else b"") + b"\r\n"


class RawServer:
    """Answers each request with `answer(n, request_body)` (bytes), written in `splits` pieces with a short pause
    between them; `close_after` closes the connection after that many answers."""

    def __init__(self, answer, splits: int = 1, close_after: int = 0, seed: int = 0) -> None:
        self.answer, self.splits, self.close_after = answer, splits, close_after
        self.rng = random.Random(seed)
        self.requests: list[dict] = []
        self.connections = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                hdrs = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                body = json.loads(await r.readexactly(int(hdrs["content-length"])))
                self.requests.append({"line": lines[0], "headers": hdrs, "body": body})
                data = self.answer(len(self.requests), body)
                cuts = sorted(self.rng.sample(range(1, len(data)), min(self.splits - 1, len(data) - 1)))
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    w.write(data[a:b])
                    await w.drain()
                    await asyncio.sleep(0.001)
                served += 1
                if self.close_after and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def _get(url: str, obj: dict, **kw) -> tuple[int, dict, list[bytes]]:
    async with StreamClient(url, **kw) as c, c.post("/v1/completions", obj) as resp:
        return resp.status_code, resp.headers, [b async for _, b in resp.pieces()]


SSE = [b'data: {"choices": [{"text": " a"}]}\n\n', b'data: {"choices": [{"text": " b\xc3\xa9"}]}\n\n', b"data: [DONE]\n\n"]


@pytest.mark.parametrize("splits", [1, 3, 17, 400])
@pytest.mark.parametrize("ext,trailer", [(False, False), (True, True)])
def test_chunked_body_split_anywhere_comes_out_whole(splits, ext, trailer):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def main():
        async with RawServer(lambda n, b: head + _chunked(SSE, ext, trailer), splits=splits, seed=splits) as s:
            status, hdrs, pieces = await _get(s.url, {"max_tokens": 2})
            assert s.requests[0]["body"] == {"max_tokens": 2}
            assert s.requests[0]["line"] == "POST /v1/completions HTTP/1.1"
            assert s.requests[0]["headers"]["content-type"] == "application/json"
            return status, hdrs, pieces

    status, hdrs, pieces = asyncio.run(main())
    assert status == 200 and hdrs["content-type"] == "text/event-stream"
    assert b"".join(pieces) == b"".join(SSE)


def test_content_length_and_close_delimited_bodies():
    body = b'{"error": {"message": "no"}}'

    async def main():
        async with RawServer(lambda n, b: b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                             splits=5) as s:  # fmt: skip
            async with StreamClient(s.url) as c:
                async with c.post("/x", {}) as r:
                    got = (r.status_code, await r.read())
                async with c.post("/x", {}) as r:  # the same connection, reused
                    got2 = (r.status_code, await r.read())
            assert s.connections == 1
        async with RawServer(lambda n, b: b"HTTP/1.1 200 OK\r\n\r\n" + b"".join(SSE), close_after=1, splits=4) as s:
            got3 = await _get(s.url, {})
        return got, got2, got3

    got, got2, got3 = asyncio.run(main())
    assert got == got2 == (400, body)
    assert got3[0] == 200 and b"".join(got3[2]) == b"".join(SSE)


def test_pieces_carry_their_arrival_times_in_order():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def main():
        async with RawServer(lambda n, b: head + _chunked(SSE), splits=6) as s:
            async with StreamClient(s.url) as c, c.post("/", {}) as r:
                return [t async for t, _ in r.pieces()]

    times = asyncio.run(main())
    assert len(times) >= 2 and times == sorted(times)
    assert times[-1] - times[0] >= 0.001  # the server paused between writes; stamps are when bytes came


@pytest.mark.parametrize("pause", [0.0, 0.05])  # 0: the request may go out before the close is seen (retried)
def test_a_connection_the_server_closed_while_idle_is_replaced(pause):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main():
        async with RawServer(lambda n, b: ok, close_after=1) as s, StreamClient(s.url) as c:
            out = []
            for _ in range(3):
                async with c.post("/", {"i": len(out)}) as r:
                    out.append(await r.read())
                await asyncio.sleep(pause)
            return out, s.connections, [q["body"]["i"] for q in s.requests]

    out, conns, seen = asyncio.run(main())
    assert out == [b"ok"] * 3 and conns == 3 and seen == [0, 1, 2]


@pytest.mark.parametrize(
    "answer,message",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", "not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "closed by the server mid-answer"),
        (b"SPDY/9 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    ],
)
def test_broken_framing_is_an_error_naming_it(answer, message):
    async def main():
        async with RawServer(lambda n, b: answer, close_after=1) as s:
            await _get(s.url, {})

    with pytest.raises(HTTPStreamError, match=message):
        asyncio.run(main())


def test_refused_connection_and_bad_url_and_client_kind():
    async def main(url):
        await _get(url, {})

    with pytest.raises(OSError):
        asyncio.run(main("http://127.0.0.1:9"))  # discard port: nothing listens in the test machines
    with pytest.raises(ValueError, match="http"):
        StreamClient("ftp://127.0.0.1:1")
    with pytest.raises(ValueError, match="http_client must be one of anvil, httpx"):
        make_client("curl", "http://127.0.0.1:1", 1, 1.0)


@pytest.mark.parametrize("kind", ["anvil", "httpx"])
def test_both_clients_give_the_loadgen_the_same_outcomes(kind):
    pytest.importorskip("httpx")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "harness"))
    from fake_openai import FakeOpenAIServer

    from harness.loadgen import LengthDist, LoadConfig, Workload, run_load

    with FakeOpenAIServer(ttft=0.02, tpot=0.005, fail_every=5) as srv:
        cfg = LoadConfig(base_url=srv.base_url, num_requests=10, warmup_requests=1, concurrency=4, http_client=kind)
        res = run_load(cfg, Workload(prompt_len=LengthDist("fixed", 8), output_len=LengthDist("fixed", 6)))
    ok = [o for o in res.outcomes if o.ok]
    bad = [o for o in res.outcomes if not o.ok]
    assert len(ok) == 8 and all(o.output_tokens == 6 and len(o.itl) == 5 for o in ok)
    assert all(o.ttft >= 0.02 and min(o.itl) >= 0.004 for o in ok)
    assert [o.error for o in bad] == ['HTTP 500: {"error": "planted failure"}'] * 2
