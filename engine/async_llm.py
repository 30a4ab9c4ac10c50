"""AsyncLLM: the engine core driven by one background thread, one asyncio token stream per request (the server's
engine).

The core is not thread-safe, so exactly one thread touches it: it applies queued submits and aborts, steps while
any request is unfinished, and sleeps on a condition when there is nothing to do. Callers on the event loop
`submit` (thread-safe, refused at once when the waiting queue is full or the prompt can never run) and iterate the
returned stream (`async for out in stream`); each step's outputs are handed to the loop in one call, where every
request's tokens are detokenized incrementally and checked for stop strings. Dropping a stream early is `abort`:
the request's blocks are freed by the engine thread before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from engine.llm import LLM
from engine.request import Request, RequestOutput, SamplingParams, TokenLogprobs

log = logging.getLogger(__name__)

_ids = itertools.count()


class QueueFull(RuntimeError):
    """The waiting queue holds its maximum: retry later (HTTP 503)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or its thread died (HTTP 503)."""


@dataclass
class StreamOutput:
    """What one step adds to one request's stream."""

    request_id: str
    text: str  # new text (held back while it may still be the start of a stop string)
    token_ids: list[int]  # new token ids (a stop id included: the core keeps it; its text is left out)
    token_times: list[float]  # host perf_counter time each new token became known
    logprobs: list[TokenLogprobs] | None  # one per new token when asked for
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" when finished
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the session cache
    error: str | None = None  # why, when finish_reason == "error"


class IncrementalDetokenizer:
    """Text of a growing list of output ids, as deltas. Each step decodes a short window twice (vLLM's prefix / read
    offsets): the new text is decode(window + new ids) less decode(window), so SentencePiece's dropped leading space
    and multi-byte characters split over byte pieces come out right; a window ending in U+FFFD (half a character)
    waits for the next piece. Stop strings are searched in the text; text that may still begin one is held back."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of text handed out
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, ids: list[int], final: bool = False) -> None:
        self.ids += ids
        if self.tok is None:
            return
        new = self.tok.decode(self.ids[self.prefix :])
        if new.endswith("\ufffd") and not final:
            return
        old = self.tok.decode(self.ids[self.prefix : self.read])
        if len(new) > len(old) or final:
            self.text += new[len(old) :]
            self.prefix, self.read = self.read, len(self.ids)

    def take(self, final: bool) -> tuple[str, bool]:
        """(text to hand out now, whether a stop string ended the output there: the match itself is left out)."""
        if self.stop:
            hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
            if hits:
                end = min(hits)
                out, self.sent = self.text[self.sent : end], end
                return out, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out, False


@dataclass
class _Live:
    """A request between submit and its last output (loop-thread state)."""

    req: Request
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    arrival: float = field(default_factory=time.perf_counter)
    done: bool = False


class RequestStream:
    """`async for out in stream`: the request's StreamOutputs, the last one finished."""

    def __init__(self, request_id: str, live: _Live) -> None:
        self.request_id = request_id
        self.arrival = live.arrival
        self.num_prompt_tokens = live.req.num_prompt_tokens
        self._live = live

    @property
    def finished(self) -> bool:
        return self._live.done and self._live.queue.empty()

    async def __aiter__(self) -> AsyncIterator[StreamOutput]:
        q = self._live.queue
        while True:
            out = await q.get()
            while not out.finished and not q.empty():  # the reader fell behind: one output for all (vLLM does too)
                out = _merge(out, q.get_nowait())
            yield out
            if out.finished:
                return


def _merge(a: StreamOutput, b: StreamOutput) -> StreamOutput:
    """b appended to a: the texts, tokens, times and logprobs of both, the state of b."""
    lp = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return StreamOutput(a.request_id, a.text + b.text, a.token_ids + b.token_ids, a.token_times + b.token_times, lp,
                        b.finished, b.finish_reason, b.num_prompt_tokens, b.num_output_tokens, b.num_cached_tokens,
                        b.error)  # fmt: skip


class AsyncLLM:
    def __init__(self, llm: LLM, max_waiting: int | None = None) -> None:
        self.llm, self.core = llm, llm.core
        self.tokenizer = llm.tokenizer
        self.max_waiting = max_waiting
        self.max_model_len = self.core.max_model_len
        self.vocab_size = self.core.runner.mc.vocab_size
        self._cond = threading.Condition()
        self._cmds: list[tuple[str, object]] = []  # ("add", Request) | ("abort", request_id), guarded by _cond
        self._stopping = False
        self._live: dict[str, _Live] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead: str | None = None  # why the engine thread stopped on an error
        self.snapshot: dict = self.core.scheduler.stats()  # replaced by the engine thread after each step
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        # the engine thread's time (seconds): in step() calls (device waits included), and between two consecutive
        # steps while requests were in flight (commands, the hand-off to the event loop, and waiting for the GIL
        # that thread holds): with a busy GPU, step time minus the core's device wait is the host's share
        self.timing = {"steps": 0, "step_s": 0.0, "between_steps_s": 0.0}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind to the running event loop and start the engine thread."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="anvil-engine", daemon=True)
        self._thread.start()

    def shutdown(self, message: str = "server shutting down") -> None:
        """End every stream with an error output, stop the engine thread after its current step (loop thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._fail_all(message)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def closed(self) -> bool:
        return self._stopping or self.dead is not None

    @property
    def num_live(self) -> int:
        return len(self._live)

    def num_waiting(self) -> int:
        """Requests that could not run now: past max_num_seqs, or waiting for KV blocks in the scheduler."""
        return max(len(self._live) - self.core.config.max_num_seqs, int(self.snapshot.get("waiting", 0)))

    # ---------------------------------------------------------------- requests (loop thread)
    def check_prompt(self, prompt_ids: list[int]) -> None:
        """ValueError when the engine can never run this prompt (the checks of EngineCore / Scheduler.add)."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if n > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_model_len {self.max_model_len}")
        blocks = self.core.blocks
        if blocks.blocks_for(n) > blocks.num_usable:
            raise ValueError(f"prompt of {n} tokens exceeds the KV pool ({blocks.num_usable * blocks.block_size} tokens)")

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 16,
        stop_ids: Iterable[int] = (),
        stop: Iterable[str] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request and return its stream. QueueFull / EngineClosed when it cannot be taken now; ValueError
        for a request the engine can never run (nothing queued)."""
        if self.closed:
            raise EngineClosed(self.dead or "the engine is shutting down")
        if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
        self.check_prompt(list(prompt_ids))
        stops = set(stop_ids)
        if not ignore_eos:
            stops |= set(self.tokenizer.eos_ids if self.tokenizer is not None else self.llm.model.config.eos_token_ids)
        rid = request_id or f"req-{next(_ids)}"
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(list(prompt_ids), sampling or SamplingParams(), max_tokens, frozenset(stops), ignore_eos, rid,
                      logprobs=logprobs, session_id=session_id)  # fmt: skip
        live = _Live(req, asyncio.Queue(), IncrementalDetokenizer(self.tokenizer, stop))
        self._live[rid] = live
        self.counters["prompt_tokens"] += req.num_prompt_tokens
        self._send("add", req)
        return RequestStream(rid, live)

    def abort(self, request_id: str) -> None:
        """Stop a request (its blocks are freed before the engine's next step); its stream ends with "abort"."""
        live = self._live.pop(request_id, None)
        if live is not None and not live.done:
            live.done = True
            live.queue.put_nowait(self._output(live, [], [], None, True, "abort"))
        self._send("abort", request_id)

    def _send(self, kind: str, arg: object) -> None:
        with self._cond:
            self._cmds.append((kind, arg))
            self._cond.notify()

    # ---------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        _name_os_thread(b"anvil-engine")
        busy = False
        last = None  # when the previous step() returned, while requests were in flight
        try:
            while True:
                with self._cond:
                    while not self._cmds and not busy and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    cmds, self._cmds = self._cmds, []
                refused = []
                for kind, arg in cmds:
                    if kind == "add":
                        try:
                            self.core.add_request(arg)
                        except ValueError as e:
                            refused.append((arg.request_id, str(e)))
                    else:
                        self.core.abort(arg)
                outs = []
                if self.llm.has_unfinished():
                    t0 = time.perf_counter()
                    if last is not None:
                        self.timing["between_steps_s"] += t0 - last
                    outs = self.llm.step()
                    last = time.perf_counter()
                    self.timing["steps"] += 1
                    self.timing["step_s"] += last - t0
                busy = self.llm.has_unfinished()
                if not busy:
                    last = None
                self.snapshot = self.core.scheduler.stats()
                if outs or refused:
                    self._loop.call_soon_threadsafe(self._dispatch, outs, refused)
        except Exception as e:  # a failed step must not hang the clients: every stream ends with the error
            log.exception("engine thread failed")
            self.dead = f"engine failed: {type(e).__name__}: {e}"
            self._loop.call_soon_threadsafe(self._fail_all, self.dead)

    # ---------------------------------------------------------------- outputs (loop thread)
    def _dispatch(self, outs: list[RequestOutput], refused: list[tuple[str, str]]) -> None:
        for rid, why in refused:
            live = self._live.pop(rid, None)
            if live is not None and not live.done:
                live.done = True
                live.queue.put_nowait(self._output(live, [], [], None, True, "error", why))
        for o in outs:
            live = self._live.get(o.request_id)
            if live is None or live.done:
                continue
            self.counters["generation_tokens"] += len(o.new_token_ids)
            ids = o.new_token_ids
            text_ids = ids
            if o.finish_reason == "stop" and ids and ids[-1] in live.req.stop_ids:
                text_ids = ids[:-1]  # a stop token's text is not part of the output (EOS has none anyway)
            live.detok.add(text_ids, final=o.finished)
            text, hit = live.detok.take(final=o.finished)
            finished, reason = o.finished, o.finish_reason
            if hit and not finished:
                finished, reason = True, "stop"
                self._send("abort", o.request_id)  # the engine stops computing it; its late outputs are dropped
            elif hit:
                reason = "stop"
            if finished:
                live.done = True
                self._live.pop(o.request_id, None)
                self.counters["requests_finished"] += 1
            live.queue.put_nowait(self._output(live, text, ids, o, finished, reason))

    def _output(self, live: _Live, text: str, ids: list[int], o: RequestOutput | None, finished: bool,
                reason: str | None, error: str | None = None) -> StreamOutput:  # fmt: skip
        r = live.req
        return StreamOutput(r.request_id, text, list(ids), list(o.token_times) if o else [], o.logprobs if o else None,
                            finished, reason if finished else None, r.num_prompt_tokens,
                            o.num_output_tokens if o else len(live.detok.ids), r.num_cached_tokens, error)  # fmt: skip

    def _fail_all(self, message: str) -> None:
        for rid, live in list(self._live.items()):
            if not live.done:
                live.done = True
                live.queue.put_nowait(self._output(live, "", [], None, True, "error", message))
            self._live.pop(rid, None)


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread its OS name (Linux prctl PR_SET_NAME, 15 bytes at most), so per-thread tools (top -H,
    /proc/<pid>/task/*/comm, nsys, py-spy) tell the engine thread from the HTTP side; elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
