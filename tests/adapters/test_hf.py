"""HF transformers adapter on a random tiny Llama checkpoint (CPU): greedy lengths, timing, stops, logits, presets."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from adapters.base import GenRequest, ModelSpec, Sampling  # noqa: E402
from adapters.hf import HFAdapter  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from engine.testing import tiny_config, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-hf"), tiny_config("llama"), seed=3, std=0.1)


@pytest.fixture(scope="module")
def hf(ckpt):
    a = HFAdapter()
    a.load(ModelSpec(name=str(ckpt), path=str(ckpt)))
    yield a
    a.close()


def test_available_reports_version():
    ok, version = HFAdapter.available()
    assert ok and version.startswith("transformers ")


def test_greedy_batch_has_exact_lengths_times_and_matches_single_requests(hf):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]  # different lengths: left padding must not leak
    res = hf.generate([GenRequest(p, 12) for p in prompts])
    for p, r in zip(prompts, res, strict=True):
        assert len(r.output_ids) == 12 and r.finish_reason == "length" and r.prompt_tokens == len(p)
        assert len(r.token_times) == 12 and r.first_token_time == r.token_times[0] >= r.submit_time
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:], strict=False))
        assert r.ttft > 0 and len(r.itl) == 11
        (single,) = hf.generate([GenRequest(p, 12)])
        assert single.output_ids == r.output_ids


def test_stop_ids_end_the_sequence_with_the_stop_token(hf):
    (full,) = hf.generate([GenRequest([3, 4, 5, 6], 16)])
    k = next(i for i, t in enumerate(full.output_ids) if i >= 2 and t not in full.output_ids[:i])
    (res,) = hf.generate([GenRequest([3, 4, 5, 6], 16, stop_ids=[full.output_ids[k]])])
    assert res.output_ids == full.output_ids[: k + 1] and res.finish_reason == "stop"
    assert len(res.token_times) == k + 1


def test_logits_shape_and_agreement_with_greedy(hf):
    prompt = [9, 8, 7, 6, 5]
    logits = hf.logits(prompt)
    assert tuple(logits.shape) == (5, 512) and logits.dtype.is_floating_point and logits.device.type == "cpu"
    (res,) = hf.generate([GenRequest(prompt, 1)])
    assert int(logits[-1].argmax()) == res.output_ids[0]


def test_seeded_sampling_is_reproducible(hf):
    req = GenRequest([1, 2, 3], 8, sampling=Sampling(temperature=1.0, top_k=50, seed=7))
    assert hf.generate([req])[0].output_ids == hf.generate([req])[0].output_ids


def test_synthetic_preset_builds_random_model():
    a = HFAdapter()
    a.load(ModelSpec(name="synthetic:tiny-test", path=None))
    (res,) = a.generate([GenRequest([1, 2, 3], 4)])
    assert len(res.output_ids) == 4 and res.text is None
    a.close()


def test_unknown_option_is_an_error(ckpt):
    with pytest.raises(ValueError, match="unknown hf options: warp"):
        HFAdapter().load(ModelSpec(name=str(ckpt), path=str(ckpt)), {"warp": 9})
