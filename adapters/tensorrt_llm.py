"""TensorRT-LLM adapter: tensorrt_llm.LLM (the LLM API) in process, token-id prompts, streamed per-token times.

Written against TensorRT-LLM's documented LLM API (tensorrt_llm.LLM, tensorrt_llm.SamplingParams,
LLM.generate_async(inputs, sampling_params, streaming=True) yielding RequestOutput with outputs[0].token_ids).
It cannot be installed on the CI machine (it needs a GPU), so tests cover request translation and availability.

Conventions: all requests of a generate() call are submitted at once (in-flight batching) and share its
submit_time; a token's time is when the streamed output carrying it reached this process's event loop. Tokens that
arrive together share that time. logits() is not offered (context logits need engine-build options).

Options (opts): tensor_parallel_size (1), max_batch_size, max_num_tokens, max_seq_len, backend (the LLM API's
default when unset), extra (dict of further tensorrt_llm.LLM keyword arguments).
"""

from __future__ import annotations

import asyncio
from typing import Any

from adapters.base import GenRequest, GenResult, LLMClassAdapter, ModelSpec, now

INSTALL_HINT = "pip install tensorrt_llm  (NVIDIA's index; needs a CUDA GPU)"


def sampling_kwargs(req: GenRequest) -> dict[str, Any]:
    """GenRequest -> tensorrt_llm.SamplingParams keyword arguments (None = engine default, i.e. off)."""
    s = req.sampling
    kw: dict[str, Any] = dict(max_tokens=req.max_new_tokens, ignore_eos=bool(req.ignore_eos), detokenize=True)
    if s.temperature > 0:
        kw["temperature"] = float(s.temperature)
        if s.top_k > 0:
            kw["top_k"] = int(s.top_k)
        if s.top_p < 1.0:
            kw["top_p"] = float(s.top_p)
    else:
        kw["top_k"] = 1  # greedy: TensorRT-LLM's sampler takes the arg max with top_k 1
        kw["temperature"] = 1.0
    if s.seed is not None:
        kw["seed"] = int(s.seed)
    if req.stop_ids:
        kw["stop_token_ids"] = [int(i) for i in req.stop_ids]
    return kw


def llm_kwargs(model: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
    if model.synthetic or not model.path:
        raise ValueError(f"tensorrt_llm: {model.name!r} is not a checkpoint folder (synthetic presets are Anvil-only)")
    kw: dict[str, Any] = dict(model=str(model.path), dtype=model.dtype,
                              tensor_parallel_size=int(opts.get("tensor_parallel_size", 1)))
    for key in ("max_batch_size", "max_num_tokens", "max_seq_len"):
        if opts.get(key) is not None:
            kw[key] = int(opts[key])
    if opts.get("backend"):
        kw["backend"] = str(opts["backend"])
    kw.update(opts.get("extra") or {})
    return kw


class TensorRTLLMAdapter(LLMClassAdapter):
    name = "tensorrt_llm"
    package = "tensorrt_llm"
    install_hint = INSTALL_HINT
    llm_kwargs = staticmethod(llm_kwargs)

    async def _one(self, req: GenRequest, submit: float) -> GenResult:
        from tensorrt_llm import SamplingParams

        times: list[float] = []
        last = None
        try:
            async for out in self.llm.generate_async(list(req.prompt_ids), SamplingParams(**sampling_kwargs(req)),
                                                     streaming=True):
                t = now()
                n_new = len(out.outputs[0].token_ids) - len(times)
                times += [t] * max(n_new, 0)
                last = out
        except Exception as exc:  # one failed request must not end the batch
            return GenResult(list(last.outputs[0].token_ids) if last else [], None, submit, times[0] if times else None,
                             times, "error", len(req.prompt_ids), error=f"{type(exc).__name__}: {exc}")
        comp = last.outputs[0] if last is not None else None
        ids = list(comp.token_ids) if comp is not None else []
        finish = "length" if comp is None or comp.finish_reason == "length" else "stop"
        return GenResult(ids, comp.text if comp is not None else None, submit, times[0] if times else None, times,
                         finish, len(req.prompt_ids))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if self.llm is None:
            raise RuntimeError("tensorrt_llm: load() first")

        async def run() -> list[GenResult]:
            submit = now()
            return list(await asyncio.gather(*(self._one(r, submit) for r in requests)))

        return asyncio.run(run())

    def close(self) -> None:
        if self.llm is not None and hasattr(self.llm, "shutdown"):
            self.llm.shutdown()
        self.llm = None
