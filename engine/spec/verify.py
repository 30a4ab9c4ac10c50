"""Verification of speculative tokens: greedy (longest prefix equal to the target's argmax, plus the bonus token)
and the lossless rejection rule of Leviathan et al. (arXiv 2211.17192) / Chen et al. (arXiv 2302.01318).

For one request the target computed logits at k+1 rows: row j is the distribution of the token after the j-th
input (row 0 after the last accepted token, rows 1..k after each draft token). Draft token x_j (j = 1..k) drawn
from q_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token is drawn from
norm(max(0, p_j - q_j)) and the rest is dropped; when all k are accepted a bonus token is drawn from p_{k+1}.
Every emitted token is then distributed exactly as p, whatever q is. A proposer that drafts deterministically
(n-gram, lookahead, Medusa's argmax) has q one-hot: accept with p(x), else draw from p with x removed.

Typical acceptance (Medusa, Cai et al. arXiv 2401.10774 section 2.3.1; `evaluate_posterior` of FasterDecoding/
Medusa) is the LOSSY alternative for sampling requests: walking the chain, x_j is accepted iff
p_j(x_j) > min(epsilon, delta * exp(-H(p_j))), H the entropy in nats, and the walk stops at the first rejection;
the target's token at the first unaccepted row (or the bonus row) is then drawn from p there. It accepts plausible
drafts that rejection would often refuse, so outputs no longer follow p exactly (the paper's defaults: epsilon 0.09,
delta 0.3). H here is exact (0 log 0 = 0); Medusa's code takes log(p + 1e-5), a slightly lower H.

p is the same warped distribution the plain sampler draws from (temperature, then top-k, then top-p:
engine/sampling.py), and every random number comes from the request's own generator, so a seeded run repeats.
"""

from __future__ import annotations

import torch

from engine.sampling import apply_top_k, apply_top_p


def target_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[R, V] logits -> [R, V] float32 probabilities of the warped distribution the sampler uses."""
    x = logits.float() / temperature
    return torch.softmax(apply_top_p(apply_top_k(x, top_k), top_p), dim=-1)


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row (the exponential race of engine.sampling.sample)."""
    e = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return (probs / e).argmax(dim=-1)


def greedy_accept(drafts: list[int], argmax: list[int]) -> tuple[int, int]:
    """(accepted drafts, next token): the longest prefix of drafts equal to the target's argmax rows, then the
    argmax at the first mismatch (or the bonus row when every draft matched). argmax has len(drafts) + 1 rows."""
    a = 0
    while a < len(drafts) and drafts[a] == argmax[a]:
        a += 1
    return a, argmax[a]


def rejection_accept(
    logits: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator | None,
) -> tuple[int, int]:
    """(accepted drafts, next token) by the lossless rule. logits [k+1, V] of the target at the verify rows;
    draft_probs [k, V] the distributions the drafts were drawn from, or None for deterministic drafts."""
    p = target_probs(logits, temperature, top_k, top_p)  # [k+1, V]
    k = len(drafts)
    if k == 0:
        return 0, int(_draw(p[:1], gen).item())
    dev = p.device
    idx = torch.tensor(drafts, device=dev)
    rows = torch.arange(k, device=dev)
    px = p[rows, idx]
    qx = torch.ones_like(px) if draft_probs is None else draft_probs[rows, idx].float()
    u = torch.rand(k, device=dev, generator=gen)
    ok = (u * qx < px).tolist()  # u < p/q, written without the division (q(x) > 0: x was drawn from q)
    a = ok.index(False) if False in ok else k
    if a == k:
        return k, int(_draw(p[k : k + 1], gen).item())
    if draft_probs is None:
        resid = p[a].clone()
        resid[drafts[a]] = 0.0
    else:
        resid = (p[a] - draft_probs[a].float()).clamp_(min=0.0)
    if float(resid.sum()) <= 0.0:  # p == q on the support: rejection had probability 0 (rounding only)
        resid = p[a]
    return a, int(_draw((resid / resid.sum()).unsqueeze(0), gen).item())


def typical_threshold(probs: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """[R, V] probabilities -> [R] thresholds of typical acceptance, min(epsilon, delta * exp(-H(p)))."""
    entropy = torch.special.entr(probs).sum(dim=-1)
    return (delta * torch.exp(-entropy)).clamp_(max=epsilon)


def typical_accept(
    logits: torch.Tensor,
    drafts: list[int],
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator | None,
    epsilon: float,
    delta: float,
) -> tuple[int, int]:
    """(accepted drafts, next token) by typical acceptance (lossy). logits [k+1, V] of the target at the verify
    rows; the drafts' own probabilities are not used. The next token is one draw from p at the first unaccepted
    row, so with no drafts this is the plain sampler's draw."""
    p = target_probs(logits, temperature, top_k, top_p)  # [k+1, V]
    k, a = len(drafts), 0
    if k:
        px = p[torch.arange(k, device=p.device), torch.tensor(drafts, device=p.device)]
        ok = (px > typical_threshold(p[:k], epsilon, delta)).tolist()
        a = ok.index(False) if False in ok else k
    return a, int(_draw(p[a : a + 1], gen).item())
