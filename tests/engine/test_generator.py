"""Generator (the reference loop): packed mixed-length batches, stop ids, limits; plus a CUDA check (gpu marker)."""

from __future__ import annotations

import pytest
import torch

import engine
from engine import ops
from engine.generator import Completion, Generator, SamplingParams
from engine.presets import synthetic
from engine.testing import tiny_config
from tests.engine.conftest import random_prompts

CONFIG = tiny_config("mistral", sliding_window=8)


@pytest.fixture(scope="module")
def loaded(make_checkpoint):
    return engine.load(make_checkpoint(CONFIG, seed=11, std=0.15, norm_std=0.1))


@pytest.fixture(scope="module")
def gen(loaded):
    return Generator(loaded, max_batch_size=4, max_seq_len=96)


PROMPTS = random_prompts([5, 17, 1, 30], CONFIG.vocab_size, seed=12)


def test_batch_equals_one_by_one(gen):
    batch = gen.generate(PROMPTS, 24, SamplingParams())
    for p, out in zip(PROMPTS, batch, strict=True):
        assert gen.generate([p], 24, SamplingParams())[0] == out
        assert out.finish_reason == "length" and len(out.tokens) == 24


def test_logits_match_generation_first_token(gen):
    logits = gen.logits(PROMPTS)
    first = [o.tokens[0] for o in gen.generate(PROMPTS, 1, SamplingParams())]
    assert [int(x[-1].argmax()) for x in logits] == first
    assert [tuple(x.shape) for x in logits] == [(len(p), CONFIG.vocab_size) for p in PROMPTS]


def test_stop_ids(gen):
    free = gen.generate(PROMPTS, 20, SamplingParams())
    stop = free[0].tokens[4]  # sequence 0 stops at its first occurrence of this token
    outs = gen.generate(PROMPTS, 20, SamplingParams(), stop_ids={stop})
    for f, o in zip(free, outs, strict=True):
        if stop in f.tokens:
            cut = f.tokens.index(stop) + 1
            assert o == Completion(f.tokens[:cut], "stop")
        else:
            assert o == Completion(f.tokens, "length")


def test_no_stop_ids_means_full_length(gen):
    free = gen.generate(PROMPTS[:1], 12, SamplingParams())
    eos = free[0].tokens[0]
    out = gen.generate(PROMPTS[:1], 12, SamplingParams())[0]  # eos appears, but no stop ids were passed
    assert out.finish_reason == "length" and len(out.tokens) == 12 and out.tokens[0] == eos
    stopped = gen.generate(PROMPTS[:1], 12, SamplingParams(), stop_ids=[eos])[0]
    assert stopped == Completion([eos], "stop")


def test_limits(gen):
    with pytest.raises(ValueError, match="max_batch_size"):
        gen.generate([[1]] * 5, 4, SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[1] * 90], 8, SamplingParams())
    assert len(gen.generate([[1] * 90], 7, SamplingParams())[0].tokens) == 7  # exactly fits
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], 4, SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate([[CONFIG.vocab_size]], 4, SamplingParams())
    assert gen.generate([[1]], 0, SamplingParams()) == [Completion([], "length")]


def test_logits_more_prompts_than_batch(gen):
    prompts = random_prompts([3, 4, 5, 6, 7, 8], CONFIG.vocab_size, seed=13)
    many = gen.logits(prompts)
    assert len(many) == 6
    assert torch.equal(many[5], gen.logits(prompts[5:])[0])


def test_accepts_transformer_and_synthetic():
    loaded = synthetic("tiny-test-qwen2")
    a = Generator(loaded, 2, 32).generate([[1, 2], [3]], 5, SamplingParams())
    b = Generator(loaded.model, 2, 32).generate([[1, 2], [3]], 5, SamplingParams())
    assert a == b


def test_ops_backend_reports_reference_without_cuda():
    name, reason = ops.backend()
    assert name in ("cuda-ext", "reference") and reason
    if not torch.cuda.is_available():
        assert name == "reference"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu(make_checkpoint):
    path = make_checkpoint(CONFIG, seed=11, std=0.15, norm_std=0.1)
    cpu = Generator(engine.load(path), 4, 96)
    cuda = Generator(engine.load(path, device="cuda"), 4, 96)
    for a, b in zip(cpu.logits(PROMPTS), cuda.logits(PROMPTS), strict=True):
        assert (a - b).abs().max().item() < 1e-3
    assert cpu.generate(PROMPTS, 16, SamplingParams()) == cuda.generate(PROMPTS, 16, SamplingParams())
    s = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    assert cuda.generate(PROMPTS, 16, s) == cuda.generate(PROMPTS, 16, s)
    bf16 = Generator(engine.load(path, dtype="bfloat16", device="cuda"), 4, 96)
    for a, b in zip(cpu.logits(PROMPTS), bf16.logits(PROMPTS), strict=True):
        assert (a - b).abs().max().item() < 0.25 * a.abs().max().item()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_head_dim_64_fast_ops_match_cpu(make_checkpoint, dtype):
    """head_dim 64 in half precision: the shapes the CUDA extension takes (when it is built)."""
    config = tiny_config("mistral", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, sliding_window=8)
    path = make_checkpoint(config, seed=5, std=0.05)
    cpu = Generator(engine.load(path), 4, 96)
    cuda = Generator(engine.load(path, dtype=dtype, device="cuda"), 4, 96)
    for a, b in zip(cpu.logits(PROMPTS), cuda.logits(PROMPTS), strict=True):
        assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
    greedy = cuda.generate(PROMPTS, 16, SamplingParams())
    assert [len(o.tokens) for o in greedy] == [16] * 4
    assert [o.tokens[0] for o in greedy] == [int(x[-1].argmax()) for x in cuda.logits(PROMPTS)]
