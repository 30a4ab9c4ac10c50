"""vLLM adapter without vLLM: availability report, request translation, the step loop against a stand-in module, and
the folder a synthetic model is served from (config.json + a word-level tokenizer.json, load_format="dummy")."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from adapters import base
from adapters.base import GenRequest, ModelSpec, Sampling
from adapters.vllm import VLLMAdapter, llm_kwargs, sampling_kwargs, synthetic_model_dir
from engine.presets import PRESETS


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
    with pytest.raises(ValueError, match="unknown synthetic preset 'nope'"):
        llm_kwargs(ModelSpec("synthetic:nope", None), {})


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


@pytest.mark.parametrize("preset", ["llama-3-8b", "mistral-7b"])
def test_synthetic_folder_has_the_presets_config_and_a_tokenizer_of_its_vocab(tmp_path, preset):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = PRESETS[preset]
    d = synthetic_model_dir(preset, "bfloat16", tmp_path)
    assert d == tmp_path / f"{preset}-bfloat16"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((d / "config.json").read_text()) == json.loads(json.dumps(dict(cfg.to_hf(), torch_dtype="bfloat16")))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg.vocab_size
    assert tok.encode("w5 w17").ids == [5, 17] and tok.decode([5, 17]) == "w5 w17"
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert len(fast) == cfg.vocab_size and fast.convert_ids_to_tokens(cfg.vocab_size - 1) == f"w{cfg.vocab_size - 1}"
    auto = AutoTokenizer.from_pretrained(str(d))  # what vLLM does with the folder
    assert len(auto) == cfg.vocab_size
    assert auto.bos_token_id == cfg.bos_token_id and auto.eos_token_id == cfg.eos_token_ids[0]
    assert auto.decode([7, cfg.eos_token_ids[0]], skip_special_tokens=True) == "w7"


def test_synthetic_folder_is_written_once_and_rewritten_when_the_config_changes(tmp_path):
    d = synthetic_model_dir("tiny-test", "float16", tmp_path)
    stamp = (d / "tokenizer.json").stat().st_mtime_ns
    assert synthetic_model_dir("tiny-test", "float16", tmp_path) == d
    assert (d / "tokenizer.json").stat().st_mtime_ns == stamp  # cached
    (d / "config.json").write_text("{}")
    synthetic_model_dir("tiny-test", "float16", tmp_path)
    assert json.loads((d / "config.json").read_text())["vocab_size"] == PRESETS["tiny-test"].vocab_size


def test_synthetic_model_reaches_vllm_with_dummy_weights_and_no_engine_subprocess(monkeypatch, tmp_path):
    vllm, inputs = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    ad = VLLMAdapter()
    ad.load(ModelSpec("synthetic:llama-3-8b", None, dtype="bfloat16", device="cuda"),
            {"cache_dir": str(tmp_path), "max_model_len": 4096})
    folder = str(tmp_path / "llama-3-8b-bfloat16")
    kw = ad.llm.kw
    assert kw["model"] == folder and kw["tokenizer"] == folder and kw["load_format"] == "dummy"
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] == 4096 and kw["enable_prefix_caching"] is False
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    (res,) = ad.generate([GenRequest([3, 4], 3)])  # token-id prompts go in as TokensPrompt
    assert ad.llm.llm_engine.reqs["anvil-0"][0] == [3, 4] and res.output_ids == [4, 5, 6]


def test_an_explicit_multiprocessing_setting_is_kept(monkeypatch, tmp_path):
    vllm, inputs = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    VLLMAdapter().load(ModelSpec("m", str(tmp_path)), {})
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


# --- SGLang (adapters/sglang.py): the same synthetic folder, sglang.Engine's streaming API against a stand-in ---

def _fake_sglang() -> types.ModuleType:
    """Just enough of sglang: Engine(**kw) with .loop and async_generate(stream=True) yielding cumulative output_ids,
    two tokens per chunk; prompts longer than 8 ids are aborted."""
    import asyncio

    sgl = types.ModuleType("sglang")
    sgl.__version__ = "0.5.11-fake"

    class Engine:
        def __init__(self, **kw):
            self.kw, self.loop, self.calls = kw, asyncio.new_event_loop(), []

        async def async_generate(self, input_ids=None, sampling_params=None, stream=False):
            self.calls.append((input_ids, sampling_params, stream))

            async def gen():
                n, out = sampling_params["max_new_tokens"], []
                if len(input_ids) > 8:
                    yield {"text": "", "output_ids": [], "meta_info": {"finish_reason": {"type": "abort",
                                                                                          "message": "too long"}}}
                    return
                while len(out) < n:
                    out += [input_ids[-1] + len(out) + j for j in range(min(2, n - len(out)))]
                    done = len(out) >= n
                    yield {"text": "x" * len(out), "output_ids": list(out),
                           "meta_info": {"finish_reason": {"type": "length", "length": n} if done else None}}
                    await asyncio.sleep(0)

            return gen()

        def shutdown(self):
            self.loop.close()

    sgl.Engine = Engine
    return sgl


def test_sglang_not_installed_is_reported(monkeypatch):
    from adapters.sglang import SGLangAdapter

    monkeypatch.setitem(sys.modules, "sglang", None)
    ok, why = SGLangAdapter.available()
    assert not ok and why.startswith("not installed: pip install sglang==0.5.11")
    assert base.availability()["sglang"] == (False, why)  # registered (adapters/__init__.py)


def test_sglang_synthetic_model_and_streamed_generate(monkeypatch, tmp_path):
    from adapters.sglang import SGLangAdapter
    from adapters.sglang import sampling_kwargs as sgl_sampling

    monkeypatch.setitem(sys.modules, "sglang", _fake_sglang())
    ad = SGLangAdapter()
    ad.load(ModelSpec("synthetic:llama-3-8b", None, dtype="bfloat16", device="cuda"),
            {"cache_dir": str(tmp_path), "context_length": 4096})
    folder = str(tmp_path / "llama-3-8b-bfloat16")
    kw = ad.llm.kw
    assert kw["model_path"] == folder and kw["tokenizer_path"] == folder and kw["load_format"] == "dummy"
    assert kw["dtype"] == "bfloat16" and kw["context_length"] == 4096 and kw["disable_radix_cache"] is True
    assert "attention_backend" not in kw  # SGLang's default (fa3 on Hopper) for bf16
    fp32 = SGLangAdapter.llm_kwargs(ModelSpec("synthetic:llama-3-8b", None, device="cuda"), {"cache_dir": str(tmp_path)})
    assert fp32["dtype"] == "float32" and fp32["attention_backend"] == "triton"  # fa3 has no fp32 kernels
    extra = {"cache_dir": str(tmp_path), "extra": {"attention_backend": "flashinfer"}}
    assert SGLangAdapter.llm_kwargs(ModelSpec("synthetic:llama-3-8b", None, device="cuda"), extra)[
        "attention_backend"] == "flashinfer"  # fmt: skip
    assert (tmp_path / "llama-3-8b-bfloat16" / "tokenizer.json").is_file()
    res = ad.generate([GenRequest([5], 5), GenRequest(list(range(20)), 3), GenRequest([10, 11], 2)])
    assert res[0].output_ids == [5, 6, 7, 8, 9] and res[0].finish_reason == "length" and len(res[0].token_times) == 5
    assert res[0].token_times[0] == res[0].token_times[1] <= res[0].token_times[2]  # a chunk's tokens share a time
    assert res[1].finish_reason == "error" and "too long" in res[1].error
    assert res[2].output_ids == [11, 12] and res[2].ttft is not None and res[2].ttft >= 0
    assert ad.llm.calls[0] == ([5], sgl_sampling(GenRequest([5], 5)), True)  # token ids, streamed
    greedy = sgl_sampling(GenRequest([1], 4, stop_ids=[7], sampling=Sampling(0.0, 0, 1.0, 3)))
    assert (greedy["temperature"], greedy["top_k"], greedy["sampling_seed"], greedy["stop_token_ids"]) == (0.0, -1, 3, [7])
    ad.close()
    assert ad.llm is None
