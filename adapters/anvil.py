"""Anvil adapter: our engine's generation core (engine.LLM over EngineCore.step), on every device.

`[options.anvil]` in a suite holds EngineConfig fields (engine/config.py; `validate_options` checks them in the
parent, before any worker starts). Every GenRequest is its own request with its own sampling, stop ids and
max_new_tokens; a batch is all of them added at once and stepped until done (continuous batching: prompts are
chunked and mixed with decode under the step's token budget). Token times are the host times at which each step's
tokens reached the host (after a device sync), the same point at which the hf adapter stamps.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec, now

_REPO = Path(__file__).resolve().parent.parent


def _commit() -> str | None:
    given = os.environ.get("ANVIL_COMMIT")
    if given:
        return given[:12]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class AnvilAdapter(Adapter):
    name = "anvil"
    install_hint = "pip install -e . (the engine package of this repository)"
    supports_quant = True

    def __init__(self) -> None:
        self.lm = None
        self.llm = None
        self.device = "cpu"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import engine
        except Exception as exc:
            return False, f"not installed ({type(exc).__name__}: {exc}): {cls.install_hint}"
        c = _commit()
        return True, f"anvil {engine.__version__}" + (f"+{c}" if c else "")

    @classmethod
    def validate_options(cls, opts: dict[str, Any]) -> None:
        """ValueError naming the key unless every option is a valid EngineConfig field."""
        from engine.config import EngineConfig

        EngineConfig.from_options(opts)

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        import engine
        from engine.config import EngineConfig

        config = EngineConfig.from_options(dict(opts or {}))
        self.device = model.device
        if config.tensor_parallel_size > 1:  # this process is rank 0; the other ranks are spawned and mirror it
            from engine.distributed import driver

            self.llm = driver.start(model.synthetic or model.path, model.dtype, model.device, config,
                                    synthetic=bool(model.synthetic))  # fmt: skip
            self.lm = self.llm.lm
            return
        if model.synthetic:
            from engine.presets import synthetic

            self.lm = synthetic(model.synthetic, model.dtype, model.device, seed=config.seed)
        else:
            self.lm = engine.load(model.path, model.dtype, model.device)
        if model.quant:
            self._quantize(model)
        self.device = model.device
        self.llm = engine.LLM(self.lm, config)

    def _quantize(self, model: ModelSpec) -> None:
        """Weight-only 4-bit in place. A synthetic preset has random weights and no text to calibrate on, so awq and
        gptq pack RTN-quantized weights in their (shared) int4 g128 format: the same kernels and bytes, speed only."""
        from engine.quant import quantize_model, stdlib_calibration

        method = model.quant
        if method in ("awq", "gptq"):
            if model.synthetic or self.lm.tokenizer is None:
                method = "rtn"
            else:
                quantize_model(self.lm.model, method, calib=stdlib_calibration(self.lm.tokenizer))
                return
        quantize_model(self.lm.model, method)

    def info(self) -> dict[str, Any]:
        from engine import ops

        backend, why = ops.backend()
        core = self.llm.info() if self.llm is not None else None
        # speculative decoding's totals (method, k, proposed, accepted, acceptance_rate, mean_accepted_len, per request)
        spec = None if core is None else core.get("spec")
        return {"ops_backend": backend, "ops_reason": why, "core": core, "spec": spec,
                "weight_bytes_per_step": self._weight_bytes()}  # fmt: skip

    def _weight_bytes(self) -> int | None:
        """Bytes of weights one decode step reads as stored (Transformer.decode_weight_bytes); the harness's GB/s
        uses it."""
        return None if self.lm is None else self.lm.model.decode_weight_bytes()

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        from engine.request import SamplingParams

        if self.llm is None:
            raise RuntimeError("anvil adapter: load() first")
        self._sync()
        submit = now()
        ids = []
        for r in requests:
            s = r.sampling
            ids.append(self.llm.add_request(list(r.prompt_ids), SamplingParams(s.temperature, s.top_k, s.top_p, s.seed),
                                            r.max_new_tokens, r.stop_ids, ignore_eos=r.ignore_eos))  # fmt: skip
        got: dict[str, tuple[list[int], list[float], str]] = {i: ([], [], "length") for i in ids}
        while self.llm.has_unfinished():
            for o in self.llm.step():
                toks, times, _ = got[o.request_id]
                toks += o.new_token_ids
                times += o.token_times
                if o.finished:
                    got[o.request_id] = (toks, times, o.finish_reason)
        tok = self.lm.tokenizer
        out = []
        for r, i in zip(requests, ids, strict=True):
            toks, times, reason = got[i]
            out.append(GenResult(output_ids=toks, text=tok.decode(toks) if tok is not None else None, submit_time=submit,
                                 first_token_time=times[0] if times else None, token_times=times, finish_reason=reason,
                                 prompt_tokens=len(r.prompt_ids)))  # fmt: skip
        return out

    def logits(self, prompt_ids: list[int]):
        return self.llm.logits(list(prompt_ids))

    def hidden_states(self, prompt_ids: list[int]):
        return self.llm.hidden_states(list(prompt_ids))

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def close(self) -> None:
        if hasattr(self.llm, "shutdown"):  # tensor parallel: stop the other ranks
            self.llm.shutdown()
        self.llm = None
        self.lm = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
