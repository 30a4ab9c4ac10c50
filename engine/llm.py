"""LLM: the user-facing engine over EngineCore. A static batch is `generate` (add all, step until done); a
server adds and aborts requests while stepping (engine/async_llm.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.core.engine_core import EngineCore
from engine.model.llama import LoadedModel, Transformer
from engine.request import Request, RequestOutput, SamplingParams


@dataclass
class Completion:
    tokens: list[int]  # generated ids (prompt excluded); ends with the stop id when finish_reason == "stop"
    finish_reason: str  # "length" | "stop" | "abort" | "error"
    token_times: list[float] = field(default_factory=list)  # host perf_counter time each token became known
    error: str | None = None  # why the request was refused (finish_reason == "error")
    request_id: str = ""


class LLM:
    def __init__(self, model: LoadedModel | Transformer, config: EngineConfig | None = None) -> None:
        self.lm = model if isinstance(model, LoadedModel) else None
        self.model: Transformer = model.model if isinstance(model, LoadedModel) else model
        self.config = config or EngineConfig()
        tp = getattr(self.model, "tp", None)  # tensor parallelism: this process is one rank, the model its shard
        if (1 if tp is None else tp.world) != self.config.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {self.config.tensor_parallel_size}, but the model is "
                             f"{'not sharded' if tp is None else f'sharded over {tp.world} ranks'}: start the ranks "
                             f"with engine.distributed (launch.build_llm in each rank, or driver.start)")  # fmt: skip
        self.core = EngineCore(self.model, self.config)
        if tp is not None:
            from engine.distributed.launch import agree_kv_blocks

            agree_kv_blocks(self)  # the same KV block count on every rank, or the schedulers would diverge

    @property
    def tokenizer(self):
        return None if self.lm is None else self.lm.tokenizer

    # ---------------------------------------------------------------- request API
    def add_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 16,
        stop_ids: Iterable[int] = (),
        ignore_eos: bool = True,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; ValueError (nothing queued) for a prompt the engine can never run. Returns its id.
        EOS stops a request only when ignore_eos is False (then the model's EOS ids join stop_ids)."""
        stop = set(stop_ids)
        if not ignore_eos:
            stop |= set(self.tokenizer.eos_ids if self.tokenizer is not None else self.model.config.eos_token_ids)
        req = Request(list(prompt_ids), sampling or SamplingParams(), max_tokens, frozenset(stop), ignore_eos,
                      request_id or "")  # fmt: skip
        self.core.add_request(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.core.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    # ---------------------------------------------------------------- batch API
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams] | None = None,
        max_tokens: int | list[int] = 16,
        stop_ids: Iterable[int] | list[Iterable[int]] = (),
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[Completion]:
        """Every prompt as its own request (its own sampling, max_tokens and stop ids when lists are given),
        stepped until all finish. A prompt that cannot run gets finish_reason "error" with the reason; the
        rest complete."""
        n = len(prompts)

        if isinstance(max_tokens, list) and len(max_tokens) != n:
            raise ValueError(f"{len(max_tokens)} max_tokens for {n} prompts")
        per_stop = isinstance(stop_ids, list) and bool(stop_ids) and not isinstance(stop_ids[0], int)
        if per_stop and len(stop_ids) != n:
            raise ValueError(f"{len(stop_ids)} stop-id lists for {n} prompts")

        comps: list[Completion] = []
        ids: dict[str, int] = {}
        for i, p in enumerate(prompts):
            s = sampling[i] if isinstance(sampling, list) else sampling
            try:
                mt = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
                rid = self.add_request(p, s, mt, stop_ids[i] if per_stop else stop_ids)
            except ValueError as e:
                comps.append(Completion([], "error", error=str(e)))
                continue
            ids[rid] = i
            comps.append(Completion([], "length", request_id=rid))
        while self.has_unfinished():
            for o in self.step():
                c = comps[ids[o.request_id]] if o.request_id in ids else None
                if c is None:
                    continue
                c.tokens += o.new_token_ids
                c.token_times += o.token_times
                if o.finished:
                    c.finish_reason = o.finish_reason
                if on_output is not None:
                    on_output(o)
        return comps

    @torch.inference_mode()
    def logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Float32 CPU [len, vocab]: the next-token logits at every position of one prompt (for parity)."""
        return self.core.prompt_logits(list(prompt_ids))

    @torch.inference_mode()
    def hidden_states(self, prompt_ids: list[int]) -> list[torch.Tensor]:
        """Float32 CPU [len, dim] per decoder layer (its output after the residual add), for layer-wise parity."""
        with self.core.runner.lock:  # the model's capture flag, shared with any other engine over the same model
            self.model.capture_hidden = True
            try:
                self.core.prompt_logits(list(prompt_ids))
                return [h.float().cpu() for h in self.model.hidden]
            finally:
                self.model.capture_hidden, self.model.hidden = False, []

    def info(self) -> dict:
        return self.core.info()
