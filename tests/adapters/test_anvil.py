"""Anvil adapter: the contract on a random tiny checkpoint (CPU), and parity with the hf adapter on it."""

from __future__ import annotations

import pytest

from adapters.anvil import AnvilAdapter
from adapters.base import GenRequest, ModelSpec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from engine.testing import tiny_config, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-anvil"), tiny_config("llama"), seed=3, std=0.1)


@pytest.fixture(scope="module")
def anvil(ckpt):
    a = AnvilAdapter()
    a.load(ModelSpec(name=str(ckpt), path=str(ckpt)))
    yield a
    a.close()


def test_available_reports_version():
    ok, version = AnvilAdapter.available()
    assert ok and version.startswith("anvil ")


def test_greedy_batch_lengths_and_times(anvil):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    res = anvil.generate([GenRequest(p, 10) for p in prompts])
    for p, r in zip(prompts, res, strict=True):
        assert len(r.output_ids) == 10 and len(r.token_times) == 10 and r.finish_reason == "length"
        assert r.prompt_tokens == len(p) and r.first_token_time >= r.submit_time
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:], strict=False))
        (single,) = anvil.generate([GenRequest(p, 10)])
        assert single.output_ids == r.output_ids
    assert anvil.info()["ops_backend"] in ("reference", "cuda-ext", "triton")
    assert anvil.info()["core"]["scheduler"]["running"] == 0


def test_long_prompt_and_larger_batches(anvil):
    (r,) = anvil.generate([GenRequest(list(range(1, 300)), 4)])
    assert len(r.output_ids) == 4
    res = anvil.generate([GenRequest([1, 2], 3) for _ in range(5)])
    assert len(res) == 5 and all(len(x.output_ids) == 3 for x in res)


def test_each_request_keeps_its_own_sampling_stop_and_length(anvil):
    """Today's batch no longer takes request 0's settings for everyone."""
    from adapters.base import Sampling

    p = [3, 4, 5, 6]
    (greedy,) = anvil.generate([GenRequest(p, 12)])
    stop = greedy.output_ids[5]
    reqs = [GenRequest(p, 12, sampling=Sampling(temperature=1.0, seed=4)), GenRequest(p, 12, stop_ids=[stop]),
            GenRequest(p, 3)]
    res = anvil.generate(reqs)
    (alone,) = anvil.generate([reqs[0]])
    assert res[0].output_ids == alone.output_ids and res[0].output_ids != greedy.output_ids
    cut = greedy.output_ids.index(stop) + 1
    assert res[1].output_ids == greedy.output_ids[:cut] and res[1].finish_reason == "stop"
    assert res[2].output_ids == greedy.output_ids[:3] and res[2].finish_reason == "length"


def test_stop_ids(anvil):
    (full,) = anvil.generate([GenRequest([3, 4, 5, 6], 16)])
    k = next(i for i, t in enumerate(full.output_ids) if i >= 2 and t not in full.output_ids[:i])
    (res,) = anvil.generate([GenRequest([3, 4, 5, 6], 16, stop_ids=[full.output_ids[k]])])
    assert res.output_ids == full.output_ids[: k + 1] and res.finish_reason == "stop"


def test_engine_options_from_the_suite(ckpt):
    a = AnvilAdapter()
    a.load(ModelSpec(name=str(ckpt), path=str(ckpt)), {"max_num_seqs": 2, "max_model_len": 32, "prefill_chunk": 3})
    assert a.llm.config.max_num_seqs == 2 and a.info()["core"]["max_model_len"] == 32
    res = a.generate([GenRequest([1, 2, 3, 4, 5], 4) for _ in range(3)])  # 3 requests, 2 at a time
    assert [len(r.output_ids) for r in res] == [4, 4, 4]
    with pytest.raises(ValueError, match="^bogus: unknown engine option"):
        AnvilAdapter.validate_options({"bogus": 1})
    with pytest.raises(ValueError, match="^max_num_seqs"):
        AnvilAdapter.validate_options({"max_num_seqs": 0})


def test_synthetic_preset():
    a = AnvilAdapter()
    a.load(ModelSpec(name="synthetic:tiny-test", path=None))
    (res,) = a.generate([GenRequest([1, 2, 3], 4)])
    assert len(res.output_ids) == 4


def test_parity_with_hf(anvil, ckpt):
    pytest.importorskip("transformers")
    from adapters.hf import HFAdapter

    hf = HFAdapter()
    hf.load(ModelSpec(name=str(ckpt), path=str(ckpt)))
    prompt = [7, 1, 99, 300, 12, 5, 42, 8]
    a_logits, h_logits = anvil.logits(prompt), hf.logits(prompt)
    assert a_logits.shape == h_logits.shape == (8, 512)
    assert (a_logits - h_logits).abs().max() < 1e-4
    reqs = [GenRequest(prompt, 24), GenRequest(prompt[:3], 24)]
    assert [r.output_ids for r in anvil.generate(reqs)] == [r.output_ids for r in hf.generate(reqs)]


def test_core_gives_the_reference_loop_tokens_on_the_tiny_model():
    from engine import load
    from engine.generator import Generator
    from engine.hub import resolve

    reqs = [GenRequest([1, 5, 9, 33, 70], 10), GenRequest([1, 200, 7], 10)]
    a = AnvilAdapter()
    a.load(ModelSpec("tiny", str(resolve("tiny"))))
    got = [r.output_ids for r in a.generate(reqs)]
    ref = Generator(load(resolve("tiny")), 2, 64).generate([r.prompt_ids for r in reqs], 10)
    assert got == [c.tokens for c in ref] and a.info()["core"]["attention_backend"] == "torch"


def test_quant_from_the_model_entry_swaps_the_linears():
    from engine.hub import resolve

    a = AnvilAdapter()
    a.load(ModelSpec("tiny", str(resolve("tiny")), quant="rtn"))
    names = {type(m.method).__name__ for m in a.lm.model.modules() if hasattr(m, "method")}
    assert names == {"Int4LinearMethod", "UnquantizedLinearMethod"}  # every Linear but the lm_head
    assert type(a.lm.model.output.method).__name__ == "UnquantizedLinearMethod"
    (r,) = a.generate([GenRequest([1, 2, 3, 4, 5, 6], 8)])
    assert len(r.output_ids) == 8


def test_suite_model_quant_key_is_validated_and_refused_by_engines_that_cannot_apply_it(tmp_path):
    from harness.suite import SuiteError, parse

    text = """
[suite]
name = "q"
engines = ["anvil", "hf"]
[[models]]
name = "tiny"
quant = "{q}"
[[scenarios]]
type = "throughput"
batch = 1
prompt_len = 8
gen_len = 4
"""
    s = parse(text.replace("{q}", "awq"), "q.toml")
    assert s.models[0].quant == "awq" and s.models[0].spec.quant == "awq"
    with pytest.raises(SuiteError, match=r"models\[0\]\.quant"):
        parse(text.replace("{q}", "int3"), "q.toml")
    from adapters.hf import HFAdapter

    assert AnvilAdapter.supports_quant and not HFAdapter.supports_quant
