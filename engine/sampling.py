"""Next-token sampling: greedy, temperature, top-k, top-p; vectorised over the batch, seeded, no host sync."""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device`: seeded for reproducible runs, else from fresh entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (others -inf). logits [B, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    vals, idx = torch.topk(logits, k, dim=-1)  # [B, k]
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one). logits [B, V]."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop = mass_before >= p  # the top token always has mass_before 0, so it stays (p > 0)
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (float32) -> token ids [B] int64, on the logits' device.

    temperature == 0 is greedy (argmax). Otherwise the distribution softmax(logits / temperature), restricted
    by top-k then top-p, is drawn from with the exponential-race trick (argmax p_i / E_i, E_i ~ Exp(1)), which is
    an exact categorical draw, needs no host sync and reproduces with a seeded generator.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature
    x = apply_top_k(x, top_k)
    x = apply_top_p(x, top_p)
    probs = torch.softmax(x, dim=-1)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(dim=-1)
