"""Static-batch generation: one packed prefill of mixed-length prompts, then batched decode steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.model import LoadedModel, Transformer
from engine.sampling import make_generator, sample


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # same seed + same prompts = same tokens


@dataclass
class Completion:
    tokens: list[int]  # generated ids (prompt excluded); ends with the stop id when finish_reason == "stop"
    finish_reason: str  # "length" | "stop"


def check_prompts(prompts: list[list[int]], max_batch: int, max_seq: int, vocab: int, extra: int) -> None:
    """ValueError naming the prompt unless 1..max_batch non-empty prompts each fit max_seq with `extra` more tokens
    and hold only ids in [0, vocab). Shared by every generator (reference loop and GPU fast path)."""
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
    """Owns a contiguous KV cache of (max_batch_size, max_seq_len) for one model.

    Finished sequences keep being computed in the batch (so cache row b stays sequence b); their tokens are
    ignored. Stopping happens only on `stop_ids`: callers that want EOS to stop pass the EOS ids there.
    """

    def __init__(self, model: LoadedModel | Transformer, max_batch_size: int, max_seq_len: int) -> None:
        self.model: Transformer = model.model if isinstance(model, LoadedModel) else model
        self.config = self.model.config
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = self.model.device
        self.model.ensure_rope(max_seq_len)
        self.cache = KVCache.for_model(self.config, max_batch_size, max_seq_len, self.model.dtype, self.device)

    def _pack(self, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """tokens, cu_seqlens (int32), positions, batch_idx (int64) for a packed prefill, on the device."""
        lens = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        positions = torch.cat([torch.arange(n) for n in lens])
        batch_idx = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lens))
        return tuple(t.to(self.device, non_blocking=True) for t in (tokens, cu, positions, batch_idx))

    def _check(self, prompts: list[list[int]], extra: int) -> None:
        check_prompts(prompts, self.max_batch_size, self.max_seq_len, self.config.vocab_size, extra)

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, float32 CPU [len, vocab]: the next-token logits at every position."""
        out: list[torch.Tensor] = []
        for s in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[s : s + self.max_batch_size]
            self._check(chunk, 0)
            tokens, cu, positions, batch_idx = self._pack(chunk)
            logits = self.model.prefill(tokens, cu, positions, batch_idx, self.cache, all_logits=True).cpu()
            bounds = cu.tolist()
            out += [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Iterable[int] = (),
        on_token: Callable[[int, list[int | None]], None] | None = None,
    ) -> list[Completion]:
        if max_new_tokens <= 0:
            return [Completion([], "length") for _ in prompts]
        # the last generated token is never fed back, so it needs no cache slot
        self._check(prompts, max_new_tokens - 1)
        stop = set(stop_ids)
        b = len(prompts)
        gen = make_generator(sampling.seed, self.device) if sampling.temperature > 0 else None

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, gen)

        tokens, cu, positions, batch_idx = self._pack(prompts)
        tok = pick(self.model.prefill(tokens, cu, positions, batch_idx, self.cache))  # [B]
        # decode state, advanced on the device without host round trips
        pos = (cu[1:] - cu[:-1]).long()  # [B] position of the token fed next = prompt length
        seq_lens = (pos + 1).to(torch.int32)

        # Tokens come to the host every step only when someone needs them (stop ids, streaming);
        # otherwise they stay on the device and are copied once at the end.
        host_each_step = bool(stop) or on_token is not None
        out: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        done = [False] * b
        steps: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            if step > 0:
                tok = pick(self.model.decode(tok, pos, seq_lens, self.cache))
                pos += 1
                seq_lens += 1
            if not host_each_step:
                steps.append(tok)
                continue
            toks: list[int | None] = tok.tolist()
            for i, t in enumerate(toks):
                if done[i]:
                    toks[i] = None
                    continue
                out[i].append(t)
                if t in stop:
                    done[i], reasons[i] = True, "stop"
            if on_token is not None:
                on_token(step, toks)
            if all(done):
                break
        if not host_each_step:
            out = torch.stack(steps, dim=1).tolist()  # [B, max_new_tokens]
        return [Completion(o, r) for o, r in zip(out, reasons, strict=True)]


def create(
    model: LoadedModel | Transformer, max_batch_size: int, max_seq_len: int, fast: bool | None = None, **fast_opts
):
    """A generator with this module's API: on a CUDA model (or fast=True) the GPU fast path
    engine.fast_decode.FastGenerator (paged KV cache, Triton kernels, CUDA graphs); else, or when that cannot be
    built (the reason is logged), Generator. fast=False always gives Generator."""
    m = model.model if isinstance(model, LoadedModel) else model
    if fast is None:
        fast = m.device.type == "cuda"
    if fast:
        try:
            from engine.fast_decode import FastGenerator

            return FastGenerator(model, max_batch_size, max_seq_len, **fast_opts)
        except Exception as e:  # any failure of the fast path falls back to the reference loop
            import logging

            logging.getLogger(__name__).warning("fast path unavailable, using Generator: %s: %s", type(e).__name__, e)
    return Generator(model, max_batch_size, max_seq_len)
