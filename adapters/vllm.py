"""vLLM adapter: vllm.LLM in process, token-id prompts, per-token times from the engine's step loop.

Written against vLLM's documented Python API (vllm.LLM, vllm.SamplingParams, vllm.inputs.TokensPrompt, LLM.llm_engine
.add_request / .step / .has_unfinished_requests, RequestOutput.outputs[0].token_ids). vLLM cannot be installed on
the CI machine (it needs a GPU), so tests cover the request translation and the availability report only.

Conventions: all requests of a generate() call are added before the first step (one continuous batch) and share
its submit_time; a token's time is when the step that produced it returned (outputs are on the host then). When a
step yields several tokens for a request (multi-step / speculative decoding), they share that step's time.
logits() is not offered: vLLM returns top-k logprobs, not full logits.

Options (opts): gpu_memory_utilization (0.9), max_model_len, enforce_eager (False), tensor_parallel_size (1),
seed (0), max_num_seqs, enable_prefix_caching (False: every request pays its own prefill), extra (dict of further
vllm.LLM keyword arguments).
"""

from __future__ import annotations

from typing import Any

from adapters.base import GenRequest, GenResult, LLMClassAdapter, ModelSpec, now

INSTALL_HINT = "pip install vllm  (needs a CUDA GPU)"


def sampling_kwargs(req: GenRequest) -> dict[str, Any]:
    """GenRequest -> vllm.SamplingParams keyword arguments."""
    s = req.sampling
    kw: dict[str, Any] = dict(n=1, max_tokens=req.max_new_tokens, temperature=float(s.temperature), top_p=float(s.top_p),
                              top_k=int(s.top_k) if s.top_k > 0 else -1,  # -1 = off in every vLLM release
                              min_p=0.0, repetition_penalty=1.0, ignore_eos=bool(req.ignore_eos), detokenize=True,
                              skip_special_tokens=True)
    if s.seed is not None:
        kw["seed"] = int(s.seed)
    if req.stop_ids:
        kw["stop_token_ids"] = [int(i) for i in req.stop_ids]
    return kw


def llm_kwargs(model: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec + opts -> vllm.LLM keyword arguments."""
    if model.synthetic or not model.path:
        raise ValueError(f"vllm: {model.name!r} is not a checkpoint folder (synthetic presets are Anvil-only)")
    kw: dict[str, Any] = dict(model=str(model.path), dtype=model.dtype, seed=int(opts.get("seed", 0)),
                              gpu_memory_utilization=float(opts.get("gpu_memory_utilization", 0.9)),
                              enforce_eager=bool(opts.get("enforce_eager", False)),
                              tensor_parallel_size=int(opts.get("tensor_parallel_size", 1)),
                              enable_prefix_caching=bool(opts.get("enable_prefix_caching", False)))
    for key in ("max_model_len", "max_num_seqs"):
        if opts.get(key) is not None:
            kw[key] = int(opts[key])
    kw.update(opts.get("extra") or {})
    return kw


class VLLMAdapter(LLMClassAdapter):
    name = "vllm"
    package = "vllm"
    install_hint = INSTALL_HINT
    llm_kwargs = staticmethod(llm_kwargs)

    def __init__(self) -> None:
        super().__init__()
        self._next_id = 0

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if self.llm is None:
            raise RuntimeError("vllm: load() first")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        ids: list[str] = []
        results: dict[str, GenResult] = {}
        submit = now()
        for req in requests:
            rid = f"anvil-{self._next_id}"
            self._next_id += 1
            ids.append(rid)
            try:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(req.prompt_ids)),
                                   SamplingParams(**sampling_kwargs(req)))
            except Exception as exc:  # e.g. prompt longer than max_model_len: that request fails, the rest run
                results[rid] = GenResult([], None, submit, None, [], "error", len(req.prompt_ids),
                                         error=f"{type(exc).__name__}: {exc}")
        times: dict[str, list[float]] = {rid: [] for rid in ids}
        final: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            outs = engine.step()
            t = now()
            for out in outs:
                comp = out.outputs[0]
                n_new = len(comp.token_ids) - len(times[out.request_id])
                times[out.request_id] += [t] * n_new
                if out.finished:
                    final[out.request_id] = out
        for rid, req in zip(ids, requests, strict=True):
            if rid in results:
                continue
            out = final.get(rid)
            if out is None:
                results[rid] = GenResult([], None, submit, None, [], "error", len(req.prompt_ids),
                                         error="request did not finish")
                continue
            comp, tt = out.outputs[0], times[rid]
            finish = "length" if comp.finish_reason == "length" else "stop"
            results[rid] = GenResult(list(comp.token_ids), comp.text, submit, tt[0] if tt else None, tt, finish,
                                     len(req.prompt_ids))
        return [results[rid] for rid in ids]

    def close(self) -> None:
        self.llm = None  # vLLM frees its workers when the LLM object is collected
