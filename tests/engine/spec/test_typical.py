"""Typical acceptance (Medusa section 2.3.1, `spec_acceptance = "typical"`): the rule on hand-built distributions
against a threshold computed here independently (entropy by its definition), the token after the accepted drafts
drawn from p at that row exactly as the plain sampler draws, the engine with Medusa on the trained tiny model
(seeded runs repeat; acceptance against the lossless rule on the same prompts), and the config's validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import engine
from engine import LLM, EngineConfig, SamplingParams
from engine.sampling import make_generator, sample
from engine.spec.verify import target_probs, typical_accept
from tests.engine.spec._helpers import chi_square_p, code_prompts, run

REPO = Path(__file__).resolve().parents[3]
EPS, DELTA = 0.09, 0.3
V = 64


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def threshold(p: list[float], eps: float = EPS, delta: float = DELTA) -> float:
    return min(eps, delta * math.exp(-entropy(p)))


def dist(px: float, x: int, flat: bool) -> list[float]:
    """A V-token distribution with p(x) = px; the rest on one other token (peaked) or spread evenly (flat)."""
    rest = [(1.0 - px) / (V - 1)] * (V - 1) if flat else [1.0 - px] + [0.0] * (V - 2)
    return rest[:x] + [px] + rest[x:]


def logits_of(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax at temperature 1 is each row (a zero probability: -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def accept(rows, drafts, eps=EPS, delta=DELTA, seed=0, temperature=1.0, top_k=0, top_p=1.0):
    gen = torch.Generator().manual_seed(seed)
    return typical_accept(logits_of(rows), drafts, temperature, top_k, top_p, gen, eps, delta)


def test_above_the_threshold_accepted_below_rejected():
    """Peaked rows (low entropy): the threshold is epsilon, 0.09; 0.12 passes it, 0.06 does not."""
    hi, lo = dist(0.12, 5, flat=False), dist(0.06, 5, flat=False)
    assert threshold(hi) == EPS and threshold(lo) == EPS
    assert accept([hi, hi], [5])[0] == 1
    assert accept([lo, hi], [5])[0] == 0


def test_a_flat_distribution_lowers_the_threshold():
    """p(x) = 0.05 is rejected under a peaked row (threshold epsilon) but accepted under a flat one, where
    delta * exp(-H) ~ 0.005 is the binding term."""
    peaked, flat = dist(0.05, 9, flat=False), dist(0.05, 9, flat=True)
    t = threshold(flat)
    assert t < 0.05 < EPS == threshold(peaked) and t == DELTA * math.exp(-entropy(flat))
    assert accept([peaked, flat], [9])[0] == 0
    assert accept([flat, flat], [9])[0] == 1
    # the entropy term decides between two drafts of one flat row: just above and just below delta * exp(-H)
    assert accept([flat, flat], [9], delta=0.05 / math.exp(-entropy(flat)) * 0.99)[0] == 1
    assert accept([flat, flat], [9], delta=0.05 / math.exp(-entropy(flat)) * 1.01)[0] == 0
    # a large delta leaves epsilon binding even on the flat row
    assert accept([flat, flat], [9], eps=0.049, delta=10.0)[0] == 1
    assert accept([flat, flat], [9], eps=0.051, delta=10.0)[0] == 0


def test_the_chain_stops_at_the_first_rejection():
    ok, bad = dist(0.3, 2, flat=False), dist(0.3, 3, flat=False)  # token 2: p = 0.3 in ok, 0 in bad
    rows = [ok, ok, bad, ok, ok]
    drafts = [2, 2, 2, 2]
    want = next((j for j, (r, x) in enumerate(zip(rows, drafts, strict=False)) if not r[x] > threshold(r)), 4)
    assert want == 2 and accept(rows, drafts)[0] == 2
    assert accept([ok] * 5, drafts)[0] == 4  # all accepted: the token comes from the bonus row
    assert accept([bad] + [ok] * 4, drafts)[0] == 0


def test_the_threshold_uses_the_warped_distribution():
    """Temperature, top-k and top-p shape p before the rule, as the plain sampler's: each of the 8 likeliest tokens
    of random rows as a one-draft chain, against the threshold of target_probs with entropy by its definition."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, V, generator=g) * 2.0
    seen = set()
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 8, 1.0), (0.9, 0, 0.8), (0.5, 16, 0.9)]:
        p = target_probs(logits, temperature, top_k, top_p).double().tolist()
        for j in range(6):
            for x in logits[j].topk(8).indices.tolist():
                want = p[j][x] > threshold(p[j])
                gen = torch.Generator().manual_seed(1)
                assert typical_accept(logits[j : j + 2], [x], temperature, top_k, top_p, gen, EPS, DELTA)[0] == want
                seen.add((want, threshold(p[j]) < EPS))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}  # both outcomes under both terms
    # top-k removes a draft whose p would pass: it is then rejected
    row = dist(0.2, 7, flat=False)
    row[8] = row[0] = 0.4  # 7 is third of three
    assert accept([row, row], [7])[0] == 1 and accept([row, row], [7], top_k=2)[0] == 0


def test_the_next_token_is_the_plain_samplers_draw_at_that_row():
    """The draw takes no other random number: with the same seed it is sample() on the first unaccepted row; a
    one-hot-ish row gives its token; over many seeds it follows p (chi-square, p > 0.001)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, V, generator=g) * 3.0
    p = target_probs(logits, 0.8, 0, 0.95)
    drafts = [int(p[0].argmax()), int(p[1].argmin())]  # the first passes, the second (p = 0 after top-p) fails
    a, t = typical_accept(logits, drafts, 0.8, 0, 0.95, make_generator(7, "cpu"), EPS, DELTA)
    assert a == 1
    assert t == int(sample(logits[1:2], 0.8, 0, 0.95, make_generator(7, "cpu")))
    assert (a, t) == typical_accept(logits, drafts, 0.8, 0, 0.95, make_generator(7, "cpu"), EPS, DELTA)
    sharp = torch.zeros(3, V)
    sharp[2, 11] = 40.0
    assert accept(torch.softmax(sharp, -1).tolist(), [0, 0], eps=0.01, delta=10.0)[0] == 2
    assert typical_accept(sharp, [0, 0], 1.0, 0, 1.0, None, 0.01, 10.0) == (2, 11)
    n, counts = 4000, torch.zeros(V)
    gen = make_generator(3, "cpu")
    for _ in range(n):
        counts[typical_accept(logits, drafts, 0.8, 0, 0.95, gen, EPS, DELTA)[1]] += 1
    pval, df = chi_square_p(counts, p[1])
    assert pval > 1e-3, (pval, df)


# ---------------------------------------------------------------- the engine: Medusa on tiny
N_NEW = 64
LENS = [40, 64, 25, 90, 50, 33, 70, 45, 80, 20, 55, 60]


@pytest.fixture(scope="module")
def tiny():
    if not (REPO / "models" / "tiny" / "medusa" / "config.json").is_file():
        pytest.skip("models/tiny (with medusa/) is not in this checkout")
    return engine.load("tiny")


def medusa(tiny, acceptance: str) -> LLM:
    return LLM(tiny, EngineConfig(max_num_seqs=16, max_model_len=512, max_num_batched_tokens=1024, spec="medusa",
                                  num_spec_tokens=3, draft_model=str(REPO / "models" / "tiny"),
                                  spec_acceptance=acceptance))  # fmt: skip


def sampled(tiny, acceptance: str):
    """(tokens per prompt, spec info) of 12 held-out prompts sampled at temperature 0.7 with seeds 0..11."""
    prompts = code_prompts(tiny.tokenizer, LENS)
    sp = [SamplingParams(temperature=0.7, seed=s) for s in range(len(prompts))]
    llm = medusa(tiny, acceptance)
    return run(llm, prompts, N_NEW, sp)[0], llm.info()["spec"]


@pytest.fixture(scope="module")
def rates(tiny):
    return {rule: sampled(tiny, rule) for rule in ("rejection", "typical")}


def test_typical_medusa_runs_repeats_and_reports_its_rule(tiny, rates):
    toks, info = rates["typical"]
    assert all(len(t) == N_NEW for t in toks)
    assert info["method"] == "medusa" and info["acceptance"] == "typical"
    assert (info["typical_epsilon"], info["typical_delta"]) == (EPS, DELTA)
    assert 0 < info["accepted"] <= info["proposed"]
    assert sampled(tiny, "typical")[0] == toks  # same seeds, same tokens
    assert rates["rejection"][1]["acceptance"] == "rejection" and "typical_epsilon" not in rates["rejection"][1]


def test_typical_accepts_at_least_as_often_as_rejection(rates):
    """~1,800 drafts each (0.073 vs 0.054 here; seed sets 100..400 gave 0.08-0.11 vs 0.04-0.06). A smaller run
    (6 prompts x 40 tokens, ~300 drafts) came out the other way, 0.044 vs 0.060: sampled trajectories differ."""
    rej, typ = rates["rejection"][1]["acceptance_rate"], rates["typical"][1]["acceptance_rate"]
    print(f"medusa k=3, temperature 0.7: acceptance rejection {rej:.3f}, typical {typ:.3f}")
    assert typ >= rej, (typ, rej)


def test_greedy_requests_are_unaffected(tiny):
    prompts = code_prompts(tiny.tokenizer, [30, 70])
    plain = LLM(tiny, EngineConfig(max_num_seqs=8, max_model_len=512)).generate(prompts, max_tokens=24)
    assert run(medusa(tiny, "typical"), prompts, 24)[0] == [o.tokens for o in plain]


# ---------------------------------------------------------------- configuration
def test_config_defaults_and_options():
    c = EngineConfig()
    assert (c.spec_acceptance, c.typical_epsilon, c.typical_delta) == ("rejection", 0.09, 0.3)
    c = EngineConfig.from_options({"spec": "ngram", "spec_acceptance": "typical", "typical_epsilon": 0.2,
                                   "typical_delta": 1})  # fmt: skip
    assert (c.spec_acceptance, c.typical_epsilon, c.typical_delta) == ("typical", 0.2, 1)
    assert EngineConfig(typical_epsilon=1.0).typical_epsilon == 1.0


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"spec_acceptance": "tree"}, r"^spec_acceptance: expected one of rejection, typical, got 'tree'$"),
        ({"spec_acceptance": None}, r"^spec_acceptance: expected one of rejection, typical, got None$"),
        ({"typical_epsilon": 0.0}, r"^typical_epsilon: expected a number in \(0, 1\], got 0\.0$"),
        ({"typical_epsilon": 1.5}, r"^typical_epsilon: expected a number in \(0, 1\], got 1\.5$"),
        ({"typical_epsilon": float("nan")}, r"^typical_epsilon: expected a number in \(0, 1\], got nan$"),
        ({"typical_epsilon": "0.1"}, r"^typical_epsilon: expected a number in \(0, 1\], got '0\.1'$"),
        ({"typical_epsilon": True}, r"^typical_epsilon: expected a number in \(0, 1\], got True$"),
        ({"typical_delta": 0}, r"^typical_delta: expected a positive finite number, got 0$"),
        ({"typical_delta": -0.3}, r"^typical_delta: expected a positive finite number, got -0\.3$"),
        ({"typical_delta": float("inf")}, r"^typical_delta: expected a positive finite number, got inf$"),
    ],
)
def test_config_validation_names_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(opts)
