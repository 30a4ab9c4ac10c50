"""The engine core's step: schedule -> run the forward -> sample -> update -> outputs.

Steps run one ahead: step N+1 is scheduled and launched before step N's sampled tokens are read on the host (its
pending tokens are fed on the device), so the host's scheduling and input building overlap the GPU's work. The
cost: a request that stops on a sampled stop id is computed for one step more, and that step's token is dropped.
"""

from __future__ import annotations

import time

import torch

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.model.llama import Transformer
from engine.request import Request, RequestOutput
from engine.worker.model_runner import ModelRunner, StepHandle


class EngineCore:
    def __init__(self, model: Transformer, config: EngineConfig) -> None:
        self.config = config
        self.max_model_len = config.model_len(model.config)
        self.runner = ModelRunner(model, config, self.max_model_len)
        self.blocks = BlockManager(self.runner.pool.num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.inflight: StepHandle | None = None
        # device_wait_s: host seconds step() spent blocked on the device (reading a step's tokens)
        self.stats = {"steps": 0, "tokens": 0, "prompt_tokens": 0, "generated": 0, "device_wait_s": 0.0}
        self.spec = None  # speculative decoding (engine/spec/step.py): its own synchronous step
        if config.spec != "none":
            from engine.spec.step import SpecDecoder

            self.spec = SpecDecoder(config, model, self.runner)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        vocab, ids = self.runner.mc.vocab_size, req.prompt_ids
        # the common case in C-speed passes (a 2k prompt: ~0.1 ms, not ~0.5); the per-token scan names the bad id
        if not (all(type(t) is int for t in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab))):
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"request {req.request_id}: token id {bad!r} outside the vocabulary [0, {vocab})")
        self.scheduler.add(req)
        self.requests[req.request_id] = req
        self.stats["prompt_tokens"] += req.num_prompt_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish the request now and free its blocks; None if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return None
        self.scheduler.finish(req, "abort")
        if self.spec is not None:
            self.spec.release(req)
        return RequestOutput(req.request_id, [], True, "abort", [], req.num_output_tokens)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.inflight is not None

    def step(self) -> list[RequestOutput]:
        if self.spec is not None:
            return self.spec.step(self)
        sched = self.scheduler.schedule()
        handle = None
        if sched.requests:
            handle = self.runner.execute(sched, self.inflight)
            for req, n in zip(sched.requests, sched.num_new, strict=True):
                req.num_computed_tokens += n
            for req in handle.requests:
                req.num_pending += 1
            self.stats["steps"] += 1
            self.stats["tokens"] += sched.num_tokens
        outs = self._process(self.inflight) if self.inflight is not None else []
        self.inflight = handle
        return outs

    def _process(self, h: StepHandle) -> list[RequestOutput]:
        """Append the step's tokens (now on the host), finish requests that stop, report what changed."""
        t0 = time.perf_counter()
        toks = h.wait()
        now = time.perf_counter()
        self.stats["device_wait_s"] += now - t0
        outs = []
        for req, t in zip(h.requests, toks, strict=True):
            req.num_pending -= 1
            if req.finished:
                continue  # aborted, or stopped in an earlier step: this token was computed one step too many
            req.output_ids.append(t)
            req.token_times.append(now)
            self.stats["generated"] += 1
            reason = None
            if t in req.stop_ids:
                reason = "stop"
            elif len(req.output_ids) >= req.max_tokens or req.num_prompt_tokens + len(req.output_ids) >= self.max_model_len:
                reason = "length"
            if reason is not None:
                self.scheduler.finish(req, reason)
                self.requests.pop(req.request_id, None)
            lp = None if req.logprobs is None else [req.take_logprobs(len(req.output_ids) - 1)]
            outs.append(RequestOutput(req.request_id, [t], reason is not None, reason, [now], len(req.output_ids), lp))
        return outs

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 CPU logits [len, V] at every position of one prompt, computed in one forward over blocks
        borrowed from the pool (returned at once); the running requests are not touched."""
        tmp = Request(prompt_ids, max_tokens=1)
        n = len(prompt_ids)
        if n > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_model_len {self.max_model_len}")
        if not self.blocks.allocate(tmp, n):
            raise ValueError(f"prompt of {n} tokens needs {self.blocks.blocks_for(n)} KV blocks, {self.blocks.num_free} free")
        try:
            r = self.runner
            batch = r.build_batch(prompt_ids, list(range(n)), [0] * n, [0, n], [n], [tmp.block_ids], 0, None)
            return r.forward(batch).float().cpu()
        finally:
            self.blocks.free(tmp)

    def info(self) -> dict:
        return {**self.runner.info(), "max_model_len": self.max_model_len, "num_kv_blocks": self.blocks.num_blocks,
                "scheduler": self.scheduler.stats(), **({"spec": self.spec.info()} if self.spec else {})}  # fmt: skip
