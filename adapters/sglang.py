"""SGLang adapter: sglang.Engine (the offline engine API) in process, token-id prompts, streamed per-token times.

Written against SGLang 0.5.11's Python API (sglang.Engine(**ServerArgs fields), Engine.async_generate(input_ids=...,
sampling_params={...}, stream=True) yielding dicts with cumulative "output_ids" and "meta_info" {"finish_reason":
{"type": "length" | "stop" | "abort", ...}}, Engine.loop, Engine.shutdown()). 0.5.11 is the first release whose
wheel pins torch==2.11.0 (the lent GPU's torch; README, "Engines"); it cannot be installed on the CI machine, so
tests run it against a stand-in `sglang` module.

Conventions: all requests of a generate() call are submitted at once (SGLang batches them continuously) and share
its submit_time; a token's time is when the streamed chunk carrying it reached this process's event loop (the
engine's own loop, Engine.loop). Tokens that arrive together share that time. logits() is not offered.
SGLang starts its scheduler and detokenizer in subprocesses; the harness's workers are not daemonic, so they may.
Synthetic models ('synthetic:<preset>') use the folder the vLLM adapter writes (adapters.vllm.synthetic_model_dir:
the preset's config.json + a word-level tokenizer.json) with load_format="dummy".

Checked against 0.5.11's source (2026-12-03): `sampling_seed` only takes effect with enable_deterministic_inference
(pass it in `extra`); the default Hopper attention backend (fa3) takes fp16 / bf16 only, so float32 models get
attention_backend="triton" unless `extra` names one; a scheduler that fails at start-up kills its host process (the
harness's worker: the cell is recorded as failed), and Engine.shutdown() ends every child of that process.

Options (opts): mem_fraction_static, context_length, max_running_requests, tensor_parallel_size (1), seed (0),
disable_cuda_graph (False), enable_prefix_caching (False: radix cache off, every request pays its own prefill),
cache_dir (synthetic model folders), extra (dict of further sglang.Engine keyword arguments).
"""

from __future__ import annotations

import importlib
from typing import Any

from adapters.base import EngineNotAvailable, GenRequest, GenResult, LLMClassAdapter, ModelSpec, now

INSTALL_HINT = "pip install sglang==0.5.11  (pins torch==2.11.0; needs a CUDA GPU)"


def sampling_kwargs(req: GenRequest) -> dict[str, Any]:
    """GenRequest -> SGLang sampling_params dict."""
    s = req.sampling
    kw: dict[str, Any] = dict(max_new_tokens=req.max_new_tokens, temperature=float(s.temperature),
                              top_p=float(s.top_p), top_k=int(s.top_k) if s.top_k > 0 else -1, min_p=0.0,
                              ignore_eos=bool(req.ignore_eos), skip_special_tokens=True)
    if s.seed is not None:
        kw["sampling_seed"] = int(s.seed)
    if req.stop_ids:
        kw["stop_token_ids"] = [int(i) for i in req.stop_ids]
    return kw


def llm_kwargs(model: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec + opts -> sglang.Engine keyword arguments (ServerArgs fields)."""
    kw: dict[str, Any] = {}
    if model.synthetic:
        from adapters.vllm import synthetic_model_dir

        folder = str(synthetic_model_dir(model.synthetic, model.dtype, opts.get("cache_dir")))
        kw.update(model_path=folder, tokenizer_path=folder, load_format="dummy")
    elif not model.path:
        raise ValueError(f"sglang: {model.name!r} has no local folder")
    else:
        kw["model_path"] = str(model.path)
    kw.update(dtype=model.dtype, random_seed=int(opts.get("seed", 0)), tp_size=int(opts.get("tensor_parallel_size", 1)),
              disable_radix_cache=not bool(opts.get("enable_prefix_caching", False)),
              disable_cuda_graph=bool(opts.get("disable_cuda_graph", False)), log_level="error")
    if opts.get("mem_fraction_static") is not None:
        kw["mem_fraction_static"] = float(opts["mem_fraction_static"])
    for key in ("context_length", "max_running_requests"):
        if opts.get(key) is not None:
            kw[key] = int(opts[key])
    if model.dtype == "float32":  # fa3 (the Hopper default) has no fp32 kernels
        kw["attention_backend"] = "triton"
    kw.update(opts.get("extra") or {})
    return kw


class SGLangAdapter(LLMClassAdapter):
    name = "sglang"
    package = "sglang"
    install_hint = INSTALL_HINT
    llm_kwargs = staticmethod(llm_kwargs)

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        ok, why = self.available()
        if not ok:
            raise EngineNotAvailable(why)
        self._kwargs = self.llm_kwargs(model, dict(opts or {}))
        self.llm = importlib.import_module(self.package).Engine(**self._kwargs)  # SGLang's class is Engine, not LLM

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self._kwargs.items() if k not in ("model_path", "tokenizer_path")}

    async def _one(self, req: GenRequest, submit: float) -> GenResult:
        times: list[float] = []
        last: dict | None = None
        try:
            stream = await self.llm.async_generate(input_ids=list(req.prompt_ids),
                                                   sampling_params=sampling_kwargs(req), stream=True)
            async for chunk in stream:
                t = now()
                times += [t] * max(len(chunk.get("output_ids") or []) - len(times), 0)
                last = chunk
        except Exception as exc:  # one failed request must not end the batch
            ids = list((last or {}).get("output_ids") or [])
            return GenResult(ids, None, submit, times[0] if times else None, times, "error", len(req.prompt_ids),
                             error=f"{type(exc).__name__}: {exc}")
        last = last or {}
        ids = list(last.get("output_ids") or [])
        why = (last.get("meta_info") or {}).get("finish_reason") or {}
        kind = why.get("type") if isinstance(why, dict) else str(why)
        if kind == "abort" or not ids:
            msg = why.get("message") if isinstance(why, dict) else None
            return GenResult(ids, last.get("text"), submit, times[0] if times else None, times, "error",
                             len(req.prompt_ids), error=f"aborted by sglang: {msg or why or 'no output'}")
        return GenResult(ids, last.get("text"), submit, times[0], times, "length" if kind == "length" else "stop",
                         len(req.prompt_ids))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if self.llm is None:
            raise RuntimeError("sglang: load() first")
        import asyncio

        async def run() -> list[GenResult]:
            submit = now()
            return list(await asyncio.gather(*(self._one(r, submit) for r in requests)))

        return self.llm.loop.run_until_complete(run())

    def close(self) -> None:
        if self.llm is not None and hasattr(self.llm, "shutdown"):
            self.llm.shutdown()
        self.llm = None
