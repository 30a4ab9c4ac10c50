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


def test_generator_grows_for_larger_batches_and_sequences(anvil):
    (r,) = anvil.generate([GenRequest(list(range(1, 300)), 4)])
    assert len(r.output_ids) == 4
    assert anvil.gen.max_seq_len >= 303
    res = anvil.generate([GenRequest([1, 2], 3) for _ in range(5)])
    assert len(res) == 5 and anvil.gen.max_batch_size >= 5


def test_stop_ids(anvil):
    (full,) = anvil.generate([GenRequest([3, 4, 5, 6], 16)])
    k = next(i for i, t in enumerate(full.output_ids) if i >= 2 and t not in full.output_ids[:i])
    (res,) = anvil.generate([GenRequest([3, 4, 5, 6], 16, stop_ids=[full.output_ids[k]])])
    assert res.output_ids == full.output_ids[: k + 1] and res.finish_reason == "stop"


def test_fixed_cache_size_from_options(ckpt):
    a = AnvilAdapter()
    a.load(ModelSpec(name=str(ckpt), path=str(ckpt)), {"max_batch_size": 2, "max_seq_len": 32})
    assert (a.gen.max_batch_size, a.gen.max_seq_len) == (2, 32)
    with pytest.raises(ValueError, match="exceeds the configured"):
        a.generate([GenRequest([1, 2, 3], 4) for _ in range(3)])


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


def test_fast_path_generator_gives_the_reference_tokens_on_cpu():
    """fast=True runs engine.fast_decode.FastGenerator (paged cache, torch ops on the CPU); fast=False the reference
    loop. Greedy tokens must be identical, and info() says which generator ran."""
    from adapters.anvil import AnvilAdapter
    from adapters.base import GenRequest, ModelSpec
    from engine.hub import resolve

    reqs = [GenRequest([1, 5, 9, 33, 70], 10), GenRequest([1, 200, 7], 10)]
    out = {}
    for fast in (True, False):
        a = AnvilAdapter()
        a.load(ModelSpec("tiny", str(resolve("tiny"))), {"fast": fast})
        out[fast] = [r.output_ids for r in a.generate(reqs)]
        assert a.info()["generator"] == ("FastGenerator" if fast else "Generator")
    assert out[True] == out[False]
    assert all(len(t) == 10 for t in out[True])
