"""Anvil adapter: our engine (engine.load / engine.presets.synthetic + engine.generator.create), timed per token.

On a CUDA model the generator is the GPU fast path (engine/fast_decode.py: paged KV cache, Triton GEMVs, CUDA
graphs), falling back to the reference loop (engine/generator.py Generator) with the reason logged; load option
`fast = false` forces the reference loop, `fast = true` asks for the fast path anywhere. info() records which ran.

Per-token times are stamped in Generator's on_token callback, which runs after each step's tokens are on the host
(a device sync), the same point at which the hf adapter stamps. The KV cache is sized by the load options
max_batch_size / max_seq_len when given, else grown to the largest batch seen (sequence length rounded up to a
multiple of 256) and reused.
"""

from __future__ import annotations

import json
from typing import Any

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec, now

SEQ_ROUND = 256


class AnvilAdapter(Adapter):
    name = "anvil"
    install_hint = 'pip install -e . (the engine package of this repository)'

    def __init__(self) -> None:
        self.lm = None
        self.gen = None
        self.device = "cpu"
        self.eos_ids: set[int] = set()
        self.fixed: tuple[int, int] | None = None
        self.fast: bool | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import engine
            import engine.generator  # noqa: F401
        except Exception as exc:
            return False, f"not installed ({type(exc).__name__}: {exc}): {cls.install_hint}"
        from harness.envinfo import commit as checkout_commit

        commit = checkout_commit(short=True)
        return True, f"anvil {getattr(engine, '__version__', '0.1.0')}" + (f"+{commit}" if commit else "")

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        import engine

        opts = dict(opts or {})
        if model.synthetic:
            from engine.presets import synthetic

            self.lm = synthetic(model.synthetic, model.dtype, model.device, seed=opts.pop("seed", 0))
        else:
            self.lm = engine.load(model.path, model.dtype, model.device)
        mb, ms = opts.pop("max_batch_size", None), opts.pop("max_seq_len", None)
        self.fast = opts.pop("fast", None)  # None: the GPU fast path on CUDA models, the reference loop elsewhere
        if opts:
            raise ValueError(
                f"unknown anvil options: {', '.join(sorted(opts))} (known: max_batch_size, max_seq_len, seed, fast)"
            )
        self.device = model.device
        tok = self.lm.tokenizer
        self.eos_ids = set(tok.eos_ids) if tok is not None else set(self.lm.config.eos_token_ids)
        if mb and ms:
            self.fixed = (int(mb), int(ms))
            self._generator(*self.fixed)

    def info(self) -> dict[str, Any]:
        try:
            from engine import ops

            backend, why = ops.backend()
            gen = type(self.gen).__name__ if self.gen is not None else None
            report = json.loads(json.dumps(getattr(self.gen, "report", None), default=str))  # JSON-safe copy
            return {"ops_backend": backend, "ops_reason": why, "generator": gen, "fast_path": report}
        except Exception as exc:
            return {"ops_backend": f"unknown ({type(exc).__name__})"}

    def _generator(self, batch: int, seq: int):
        from engine.generator import create

        g = self.gen
        if g is not None and batch <= g.max_batch_size and seq <= g.max_seq_len:
            return g
        if self.fixed is not None and g is not None:
            raise ValueError(f"batch {batch} x seq {seq} exceeds the configured max_batch_size x max_seq_len {self.fixed}")
        if g is not None:
            batch, seq = max(batch, g.max_batch_size), max(seq, g.max_seq_len)
        self.gen = None  # free the old cache before allocating the new one
        self._empty_cache()
        seq = -(-seq // SEQ_ROUND) * SEQ_ROUND if self.fixed is None else seq
        self.gen = create(self.lm, max_batch_size=batch, max_seq_len=seq, fast=self.fast)
        return self.gen

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def _empty_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        from engine.generator import SamplingParams

        if self.lm is None:
            raise RuntimeError("anvil adapter: load() first")
        s = requests[0].sampling
        max_new = max(r.max_new_tokens for r in requests)
        prompts = [list(r.prompt_ids) for r in requests]
        gen = self._generator(len(prompts), max(len(p) for p in prompts) + max_new)
        stop = set(requests[0].stop_ids) | (set() if requests[0].ignore_eos else self.eos_ids)
        times: list[float] = []
        self._sync()
        submit = now()
        comps = gen.generate(prompts, max_new, SamplingParams(s.temperature, s.top_k, s.top_p, s.seed),
                             stop_ids=stop, on_token=lambda step, toks: times.append(now()))
        results = []
        tok = self.lm.tokenizer
        for r, c in zip(requests, comps, strict=True):
            toks = c.tokens[: r.max_new_tokens]
            reason = c.finish_reason if len(toks) == len(c.tokens) else "length"
            tt = times[: len(toks)]
            results.append(GenResult(output_ids=toks, text=tok.decode(toks) if tok is not None else None,
                                     submit_time=submit, first_token_time=tt[0] if tt else None, token_times=tt,
                                     finish_reason=reason, prompt_tokens=len(r.prompt_ids)))
        return results

    def logits(self, prompt_ids: list[int]):
        gen = self._generator(1, len(prompt_ids))
        return gen.logits([list(prompt_ids)])[0]

    def close(self) -> None:
        self.gen = None
        self.lm = None
        self._empty_cache()
