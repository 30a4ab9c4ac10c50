"""Shared pieces of the speculative-decoding tests: running a batch step by step (some requests opted out of
speculation), held-out code prompts for the trained tiny model, and a chi-square p-value."""

from __future__ import annotations

import inspect
import json.decoder
import json.encoder
import shlex
import string

import torch

from engine import LLM


def run(llm: LLM, prompts, max_tokens, sampling=None, no_spec=(), stop_ids=()):
    """Tokens per prompt, all added at once and stepped until done; requests whose index is in no_spec never get
    drafts. Returns (tokens per prompt, final RequestOutput per prompt)."""
    ids = []
    for i, p in enumerate(prompts):
        s = sampling[i] if isinstance(sampling, list) else sampling
        mt = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        rid = llm.add_request(p, s, mt, stop_ids)
        llm.core.requests[rid].speculate = i not in no_spec
        ids.append(rid)
    got = {r: [] for r in ids}
    last = {}
    while llm.has_unfinished():
        for o in llm.step():
            got[o.request_id] += o.new_token_ids
            last[o.request_id] = o
    return [got[r] for r in ids], [last[r] for r in ids]


def code_prompts(tok, lengths: list[int]) -> list[list[int]]:
    """Prompts cut from held-out stdlib modules (models/README.md: json, shlex, string are never trained on)."""
    srcs = [inspect.getsource(m) for m in (json.encoder, shlex, string, json.decoder)]
    out = []
    for i, n in enumerate(lengths):
        ids = tok.encode(srcs[i % len(srcs)])
        start = (97 * i) % max(1, len(ids) - n)
        out.append(ids[start : start + n])
    return out


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """(p-value, degrees of freedom) of Pearson's chi-square test of counts against probs; cells whose expected
    count is below min_expected are pooled into one cell."""
    n = counts.sum().item()
    exp = probs.double() * n
    small = exp < min_expected
    c = torch.cat([counts.double()[~small], counts.double()[small].sum().view(1)])
    e = torch.cat([exp[~small], exp[small].sum().view(1)])
    keep = e > 0
    c, e = c[keep], e[keep]
    stat = ((c - e) ** 2 / e).sum()
    df = len(e) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0)), df
