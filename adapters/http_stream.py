"""A lean HTTP/1.1 client for the load generator: POST a JSON body, read the streamed answer as it arrives.

Why not httpx: at a GPU server's streaming rate (~10k SSE chunks/s at 64 concurrent streams) httpx's stack
(httpcore, h11, anyio) costs the client 54-68 µs of CPU per chunk on a 2-core CPU, half a core or more, against
18-21 µs here; past one core's worth of chunks the client falls behind and what it spends shows up in the TPOT and
ITL it reports (benchmarks/loadgen_cost.py, results/cpu/loadgen-cost/). This client is an asyncio Protocol: the body is de-framed (chunked, Content-Length or
close-delimited) in `data_received`, and each piece is stamped with its arrival time there, before any task runs.

Scope: what a benchmark client needs and nothing more — http and https (stdlib ssl), keep-alive connections reused
up to `max_connections`, a request retried once on a fresh connection when a reused one turns out closed before any
byte of the answer, no redirects, no proxies (benchmark traffic goes where it is sent), no compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 << 10


class HTTPStreamError(ConnectionError):
    """The server broke the HTTP/1.1 framing or closed the connection mid-answer."""


class _Proto(asyncio.Protocol):
    """One connection; one request in flight at a time. Body pieces are queued as (arrival time, bytes)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.request_method = b"POST"
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.head_done: asyncio.Future | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.mode = ""  # chunked | length | close | none
        self.remaining = 0  # length mode: body bytes left; chunked: bytes left in the current chunk
        self.cbuf = bytearray()  # chunked framing not yet parsed
        self.cstate = "size"  # size | data | data_crlf | trailer
        self.pieces: deque[tuple[float, bytes]] = deque()
        self.waiter: asyncio.Future | None = None
        self.done = False  # the whole answer has arrived
        self.error: Exception | None = None
        self.got_bytes = False

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.done:
            if self.mode == "close":
                self._finish()
            else:
                self._fail(HTTPStreamError(f"connection closed by the server mid-answer{f': {exc}' if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.got_bytes = True
        if self.head_done is None or self.done:
            return  # bytes outside an answer (a server speaking out of turn): dropped
        if not self.head_done.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD_BYTES:
                    self._fail(HTTPStreamError(f"response head longer than {MAX_HEAD_BYTES} bytes"))
                return
            try:
                self._parse_head(bytes(self.head[:end]))
            except HTTPStreamError as e:
                self._fail(e)
                return
            data = bytes(self.head[end + 4 :])
            self.head_done.set_result(None)
            if self.mode == "none":
                self._finish()
                return
            if not data:
                return
        try:
            self._body(now, data)
        except HTTPStreamError as e:
            self._fail(e)

    # ---------------------------------------------------------------- parsing
    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPStreamError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                self.headers[k.strip().lower()] = v.strip()
        te = self.headers.get("transfer-encoding", "").lower()
        if self.status in (204, 304) or 100 <= self.status < 200 or self.request_method == b"HEAD":
            self.mode = "none"
        elif "chunked" in te:
            self.mode = "chunked"
        elif "content-length" in self.headers:
            try:
                self.remaining = int(self.headers["content-length"])
            except ValueError:
                raise HTTPStreamError(f"bad Content-Length {self.headers['content-length']!r}") from None
            self.mode = "length" if self.remaining > 0 else "none"
        else:
            self.mode = "close"

    def _body(self, now: float, data: bytes) -> None:
        if self.mode == "close":
            self._push(now, data)
        elif self.mode == "length":
            take = data[: self.remaining]
            self.remaining -= len(take)
            self._push(now, take)
            if self.remaining == 0:
                self._finish()
        else:
            self._chunked(now, data)

    def _chunked(self, now: float, data: bytes) -> None:
        buf = self.cbuf
        buf += data
        pos, out = 0, []
        while not self.done:
            if self.cstate == "size":
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if len(buf) - pos > 1024:
                        raise HTTPStreamError("chunk size line longer than 1 KB")
                    break
                size_s = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                try:
                    size = int(size_s, 16)
                except ValueError:
                    raise HTTPStreamError(f"bad chunk size {size_s[:40]!r}") from None
                pos = eol + 2
                if size == 0:
                    self.cstate = "trailer"
                else:
                    self.cstate, self.remaining = "data", size
            elif self.cstate == "data":
                n = min(self.remaining, len(buf) - pos)
                if n == 0:
                    break
                out.append(bytes(buf[pos : pos + n]))
                pos += n
                self.remaining -= n
                if self.remaining == 0:
                    self.cstate = "data_crlf"
            elif self.cstate == "data_crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HTTPStreamError("chunk data not followed by CRLF")
                pos += 2
                self.cstate = "size"
            else:  # trailer fields until an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self._finish()
        del buf[:pos]
        if out:
            self._push(now, out[0] if len(out) == 1 else b"".join(out))

    # ---------------------------------------------------------------- hand-off to the reader
    def _push(self, now: float, data: bytes) -> None:
        if data:
            self.pieces.append((now, data))
            self._wake()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.done = True
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_exception(exc)
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class Response:
    """Status and headers of an answer; its body through `pieces()` (arrival time, bytes) or `read()`."""

    def __init__(self, proto: _Proto) -> None:
        self._p = proto
        self.status_code = proto.status
        self.headers = proto.headers

    async def pieces(self) -> AsyncIterator[tuple[float, bytes]]:
        """The body as it arrives: (time.perf_counter() when the bytes reached the client, bytes)."""
        p = self._p
        loop = asyncio.get_running_loop()
        while True:
            while p.pieces:
                yield p.pieces.popleft()
            if p.error is not None:
                raise p.error
            if p.done:
                return
            p.waiter = loop.create_future()
            try:
                await p.waiter
            finally:
                p.waiter = None

    async def read(self) -> bytes:
        return b"".join([b async for _, b in self.pieces()])

    @property
    def reusable(self) -> bool:
        p = self._p
        return (p.done and p.error is None and not p.closed and p.mode != "close" and not p.pieces
                and p.headers.get("connection", "").lower() != "close")  # fmt: skip


class StreamClient:
    """`async with StreamClient(base_url, max_connections) as c: async with c.post(path, obj) as resp: ...`"""

    def __init__(self, base_url: str, max_connections: int = 100, connect_timeout_s: float = 30.0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = (u.scheme == "https" and self.port == 443) or (u.scheme == "http" and self.port == 80)
        self.host_header = host if default else f"{host}:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Proto] = []
        self._all: set[_Proto] = set()

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        for p in list(self._all):
            if p.transport is not None:
                p.transport.close()
        self._all.clear()
        self._idle.clear()

    async def _connect(self) -> _Proto:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Proto, self.host, self.port, ssl=self.ssl), self.connect_timeout_s
        )
        self._all.add(proto)
        return proto

    def _request_bytes(self, method: bytes, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method.decode()} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}",
                 "User-Agent: anvil-loadgen", "Accept: */*", f"Content-Length: {len(body)}"]  # fmt: skip
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    @contextlib.asynccontextmanager
    async def post(self, path: str, obj: Any, headers: dict[str, str] | None = None) -> AsyncIterator[Response]:
        """POST `obj` as JSON; yields the Response once its status line and headers have arrived."""
        body = json.dumps(obj).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        data = self._request_bytes(b"POST", path, body, hdrs)
        async with self._slots:
            proto = await self._send(data, b"POST")
            resp = Response(proto)
            try:
                yield resp
            finally:
                if resp.reusable:  # _exchange resets it before its next request
                    self._idle.append(proto)
                else:
                    if proto.transport is not None:
                        proto.transport.close()
                    self._all.discard(proto)

    async def _send(self, data: bytes, method: bytes) -> _Proto:
        """Write the request on an idle connection (or a new one) and wait for the answer's head. A reused connection
        that the server closed while idle (no byte of an answer came) is retried once on a fresh connection."""
        while self._idle:
            proto = self._idle.pop()
            if proto.closed:
                self._all.discard(proto)
                continue
            try:
                return await self._exchange(proto, data, method)
            except HTTPStreamError:
                self._all.discard(proto)
                if proto.got_bytes:
                    raise
        return await self._exchange(await self._connect(), data, method)

    async def _exchange(self, proto: _Proto, data: bytes, method: bytes) -> _Proto:
        proto._reset()
        proto.request_method = method
        proto.head_done = asyncio.get_running_loop().create_future()
        proto.transport.write(data)
        await proto.head_done
        return proto



class HttpxClient:
    """The same interface over httpx (the load generator's client before StreamClient; kept for A/B runs of the
    client's own cost, `http_client = "httpx"`): pieces are stamped when the reading task gets them."""

    def __init__(self, base_url: str, max_connections: int = 100, timeout_s: float = 300.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        timeout = httpx.Timeout(timeout_s, connect=min(30.0, timeout_s))
        # trust_env=False: a proxy from the environment must never see (or redirect) benchmark traffic.
        self._c = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def __aenter__(self) -> HttpxClient:
        await self._c.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._c.__aexit__(*exc)

    @contextlib.asynccontextmanager
    async def post(self, path: str, obj: Any, headers: dict[str, str] | None = None) -> AsyncIterator[_HttpxResponse]:
        async with self._c.stream("POST", self.base_url + path, json=obj, headers=headers) as r:
            yield _HttpxResponse(r)


class _HttpxResponse:
    def __init__(self, r) -> None:
        self._r = r
        self.status_code = r.status_code
        self.headers = {k.lower(): v for k, v in r.headers.items()}

    async def pieces(self) -> AsyncIterator[tuple[float, bytes]]:
        async for b in self._r.aiter_bytes():
            yield time.perf_counter(), b

    async def read(self) -> bytes:
        return await self._r.aread()


CLIENTS = ("anvil", "httpx")


def make_client(kind: str, base_url: str, max_connections: int, timeout_s: float):
    """The load generator's HTTP client: "anvil" (StreamClient, the default) or "httpx"."""
    if kind == "anvil":
        return StreamClient(base_url, max_connections, connect_timeout_s=min(30.0, timeout_s))
    if kind == "httpx":
        return HttpxClient(base_url, max_connections, timeout_s)
    raise ValueError(f"http_client must be one of {', '.join(CLIENTS)}, got {kind!r}")
