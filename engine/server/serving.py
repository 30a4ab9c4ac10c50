"""/v1/completions and /v1/chat/completions over AsyncLLM: a body -> engine requests (one per prompt) -> a JSON
response or an SSE stream of chunks (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`) in vLLM's / OpenAI's shapes.

Every refusal is an APIError (HTTP 400 / 503 with an OpenAI error body). A stream that ends in an engine error (the
server shutting down, a failed step) sends an error chunk, then [DONE]. A client that goes away aborts its
requests at once: the engine frees their blocks before its next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.async_llm import AsyncLLM, EngineClosed, QueueFull, RequestStream, StreamOutput
from engine.request import MAX_LOGPROBS, SamplingParams, TokenLogprobs
from engine.server.metrics import Metrics
from engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body


@dataclass
class Job:
    """What one request body asks the engine for (one prompt per choice)."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]
    sampling: SamplingParams
    max_tokens: list[int]
    stop: list[str]
    stop_ids: list[int]
    ignore_eos: bool
    logprobs: int | None
    session: str | None
    stream: bool
    include_usage: bool = False
    continuous_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


class Serving:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: Metrics, retry_after_s: int = 1) -> None:
        self.llm, self.model_name, self.metrics = llm, model_name, metrics
        self.tok = llm.tokenizer
        self.retry_after_s = retry_after_s

    # ---------------------------------------------------------------- bodies -> jobs
    def completion_job(self, body: CompletionRequest, session: str | None) -> Job:
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        p = body.prompt
        if isinstance(p, str):
            prompts = [self._encode(p, "prompt")]
        elif not p:
            raise APIError(400, "prompt is empty", "prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]
        elif isinstance(p[0], str):
            prompts = [self._encode(s, "prompt") for s in p]
        else:
            prompts = [list(x) for x in p]
        lp = body.logprobs
        if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {lp}", "logprobs")
        return self._job("completion", body, prompts, body.max_tokens, lp, session)

    def chat_job(self, body: ChatCompletionRequest, session: str | None) -> Job:
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        if not body.messages:
            raise APIError(400, "messages is empty", "messages")
        try:
            text = self.tok.apply_chat_template([m.as_dict() for m in body.messages], body.add_generation_prompt)
        except Exception as e:  # no template, or the template raised on these messages
            raise APIError(400, f"chat template: {e}", "messages") from None
        ids = self.tok.encode(text, add_bos=False)
        lp = None
        if body.logprobs:
            lp = body.top_logprobs or 0
            if not 0 <= lp <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {lp}", "top_logprobs")
        elif body.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs = true", "top_logprobs")
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return self._job("chat", body, [ids], mt, lp, session)

    def _encode(self, text: str, param: str) -> list[int]:
        if self.tok is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param)
        return self.tok.encode(text)

    def _job(self, kind, body, prompts, max_tokens, logprobs, session) -> Job:
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported", "n")
        t = 1.0 if body.temperature is None else body.temperature
        if not (math.isfinite(t) and 0.0 <= t <= 2.0):
            raise APIError(400, f"temperature must be in [0, 2], got {t}", "temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        top_k = body.top_k or 0
        if top_k < -1:
            raise APIError(400, f"top_k must be -1 or 0 (off) or positive, got {top_k}", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (only 0)", name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(s == "" for s in stop):
            raise APIError(400, "stop strings must not be empty", "stop")
        stop_ids = list(body.stop_token_ids or [])
        bad = next((i for i in stop_ids if not 0 <= i < self.llm.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"stop_token_ids: {bad} is outside the vocabulary [0, {self.llm.vocab_size})",
                           "stop_token_ids")  # fmt: skip
        if body.min_tokens < 0:
            raise APIError(400, f"min_tokens must be >= 0, got {body.min_tokens}", "min_tokens")
        if body.min_tokens > 0 and not (body.ignore_eos and not stop and not stop_ids):
            raise APIError(400, "min_tokens > 0 is supported only with ignore_eos = true and no stop", "min_tokens")
        mml = self.llm.max_model_len
        per = []
        for p in prompts:
            try:
                self.llm.check_prompt(p)
            except ValueError as e:
                code = "context_length_exceeded" if "exceeds" in str(e) else None
                raise APIError(400, str(e), "prompt" if kind == "completion" else "messages", code) from None
            if max_tokens is None:
                mt = mml - len(p)
                if mt < 1:
                    raise APIError(400, f"this model's maximum context length is {mml} tokens; the prompt has "
                                   f"{len(p)}, leaving no room for output", "prompt", "context_length_exceeded")  # fmt: skip
            else:
                mt = max_tokens
                if mt < 1:
                    raise APIError(400, f"max_tokens must be at least 1, got {mt}", "max_tokens")
                if len(p) + mt > mml:
                    raise APIError(400, f"this model's maximum context length is {mml} tokens; you requested "
                                   f"{len(p) + mt} ({len(p)} in the prompt, {mt} for the output)", "max_tokens",
                                   "context_length_exceeded")  # fmt: skip
            if body.min_tokens > mt:
                raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({mt})", "min_tokens")
            per.append(mt)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options needs stream = true", "stream_options")
        try:
            sampling = SamplingParams(float(t), max(0, top_k), float(top_p), body.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        so = body.stream_options
        return Job(kind, prompts, sampling, per, stop, stop_ids, body.ignore_eos, logprobs, session, body.stream,
                   bool(so and so.include_usage), bool(so and so.continuous_usage_stats))  # fmt: skip

    # ---------------------------------------------------------------- jobs -> engine streams
    def submit(self, job: Job) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(job.prompts):
                streams.append(self.llm.submit(p, job.sampling, job.max_tokens[i], job.stop_ids, job.stop,
                                               job.ignore_eos, job.logprobs, job.session, f"{job.id}-{i}"))  # fmt: skip
        except QueueFull as e:
            self._abort(streams)
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, str(e), code="queue_full", headers={"Retry-After": str(self.retry_after_s)}) from None
        except EngineClosed as e:
            self._abort(streams)
            raise APIError(503, str(e), code="unavailable") from None
        except ValueError as e:
            self._abort(streams)
            raise APIError(400, str(e), "prompt") from None
        return streams

    def _abort(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.llm.abort(s.request_id)

    async def _outputs(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamOutput]]:
        """(choice index, output) of every stream, as they come; aborts the unfinished ones when closed early."""
        timers = [self.metrics.tracker(s.arrival, s.num_prompt_tokens) for s in streams]
        try:
            if len(streams) == 1:
                async for out in streams[0]:
                    timers[0].observe(out)
                    yield 0, out
                return
            q: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, s: RequestStream) -> None:
                async for out in s:
                    await q.put((i, out))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            try:
                left = len(streams)
                while left:
                    i, out = await q.get()
                    timers[i].observe(out)
                    left -= out.finished
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            for s, timer in zip(streams, timers, strict=True):
                if not s.finished:
                    timer.done("abort")
            self._abort(streams)

    # ---------------------------------------------------------------- responses
    async def full(self, job: Job, streams: list[RequestStream]) -> dict:
        n = len(streams)
        text, ids, lps, reason = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        usage = _Usage(n)
        async for i, out in self._outputs(streams):
            if out.finish_reason == "error":
                raise APIError(503 if self.llm.closed else 500, out.error or "engine error", code="engine_error")
            text[i] += out.text
            ids[i] += out.token_ids
            if out.logprobs:
                lps[i] += out.logprobs
            reason[i] = out.finish_reason
            usage.update(i, out)
        choices = []
        for i in range(n):
            c = {"index": i, "logprobs": self._logprobs(job, ids[i], lps[i], 0) if job.logprobs is not None else None,
                 "finish_reason": reason[i], "stop_reason": None}  # fmt: skip
            if job.kind == "chat":
                c["message"] = {"role": "assistant", "content": text[i]}
            else:
                c["text"] = text[i]
            choices.append(c)
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return {"id": self._id(job), "object": obj, "created": job.created, "model": self.model_name,
                "choices": choices, "usage": usage.body()}  # fmt: skip

    async def sse(self, job: Job, streams: list[RequestStream]) -> AsyncIterator[bytes]:
        usage = _Usage(len(streams))
        sent = [0] * len(streams)  # characters of text sent per choice (completions' text_offset)
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        head = {"id": self._id(job), "object": obj, "created": job.created, "model": self.model_name}
        head_json = json.dumps(head, separators=(",", ":")).encode()[:-1]  # the chunk's bytes up to "choices"
        started = [False] * len(streams)  # chat: the role rides on a choice's first chunk (so it carries a token)
        async for i, out in self._outputs(streams):
            if out.finish_reason == "error":
                yield _event(error_body(out.error or "engine error", "server_error", None, "engine_error"))
                break
            if out.finish_reason == "abort":
                break
            usage.update(i, out)
            if not out.token_ids and not out.text and not out.finished:
                continue
            if out.finished and out.token_ids and not out.text and self.tok is None:
                # no tokenizer (synthetic weights): a token chunk, then the finish, so load generators that count
                # chunks without text or finish_reason as tokens see the last one too
                yield self._chunk(job, head, i, out, sent, usage, finished=False)
                out = StreamOutput(out.request_id, "", [], [], None, True, out.finish_reason, out.num_prompt_tokens,
                                   out.num_output_tokens, out.num_cached_tokens)  # fmt: skip
            yield self._chunk(job, head, i, out, sent, usage, started=started, head_json=head_json)
        else:
            if job.include_usage:
                yield _event({**head, "choices": [], "usage": usage.body()})
        yield b"data: [DONE]\n\n"

    def _chunk(self, job: Job, head: dict, i: int, out: StreamOutput, sent: list[int], usage: _Usage,
               finished: bool = True, started: list[bool] | None = None, head_json: bytes | None = None) -> bytes:  # fmt: skip
        """One SSE chunk of choice i (finished=False: the output's tokens without its finish_reason). With head_json
        (the head's JSON without its closing brace), a plain token chunk — no logprobs or usage, a completion or a
        started chat choice's content — is assembled from it and the encoded text: the same bytes as the general
        path below, which builds and encodes the whole dict (~3x the event loop's time per token there)."""
        reason = out.finish_reason if finished else None
        offset, sent[i] = sent[i], sent[i] + len(out.text)
        if head_json is not None and job.logprobs is None and not job.continuous_usage:
            if job.kind != "chat":
                return b"".join((b"data: ", head_json, b',"choices":[{"index":%d,"logprobs":null,"finish_reason":' % i,
                                 _json(reason), b',"text":', _json(out.text), b',"stop_reason":null}]}\n\n'))  # fmt: skip
            if started is not None and started[i] and reason is None:
                return b"".join((b"data: ", head_json, b',"choices":[{"index":%d,"logprobs":null,"finish_reason":null,' % i,
                                 b'"delta":{"content":', _json(out.text), b"}}]}\n\n"))  # fmt: skip
        lp = self._logprobs(job, out.token_ids, out.logprobs or [], offset) if job.logprobs is not None else None
        c = {"index": i, "logprobs": lp, "finish_reason": reason}
        if job.kind == "chat":
            c["delta"] = {"content": out.text} if out.text or reason is None else {}
            if started is not None and not started[i]:
                c["delta"] = {"role": "assistant", "content": out.text}
                started[i] = True
        else:
            c["text"] = out.text
            c["stop_reason"] = None
        chunk = {**head, "choices": [c]}
        if job.continuous_usage:
            chunk["usage"] = usage.body()
        return _event(chunk)

    def _id(self, job: Job) -> str:
        return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id

    def _piece(self, tid: int) -> str:
        if self.tok is None:
            return f"token_id:{tid}"
        return self.tok.id_to_piece(tid).replace("\u2581", " ")

    def _logprobs(self, job: Job, ids: list[int], lps: list[TokenLogprobs], offset: int) -> dict | None:
        if job.kind == "chat":
            content = []
            for t, lp in zip(ids, lps, strict=False):
                s = self._piece(t)
                top = [{"token": self._piece(i), "logprob": v, "bytes": list(self._piece(i).encode())} for i, v in lp.top]
                content.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()), "top_logprobs": top})
            return {"content": content}
        toks, offs, pos = [], [], offset
        for t in ids[: len(lps)]:
            s = self._piece(t)
            toks.append(s)
            offs.append(pos)
            pos += len(s)
        return {"tokens": toks, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self._piece(i): v for i, v in lp.top} for lp in lps] if job.logprobs else None,
                "text_offset": offs}  # fmt: skip


class _Usage:
    def __init__(self, n: int) -> None:
        self.prompt, self.output, self.cached = [0] * n, [0] * n, [0] * n

    def update(self, i: int, out: StreamOutput) -> None:
        self.prompt[i], self.output[i], self.cached[i] = out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens

    def body(self) -> dict:
        p, o = sum(self.prompt), sum(self.output)
        return {"prompt_tokens": p, "completion_tokens": o, "total_tokens": p + o,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached)}}  # fmt: skip


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _json(value: str | None) -> bytes:
    return json.dumps(value).encode()
