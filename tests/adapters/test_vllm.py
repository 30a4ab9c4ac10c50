"""vLLM adapter without vLLM: availability report, request translation, and the step loop against a stand-in module."""

from __future__ import annotations

import sys
import types

import pytest

from adapters import base
from adapters.base import GenRequest, ModelSpec, Sampling
from adapters.vllm import VLLMAdapter, llm_kwargs, sampling_kwargs


def test_not_installed_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    ok, why = VLLMAdapter.available()
    assert not ok and why.startswith("not installed: pip install vllm")
    assert base.availability()["vllm"] == (False, why)
    with pytest.raises(base.EngineNotAvailable, match="pip install vllm"):
        VLLMAdapter().load(ModelSpec("tiny", "/nonexistent"))


def test_sampling_translation():
    greedy = sampling_kwargs(GenRequest([1, 2], 16))
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["max_tokens"] == 16
    assert greedy["ignore_eos"] is True and "seed" not in greedy and "stop_token_ids" not in greedy
    kw = sampling_kwargs(GenRequest([1], 4, ignore_eos=False, stop_ids=[7], sampling=Sampling(0.7, 40, 0.9, 3)))
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["seed"], kw["stop_token_ids"]) == (0.7, 40, 0.9, 3, [7])
    assert kw["ignore_eos"] is False
    llm = llm_kwargs(ModelSpec("m", "/models/m", dtype="bfloat16"), {"max_model_len": 2048, "extra": {"quantization": "awq"}})
    assert llm["model"] == "/models/m" and llm["dtype"] == "bfloat16" and llm["max_model_len"] == 2048
    assert llm["quantization"] == "awq" and llm["enable_prefix_caching"] is False
    with pytest.raises(ValueError, match="synthetic"):
        llm_kwargs(ModelSpec("synthetic:llama-3-8b", None), {})


def _fake_vllm() -> tuple[types.ModuleType, types.ModuleType]:
    """Just enough of vllm: LLM.llm_engine with add_request / step / has_unfinished_requests; two tokens per step."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.0-fake"
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Engine:
        def __init__(self):
            self.reqs = {}

        def add_request(self, rid, prompt, params):
            if len(prompt["prompt_token_ids"]) > 8:
                raise ValueError("prompt too long")
            self.reqs[rid] = (prompt["prompt_token_ids"], params.kw, [])

        def has_unfinished_requests(self):
            return any(len(out) < kw["max_tokens"] for _, kw, out in self.reqs.values())

        def step(self):
            res = []
            for rid, (prompt, kw, out) in self.reqs.items():
                if len(out) >= kw["max_tokens"]:
                    continue
                out += [prompt[-1] + len(out) + j for j in range(min(2, kw["max_tokens"] - len(out)))]
                comp = types.SimpleNamespace(token_ids=list(out), text="x" * len(out), finish_reason="length")
                res.append(types.SimpleNamespace(request_id=rid, outputs=[comp], finished=len(out) >= kw["max_tokens"]))
            return res

    class LLM:
        def __init__(self, **kw):
            self.kw, self.llm_engine = kw, Engine()

    vllm.LLM, vllm.SamplingParams, vllm.inputs = LLM, SamplingParams, inputs
    return vllm, inputs


def test_generate_through_step_loop(monkeypatch, tmp_path):
    vllm, inputs = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    ad = VLLMAdapter()
    ad.load(ModelSpec("m", str(tmp_path)), {"enforce_eager": True})
    assert ad.info()["enforce_eager"] is True
    res = ad.generate([GenRequest([5], 5), GenRequest(list(range(20)), 3), GenRequest([10, 11], 2)])
    assert res[0].output_ids == [5, 6, 7, 8, 9] and res[0].finish_reason == "length" and len(res[0].token_times) == 5
    assert res[0].token_times[0] == res[0].token_times[1] <= res[0].token_times[2]  # two tokens per step share a time
    assert res[1].finish_reason == "error" and "prompt too long" in res[1].error
    assert res[2].output_ids == [11, 12] and res[2].ttft is not None and res[2].ttft >= 0
