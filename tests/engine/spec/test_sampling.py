"""Speculative sampling is lossless in distribution: the rejection rule alone against a fixed p and q, and the
whole engine (draft model with its own q; lookahead's deterministic drafts) drawing the 2nd and 3rd tokens of a
random 16-token-vocabulary model, against the exact softmax, by Pearson's chi-square test at significance 0.001
(a correct sampler fails it once in 1000 seeds; the seeds are fixed, so the outcome is too). Seeded runs repeat."""

from __future__ import annotations

import pytest
import torch

import engine
from engine import LLM, EngineConfig, SamplingParams
from engine.spec.verify import rejection_accept
from engine.testing import tiny_config
from tests.engine.spec._helpers import chi_square_p, run

ALPHA = 1e-3
V = 16
PROMPT = [3, 5, 3, 5, 9, 3, 11, 5]


def test_rejection_rule_emits_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(2, 8, generator=g) * 1.5
    q = torch.softmax(torch.randn(8, generator=g) * 1.5, dim=-1)
    p = torch.softmax(p_logits[0], dim=-1)
    n, counts, accepted = 20000, torch.zeros(8), 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        a, t = rejection_accept(p_logits, [x], q[None], 1.0, 0, 1.0, gen)
        counts[x if a == 1 else t] += 1
        accepted += a
    pval, df = chi_square_p(counts, p)
    assert pval > ALPHA, (pval, df)
    assert abs(accepted / n - torch.minimum(p, q).sum().item()) < 0.02  # P(accept) = sum min(p, q)


@pytest.fixture(scope="module")
def small(make_checkpoint):
    """A random 16-token model with peaked distributions (std 0.5) and a different random draft of the same
    vocabulary."""
    c = tiny_config("llama", vocab_size=V, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                    max_position_embeddings=64)  # fmt: skip
    target = engine.load(make_checkpoint(c, seed=3, std=0.5))
    draft = make_checkpoint(c, seed=4, std=0.5)
    return target, str(draft)


def exact_joint(target, temperature: float) -> torch.Tensor:
    """P(t2, t3) [V*V], marginal over t1, from the target's softmax (one forward per prefix)."""
    llm = LLM(target, EngineConfig(max_num_seqs=4, max_model_len=64))

    def probs(prefix):
        return torch.softmax(llm.logits(prefix)[-1].double() / temperature, dim=-1)

    joint = torch.zeros(V, V, dtype=torch.float64)
    p1 = probs(PROMPT)
    for t1 in range(V):
        p2 = probs(PROMPT + [t1])
        for t2 in range(V):
            joint[t2] += p1[t1] * p2[t2] * probs(PROMPT + [t1, t2])
    return joint.flatten()


@pytest.mark.parametrize("spec", ["draft", "lookahead"])
def test_engine_samples_match_the_target_softmax(small, spec):
    target, draft = small
    temperature = 0.9
    n, per = 6000, 500
    llm = LLM(target, EngineConfig(max_num_seqs=per, max_model_len=64, spec=spec, num_spec_tokens=2,
                                   draft_model=draft if spec == "draft" else None))  # fmt: skip
    counts = torch.zeros(V * V)
    for b in range(n // per):
        sp = [SamplingParams(temperature=temperature, seed=b * per + i) for i in range(per)]
        got, _ = run(llm, [PROMPT] * per, 4, sp)
        for t in got:
            counts[t[1] * V + t[2]] += 1
    info = llm.info()["spec"]
    assert 0 < info["accepted"] < info["proposed"]  # both branches of the rule were taken
    pval, df = chi_square_p(counts, exact_joint(target, temperature))
    assert pval > ALPHA, (pval, df)


def test_seeded_speculative_sampling_repeats(small):
    target, draft = small
    sp = [SamplingParams(temperature=1.0, top_k=8, seed=s) for s in range(6)] + [SamplingParams()]

    def once():
        llm = LLM(target, EngineConfig(max_num_seqs=8, max_model_len=64, spec="draft", num_spec_tokens=3,
                                       draft_model=draft))  # fmt: skip
        return run(llm, [PROMPT, PROMPT[:3]] * 3 + [PROMPT], 20, sp)[0]

    a, b = once(), once()
    assert a == b
    assert len({tuple(t) for t in a[:6:2]}) > 1  # different seeds, different draws
