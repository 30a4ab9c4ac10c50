"""The plain reference loop: one packed prefill of a static batch, then one decode step at a time, over the one
forward (engine/model/llama.py) with the pure-torch attention backend. No scheduler, no graphs, no overlap: it is
the oracle the engine core (engine/core/) is tested against, and nothing else uses it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from engine.attention.metadata import AttentionMetadata, ForwardBatch
from engine.attention.torch_ref import TorchBackend
from engine.llm import Completion
from engine.model.llama import LoadedModel, Transformer
from engine.request import SamplingParams
from engine.sampling import make_generator, sample
from engine.worker.kv_pool import KVPool

__all__ = ["Completion", "Generator", "SamplingParams", "check_prompts"]


def check_prompts(prompts: list[list[int]], max_batch: int, max_seq: int, vocab: int, extra: int) -> None:
    """ValueError naming the prompt unless 1..max_batch non-empty prompts each fit max_seq with `extra` more tokens
    and hold only ids in [0, vocab)."""
    if not prompts:
        raise ValueError("no prompts")
    if len(prompts) > max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed max_batch_size {max_batch}")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + extra > max_seq:
            raise ValueError(f"prompt {i}: {len(p)} tokens + {extra} more exceed max_seq_len {max_seq}")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")


class Generator:
    """Sequence b owns blocks b*nb+1 .. (b+1)*nb of a private pool (block 0 is scratch). Finished sequences
    stop being computed. Stopping happens only on `stop_ids`."""

    BLOCK = 16

    def __init__(self, model: LoadedModel | Transformer, max_batch_size: int, max_seq_len: int) -> None:
        self.model: Transformer = model.model if isinstance(model, LoadedModel) else model
        c = self.config = self.model.config
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = self.model.device
        self.model.ensure_rope(max_seq_len + 1)
        self.nb = math.ceil(max_seq_len / self.BLOCK)
        self.pool = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, max_batch_size * self.nb + 1, self.BLOCK,
                           self.model.dtype, self.device)  # fmt: skip
        self.backend = TorchBackend()

    def _forward(self, rows: list[int], starts: list[int], tokens: list[list[int]], all_logits: bool) -> torch.Tensor:
        """Sequences `rows` compute `tokens[i]` at positions starts[i]...; logits at each last token (or all)."""
        self.model.bind(self.backend, self.pool.k, self.pool.v)
        ids, pos, seq, qs, lens, last = [], [], [], [0], [], []
        for b, (s0, toks) in enumerate(zip(starts, tokens, strict=True)):
            ids += toks
            pos += range(s0, s0 + len(toks))
            seq += [b] * len(toks)
            qs.append(len(ids))
            lens.append(s0 + len(toks))
            last.append(len(ids) - 1)
        tables = torch.tensor([[row * self.nb + 1 + j for j in range(self.nb)] for row in rows], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(len(rows), sum(1 for t in tokens if len(t) == 1), qs, lens,
                                 torch.tensor(qs, dtype=torch.int32, device=dev),
                                 torch.tensor(lens, dtype=torch.int32, device=dev), tables.to(dev),
                                 max(len(t) for t in tokens), max(lens))  # fmt: skip
        batch = ForwardBatch(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                             torch.tensor(seq, dtype=torch.int32, device=dev), meta,
                             None if all_logits else torch.tensor(last, device=dev))  # fmt: skip
        return self.model(batch).float()

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, float32 CPU [len, vocab]: the next-token logits at every position."""
        out = []
        for p in prompts:
            check_prompts([p], 1, self.max_seq_len, self.config.vocab_size, 0)
            out.append(self._forward([0], [0], [p], all_logits=True).cpu())
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Iterable[int] = (),
    ) -> list[Completion]:
        if max_new_tokens <= 0:
            return [Completion([], "length") for _ in prompts]
        check_prompts(prompts, self.max_batch_size, self.max_seq_len, self.config.vocab_size, max_new_tokens - 1)
        stop = set(stop_ids)
        gen = make_generator(sampling.seed, self.device) if sampling.temperature > 0 else None
        b = len(prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        live = list(range(b))
        lg = self._forward(live, [0] * b, prompts, all_logits=False)  # [B, V]
        for step in range(max_new_tokens):
            if step > 0:
                lg = self._forward(live, [len(prompts[i]) + step - 1 for i in live], [[out[i][-1]] for i in live], False)
            toks = sample(lg, sampling.temperature, sampling.top_k, sampling.top_p, gen).tolist()
            for i, t in zip(live, toks, strict=True):
                out[i].append(t)
                if t in stop:
                    reasons[i] = "stop"
            live = [i for i in live if reasons[i] != "stop"]
            if not live:
                break
        return [Completion(o, r) for o, r in zip(out, reasons, strict=True)]
