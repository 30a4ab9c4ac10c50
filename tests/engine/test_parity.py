"""Parity with HF transformers in float32 on CPU: logits at every position and 64 greedy tokens, per family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import engine
from engine.generator import Generator, SamplingParams
from engine.testing import LLAMA3_SCALING_SMALL, tiny_config
from tests.engine.conftest import hf_model, random_prompts

pytest.importorskip("transformers")

# eos_token_ids=() so HF generate never stops early; weights scaled up (std 0.15) so greedy is not a flat tie.
VARIANTS = {
    "llama-untied": tiny_config("llama", eos_token_ids=()),
    "llama3-rope-scaling-tied": tiny_config(
        "llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING_SMALL, tie_word_embeddings=True, eos_token_ids=()
    ),
    "mistral-window16-head-dim-32": tiny_config("mistral", sliding_window=16, head_dim=32, eos_token_ids=()),
    "qwen2-bias-tied": tiny_config("qwen2", tie_word_embeddings=True, eos_token_ids=()),
    "qwen2-bias-window-layer1": tiny_config("qwen2", sliding_window=16, sliding_layers=(1,), eos_token_ids=()),
}
LENGTHS = [1, 7, 23, 40]  # mixed lengths, two longer than the sliding window
NEW_TOKENS = 64
TOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, make_checkpoint):
    config = VARIANTS[request.param]
    path = make_checkpoint(config, seed=1, std=0.15, norm_std=0.1)
    loaded = engine.load(path)
    assert loaded.config == config
    return loaded, hf_model(path)


def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float()


def test_prefill_logits_every_position(pair):
    loaded, hf = pair
    prompts = random_prompts(LENGTHS, loaded.config.vocab_size, seed=2)
    gen = Generator(loaded, max_batch_size=len(prompts), max_seq_len=128)
    batched = gen.logits(prompts)  # one packed, mixed-length batch
    alone = gen.logits([prompts[-1]])[0]
    for prompt, ours in zip(prompts, batched, strict=True):
        ref = hf_logits(hf, prompt)
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        assert (ours - ref).abs().max().item() < TOL
    assert (alone - hf_logits(hf, prompts[-1])).abs().max().item() < TOL


def test_decode_logits_teacher_forced(pair):
    """Prefill the prompts, then feed known tokens one step at a time; every decode step matches HF."""
    loaded, hf = pair
    c = loaded.config
    prompts = random_prompts([5, 18, 11], c.vocab_size, seed=3)
    follow = random_prompts([24, 24, 24], c.vocab_size, seed=4)
    gen = Generator(loaded, max_batch_size=3, max_seq_len=64)
    rows = [0, 1, 2]
    with torch.inference_mode():
        gen._forward(rows, [0, 0, 0], prompts, all_logits=False)  # the one forward, over the paged cache
        steps = [gen._forward(rows, [len(p) + j for p in prompts], [[f[j]] for f in follow], all_logits=False)
                 for j in range(24)]  # fmt: skip
    for b, (p, f) in enumerate(zip(prompts, follow, strict=True)):
        ref = hf_logits(hf, p + f)[len(p) : len(p) + 24]
        ours = torch.stack([s[b] for s in steps])
        assert (ours - ref).abs().max().item() < TOL


def test_greedy_64_tokens_match_hf_generate(pair):
    loaded, hf = pair
    prompts = random_prompts([3, 20, 9], loaded.config.vocab_size, seed=5)
    gen = Generator(loaded, max_batch_size=4, max_seq_len=128)
    outs = gen.generate(prompts, NEW_TOKENS, SamplingParams())
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.finish_reason == "length"
        assert out.tokens == ref[0, len(prompt) :].tolist()
        assert len(set(out.tokens)) > 4  # not a degenerate repeat of one token


def test_sliding_window_changes_long_prompts(make_checkpoint):
    """Guard that the window tests above are meaningful: without the window the logits past it differ."""
    config = VARIANTS["mistral-window16-head-dim-32"]
    path = make_checkpoint(config, seed=1, std=0.15, norm_std=0.1)
    windowed = engine.load(path)
    full = engine.load(path)
    full.model = type(full.model).from_state_dict(
        dataclasses.replace(config, sliding_window=0), dict(windowed.model.state_dict())
    )
    prompt = random_prompts([40], config.vocab_size, seed=6)
    a = Generator(windowed, 1, 64).logits(prompt)[0]
    b = Generator(full, 1, 64).logits(prompt)[0]
    assert torch.equal(a[:16], b[:16])
    assert (a[16:] - b[16:]).abs().max().item() > 1e-3
