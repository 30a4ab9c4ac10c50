"""The scheduling policy: which requests compute how many tokens in the next step.

There is no prefill or decode phase (vLLM v1): every request's computed tokens catch up with its tokens under a
token budget per step. Running requests go first (a decoding one needs 1 token; a prompt in chunks needs the next
chunk), then waiting requests are admitted in arrival order with chunks of their prompts — chunked prefill mixed
with decode in one step. When blocks run out, the newest running request is preempted (its blocks freed, its
tokens recomputed later: prompt + output so far), and no new request is admitted in that step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """Requests of one step in batch order (one-token requests first) and their new token counts."""

    requests: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_new if n == 1)

    def samples(self, i: int) -> bool:
        """Whether request i's chunk reaches its last token (so the step samples its next token)."""
        r = self.requests[i]
        return r.num_computed_tokens + self.num_new[i] == r.num_tokens + len(r.spec_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---------------------------------------------------------------- queue
    def add(self, req: Request) -> None:
        """Queue a request; ValueError (and nothing queued) when it can never run."""
        n = req.num_prompt_tokens
        if n > self.max_model_len:
            raise ValueError(f"request {req.request_id}: prompt of {n} tokens exceeds max_model_len {self.max_model_len}")
        if self.blocks.blocks_for(n) > self.blocks.num_usable:
            cap = self.blocks.num_usable * self.blocks.block_size
            raise ValueError(f"request {req.request_id}: prompt of {n} tokens exceeds the KV pool ({cap} tokens)")
        if not self.config.chunked_prefill and n > self.config.max_num_batched_tokens:
            raise ValueError(f"request {req.request_id}: prompt of {n} tokens exceeds max_num_batched_tokens "
                             f"{self.config.max_num_batched_tokens} and chunked_prefill is off")  # fmt: skip
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Mark req finished (stop / length / abort) and free its blocks at once."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self._caches(req):
            self.blocks.cache_blocks(req)  # a session's next turn (or any later request, APC) starts from these
        self.blocks.free(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _caches(self, req: Request) -> bool:
        """Whether req's full blocks are named for reuse (a session's always; every request's with APC)."""
        return req.session_id is not None or self.config.enable_prefix_caching

    def _reuse_prefix(self, req: Request) -> int:
        """Share the cached full blocks of req's known tokens (a session's earlier turns), always leaving its last
        token to compute so the step has logits to sample from; returns the tokens reused."""
        toks = req.prompt_ids + req.output_ids
        blocks = self.blocks.match(toks, len(toks) - 1)
        self.blocks.share(req, blocks)
        req.num_computed_tokens = len(blocks) * self.blocks.block_size
        return req.num_computed_tokens

    # ---------------------------------------------------------------- policy
    def _can_continue(self, req: Request) -> bool:
        """False once req has all its tokens (max_tokens or the context reached): it finishes when processed."""
        return req.num_output_tokens < req.max_tokens and req.num_tokens < self.max_model_len

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        if self._caches(victim):
            self.blocks.cache_blocks(victim)  # its recompute after readmission starts from them (unless evicted)
        self.blocks.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunk = cfg.chunk
        ones: list[tuple[Request, int]] = []
        many: list[tuple[Request, int]] = []
        out = SchedulerOutput()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._can_continue(req):
                i += 1
                continue
            want = req.num_tokens + len(req.spec_tokens) - req.num_computed_tokens  # drafts ride with the last token
            n = min(want, chunk, budget)
            if n <= 0:
                i += 1
                continue
            if n < want and req.spec_tokens:  # the budget cuts the drafts short
                del req.spec_tokens[max(0, len(req.spec_tokens) - (want - n)) :]
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req itself was preempted: nothing newer is left to run
            (ones if n == 1 else many).append((req, n))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and not out.preempted and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # its last token is still on the way (one step ahead): next step
                break
            hit = self._reuse_prefix(req) if self._caches(req) and not req.block_ids else 0
            n = min(req.num_tokens - req.num_computed_tokens, chunk, budget)
            # not chunked: the whole prompt must fit one step's budget
            if (not cfg.chunked_prefill and n < req.num_tokens - req.num_computed_tokens) or \
                    not self.blocks.allocate(req, req.num_computed_tokens + n):
                if hit:
                    self.blocks.free(req)
                    req.num_computed_tokens = 0
                break
            if req.num_preemptions == 0:
                req.num_cached_tokens = hit
                self.blocks.cache.record(req.num_prompt_tokens, hit)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            (ones if n == 1 else many).append((req, n))
            budget -= n

        for req, n in ones + many:
            out.requests.append(req)
            out.num_new.append(n)
        return out

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_usage": self.blocks.usage,
                "preemptions": self.num_preemptions, "prefix_cache": self.blocks.cache.stats()}  # fmt: skip
