"""TensorRT-LLM adapter without TensorRT-LLM: availability, request translation, streaming against a stand-in module."""

from __future__ import annotations

import sys
import types

import pytest

from adapters import base
from adapters.base import GenRequest, ModelSpec, Sampling
from adapters.tensorrt_llm import TensorRTLLMAdapter, llm_kwargs, sampling_kwargs


def test_not_installed_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    ok, why = TensorRTLLMAdapter.available()
    assert not ok and why.startswith("not installed: pip install tensorrt_llm")
    assert base.availability()["tensorrt_llm"] == (False, why)
    with pytest.raises(base.EngineNotAvailable, match="pip install tensorrt_llm"):
        TensorRTLLMAdapter().load(ModelSpec("tiny", "/nonexistent"))


def test_sampling_translation():
    greedy = sampling_kwargs(GenRequest([1, 2], 16))
    assert greedy["top_k"] == 1 and greedy["max_tokens"] == 16 and greedy["ignore_eos"] is True
    kw = sampling_kwargs(GenRequest([1], 4, ignore_eos=False, stop_ids=[7], sampling=Sampling(0.7, 0, 0.9, 3)))
    assert (kw["temperature"], kw["top_p"], kw["seed"], kw["stop_token_ids"]) == (0.7, 0.9, 3, [7])
    assert "top_k" not in kw and kw["ignore_eos"] is False
    llm = llm_kwargs(ModelSpec("m", "/models/m", dtype="float16"), {"tensor_parallel_size": 2, "max_seq_len": 4096})
    assert llm == {"model": "/models/m", "dtype": "float16", "tensor_parallel_size": 2, "max_seq_len": 4096}
    with pytest.raises(ValueError, match="synthetic"):
        llm_kwargs(ModelSpec("synthetic:llama-3-8b", None), {})


def test_generate_streams(monkeypatch, tmp_path):
    trt = types.ModuleType("tensorrt_llm")
    trt.__version__ = "0.0-fake"

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        async def generate_async(self, prompt, params, streaming=False):
            assert streaming and isinstance(prompt, list)
            if prompt == [0]:
                raise RuntimeError("engine failure")
            out = []
            for i in range(params.kw["max_tokens"]):
                out.append(prompt[-1] + i)
                comp = types.SimpleNamespace(token_ids=list(out), text="", finish_reason="length")
                yield types.SimpleNamespace(outputs=[comp])

        def shutdown(self):
            pass

    trt.LLM, trt.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    ad = TensorRTLLMAdapter()
    ad.load(ModelSpec("m", str(tmp_path)))
    res = ad.generate([GenRequest([3], 4), GenRequest([0], 2)])
    assert res[0].output_ids == [3, 4, 5, 6] and len(res[0].token_times) == 4 and res[0].finish_reason == "length"
    assert res[0].token_times == sorted(res[0].token_times)
    assert res[1].finish_reason == "error" and "engine failure" in res[1].error
    ad.close()
