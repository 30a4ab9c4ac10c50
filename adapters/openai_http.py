"""OpenAI-compatible HTTP adapter: any server with streaming /v1/completions or /v1/chat/completions (vLLM, llama.cpp,
SGLang, TGI, Anvil's own server), measured from the client (batches: adapters/http_stream.py; one stream: httpx).

Timing convention (the same for every server, so rows compare):
- submit_time: just before the request is sent (after waiting for a free slot under max_concurrency).
- A chunk's arrival time is when its bytes reach the client. Tokens in a chunk: the number of token ids it carries
  (vLLM return_token_ids, or "token_id:N" logprob tokens), else the growth of a per-chunk cumulative
  usage.completion_tokens (vLLM continuous usage stats), else 1 per chunk with text.
- The first chunk's tokens all get its arrival time (TTFT = first content arrival; prefill end is not visible from
  a client). A later chunk carrying k tokens has them spread evenly over (previous arrival, this arrival], so ITLs sum
  to the real stream duration and no two tokens share a timestamp.
- When the final usage.completion_tokens N disagrees with the counted tokens and the chunks said nothing about their
  token counts, N tokens are split evenly over the content chunks (the earliest chunks take the remainder).
- output_ids holds the server's ids when it sent them, else -1 per token (text-only servers); text is always kept.
- Errors are results, never exceptions: HTTP >= 400 (status + body), connection drops, timeouts, `error` payloads,
  and streams that end without a finish_reason or [DONE] give finish_reason "error" with the message; the tokens that
  arrived before the failure are kept.

Options (opts): base_url (required, e.g. http://127.0.0.1:8000; a host other than 127.0.0.0/8, ::1 or localhost is
refused unless allow_remote = true), model (name sent; default the spec's name), api_key_env (env var holding a
bearer key; default OPENAI_API_KEY, unset = no header; any other name must also be listed in allow_env, so a suite
cannot send an arbitrary variable's value to a server without saying so), timeout (s, whole request;
default 600), endpoint (completions | chat), prompt (auto | text | ids; auto = text when the request has prompt_text),
max_concurrency (default: all requests at once), extensions (default True: also send top_k, seed, ignore_eos,
stop_token_ids that vLLM / llama.cpp / SGLang accept), extra_body (dict merged into every request body),
include_usage (default True: stream_options.include_usage). validate_options() checks all of them; load() applies
the same checks, so no path into the adapter skips the loopback and environment rules.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Iterator
from typing import Any

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec, now, package_version
from adapters.http_stream import StreamClient
from adapters.sse import SSEEvent, SSEParser

INSTALL_HINT = "pip install httpx  (or pip install -e '.[http]')"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"  # the one variable a suite may name without listing it in allow_env
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "base_url": str, "model": str, "api_key_env": str, "allow_env": list, "allow_remote": bool,
    "timeout": (int, float), "endpoint": str, "prompt": str, "max_concurrency": int, "extensions": bool,
    "extra_body": dict, "include_usage": bool,
}
CHOICES = {"endpoint": ("completions", "chat"), "prompt": ("auto", "text", "ids")}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; names are never resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: dict[str, Any]) -> None:
    """Raise ValueError(key, message) for the first bad option (see the module docstring)."""
    from urllib.parse import urlsplit

    for k, v in opts.items():
        typ = OPTION_TYPES.get(k)
        if typ is None:
            raise ValueError(k, f"unknown option; expected one of {', '.join(sorted(OPTION_TYPES))}")
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            raise ValueError(k, f"expected {getattr(typ, '__name__', 'a number')}, got {type(v).__name__}")
    if not opts.get("base_url"):
        raise ValueError("base_url", "required (e.g. http://127.0.0.1:8000)")
    parts = urlsplit(opts["base_url"])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("base_url", f"{opts['base_url']!r}: expected http://HOST:PORT")
    if not is_loopback(parts.hostname) and opts.get("allow_remote") is not True:
        raise ValueError("base_url", f"{opts['base_url']!r} is not a loopback address (127.0.0.0/8, ::1, "
                                     "localhost); set allow_remote = true to send requests to another host")
    allowed = opts.get("allow_env", [])
    for i, name in enumerate(allowed):
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise ValueError("allow_env", f"[{i}]: {name!r} is not an environment variable name")
    key_env = opts.get("api_key_env", DEFAULT_KEY_ENV)
    if not ENV_NAME.fullmatch(key_env):
        raise ValueError("api_key_env", f"{key_env!r} is not an environment variable name")
    if key_env != DEFAULT_KEY_ENV and key_env not in allowed:
        raise ValueError("api_key_env", f"{key_env!r} is neither {DEFAULT_KEY_ENV} nor listed in allow_env: its "
                                        "value would be sent as a bearer token; add it to allow_env to allow that")
    for k, allowed_values in CHOICES.items():
        if k in opts and opts[k] not in allowed_values:
            raise ValueError(k, f"{opts[k]!r}; expected one of {', '.join(allowed_values)}")
    if "timeout" in opts and not opts["timeout"] > 0:
        raise ValueError("timeout", f"must be > 0 seconds, got {opts['timeout']}")
    if "max_concurrency" in opts and opts["max_concurrency"] < 1:
        raise ValueError("max_concurrency", f"must be >= 1, got {opts['max_concurrency']}")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items over `parts` slots, earliest slots taking the remainder."""
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def spread_times(arrivals: list[float], counts: list[int]) -> list[float]:
    """Per-token times from chunk arrivals and tokens per chunk (see the module docstring for the convention)."""
    times: list[float] = []
    prev = None
    for t, k in zip(arrivals, counts, strict=True):
        if k <= 0:
            continue
        if prev is None:
            times += [t] * k
        else:
            times += [prev + (t - prev) * (j + 1) / k for j in range(k)]
        prev = t
    return times


def _chunk_ids(choice: dict) -> list[int] | None:
    ids = choice.get("token_ids") or (choice.get("delta") or {}).get("token_ids")
    if isinstance(ids, list) and ids:
        return [int(i) for i in ids]
    lp = choice.get("logprobs") or {}
    toks = lp.get("tokens") or [c.get("token") for c in (lp.get("content") or []) if isinstance(c, dict)]
    if toks and all(isinstance(x, str) and x.startswith("token_id:") for x in toks):
        return [int(x.split(":", 1)[1]) for x in toks]
    return None


class StreamState:
    """The events of one streamed completion -> tokens with times -> a GenResult."""

    def __init__(self, req: GenRequest, submit: float) -> None:
        self.req, self.submit = req, submit
        self.arrivals: list[float] = []  # per content chunk
        self.counts: list[int] = []  # tokens per content chunk
        self.counted: list[bool] = []  # whether the count came from the server (ids / cumulative usage)
        self.ids: list[int] = []
        self.ids_complete = True
        self.text: list[str] = []
        self.usage: dict = {}
        self.cum_usage = 0
        self.finish: str | None = None
        self.done = False
        self.error: str | None = None

    def on_event(self, ev: SSEEvent, t: float) -> list[tuple[int, float]]:
        """Feed one event; returns the new (token id or -1, time) pairs it carried."""
        if self.error or self.done:
            return []
        if ev.done:
            self.done = True
            return []
        try:
            obj = ev.json()
        except ValueError as exc:
            self.fail(f"bad JSON in stream: {exc}: {ev.data[:200]!r}")
            return []
        if not isinstance(obj, dict):
            self.fail(f"unexpected stream payload: {ev.data[:200]!r}")
            return []
        if obj.get("error") or ev.event == "error":
            err = obj.get("error", obj)
            self.fail(f"server error: {err.get('message', err) if isinstance(err, dict) else err}")
            return []
        usage = obj.get("usage") or {}
        choice = (obj.get("choices") or [{}])[0] or {}
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        ids = _chunk_ids(choice)
        new: list[tuple[int, float]] = []
        if text or ids:
            if ids is not None:
                k, exact = len(ids), True
            elif usage.get("completion_tokens") is not None and usage["completion_tokens"] > self.cum_usage:
                k, exact = int(usage["completion_tokens"]) - self.cum_usage, True
            else:
                k, exact = 1, False
            prev = self.arrivals[-1] if self.arrivals else None
            self.arrivals.append(t)
            self.counts.append(k)
            self.counted.append(exact)
            if ids is None:
                self.ids_complete = False
            self.ids += ids if ids is not None else [-1] * k
            if text:
                self.text.append(text)
            times = [t] * k if prev is None else [prev + (t - prev) * (j + 1) / k for j in range(k)]
            new = list(zip(self.ids[-k:], times, strict=True))
        if usage:
            self.usage = usage
            self.cum_usage = int(usage.get("completion_tokens") or self.cum_usage)
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
        return new

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def result(self) -> GenResult:
        counts = list(self.counts)
        n_usage = self.usage.get("completion_tokens")
        if (isinstance(n_usage, int) and self.arrivals and n_usage != sum(counts) and not any(self.counted)
                and self.error is None):
            counts = split_evenly(n_usage, len(self.arrivals))
        times = spread_times(self.arrivals, counts)
        ids = self.ids if self.ids_complete and len(self.ids) == len(times) else [-1] * len(times)
        if self.error is None and self.finish is None and not self.done:
            self.error = "stream ended before a finish_reason or [DONE] (connection closed?)"
        finish = "error" if self.error else ("length" if self.finish == "length" else "stop")
        prompt_tokens = int(self.usage.get("prompt_tokens") or len(self.req.prompt_ids))
        return GenResult(ids, "".join(self.text), self.submit, times[0] if times else None, times, finish,
                         prompt_tokens, error=self.error)


class OpenAIHTTPAdapter(Adapter):
    name = "openai_http"
    install_hint = INSTALL_HINT

    def __init__(self) -> None:
        self.opts: dict[str, Any] = {}
        self.base_url = ""
        self.model_name = ""
        self.headers: dict[str, str] = {}
        self.timeout = 600.0

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, ver = package_version("httpx")
        return (True, f"httpx {ver} (any OpenAI-compatible server)") if ok else (False, f"not installed: {INSTALL_HINT}")

    @classmethod
    def validate_options(cls, opts: dict[str, Any]) -> None:
        check_options(opts)

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        opts = dict(opts or {})
        try:
            check_options(opts)  # again here: the adapter is also used without a suite (tests, scripts)
        except ValueError as exc:
            key, msg = exc.args if len(exc.args) == 2 else ("", str(exc))
            raise ValueError(f"openai_http: opts {key}: {msg}") from None
        self.opts = opts
        self.base_url = str(opts["base_url"]).rstrip("/").removesuffix("/v1")
        self.model_name = str(opts.get("model") or model.name)
        self.timeout = float(opts.get("timeout", 600.0))
        key = os.environ.get(str(opts.get("api_key_env", DEFAULT_KEY_ENV)), "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    # -- requests --------------------------------------------------------------------------------------------------
    def build_request(self, req: GenRequest) -> tuple[str, dict]:
        """(path, JSON body) for one request; raises ValueError when the request cannot be expressed."""
        chat = self.opts.get("endpoint", "completions") == "chat"
        mode = self.opts.get("prompt", "auto")
        use_text = chat or mode == "text" or (mode == "auto" and req.prompt_text is not None)
        if use_text and req.prompt_text is None:
            raise ValueError("this endpoint/prompt mode needs GenRequest.prompt_text (the server takes text only)")
        s = req.sampling
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": req.max_new_tokens, "stream": True,
                                "temperature": s.temperature, "top_p": s.top_p}
        if chat:
            body["messages"] = [{"role": "user", "content": req.prompt_text}]
        else:
            body["prompt"] = req.prompt_text if use_text else list(req.prompt_ids)
        if self.opts.get("include_usage", True):
            body["stream_options"] = {"include_usage": True}
        if self.opts.get("extensions", True):
            body["ignore_eos"] = req.ignore_eos
            if s.top_k > 0:
                body["top_k"] = s.top_k
            if s.seed is not None:
                body["seed"] = s.seed
            if req.stop_ids:
                body["stop_token_ids"] = list(req.stop_ids)
        body.update(self.opts.get("extra_body") or {})
        return ("/v1/chat/completions" if chat else "/v1/completions"), body

    def _client_kwargs(self, n: int) -> dict:
        import httpx

        return dict(base_url=self.base_url, headers=self.headers, trust_env=False,  # no proxies for local servers
                    timeout=httpx.Timeout(self.timeout), limits=httpx.Limits(max_connections=max(n, 1)))

    async def _one(self, client, req: GenRequest, sem: asyncio.Semaphore, delay: float) -> GenResult:
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            state = StreamState(req, now())
            try:
                path, body = self.build_request(req)
            except ValueError as exc:
                state.fail(str(exc))
                return state.result()

            async def run() -> None:
                async with client.post(path, body, self.headers) as resp:
                    if resp.status_code >= 400:
                        detail = (await resp.read())[:500].decode("utf-8", "replace")
                        state.fail(f"HTTP {resp.status_code}: {detail}")
                        return
                    parser = SSEParser()
                    async for t, chunk in resp.pieces():  # t: when the bytes reached the client
                        for ev in parser.feed(chunk):
                            state.on_event(ev, t)
                    t = now()
                    for ev in parser.close():
                        state.on_event(ev, t)

            try:
                await asyncio.wait_for(run(), self.timeout)
            except TimeoutError as exc:
                state.fail(f"timeout after {self.timeout:g} s ({type(exc).__name__})")
            except OSError as exc:  # connection refused / reset / dropped mid-stream, broken HTTP framing
                state.fail(f"{type(exc).__name__}: {exc}")
            return state.result()

    async def agenerate(self, requests: list[GenRequest], offsets: list[float] | None = None) -> list[GenResult]:
        """All requests concurrently (at most opts max_concurrency in flight); request i is sent `offsets[i]` seconds
        after the call (open-loop arrivals for serving scenarios), else at once. Through the load generator's lean
        client (adapters/http_stream.py: ~3x less CPU per streamed chunk than httpx, results/cpu/loadgen-cost/)."""
        n = int(self.opts.get("max_concurrency") or len(requests) or 1)
        sem = asyncio.Semaphore(n)
        offsets = offsets or [0.0] * len(requests)
        async with StreamClient(self.base_url, max(n, 1), connect_timeout_s=min(30.0, self.timeout)) as client:
            return list(await asyncio.gather(*(self._one(client, r, sem, d) for r, d in zip(requests, offsets, strict=True))))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not self.base_url:
            raise RuntimeError("openai_http: load() first")
        return asyncio.run(self.agenerate(requests))

    def stream(self, request: GenRequest) -> Iterator[tuple[int, float]]:
        """(id or -1, time) per token as chunks arrive; raises RuntimeError when the request fails."""
        import httpx

        path, body = self.build_request(request)
        state = StreamState(request, now())
        with httpx.Client(**self._client_kwargs(1)) as client:
            try:
                with client.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:500].decode('utf-8', 'replace')}")
                    parser = SSEParser()
                    for chunk in resp.iter_bytes():
                        t = now()
                        for ev in parser.feed(chunk):
                            yield from state.on_event(ev, t)
                    for ev in parser.close():
                        yield from state.on_event(ev, now())
            except httpx.HTTPError as exc:
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        res = state.result()
        if res.finish_reason == "error":
            raise RuntimeError(res.error)
