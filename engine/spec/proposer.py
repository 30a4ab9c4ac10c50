"""The Proposer interface, and prompt lookup (n-gram matching over the prompt and the generated text).

A proposer drafts up to k tokens per running request from what the request knows (its tokens, and whatever the
proposer kept from earlier steps); after the verify forward it is told how many drafts were accepted, the target's
argmax at every verify row, and (when it asks for it) the target's final normed hidden state at the row that
produced the request's new last token. A proposer never decides acceptance: engine/spec/verify.py does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] the distributions they were drawn from; None = deterministic


class Proposer:
    name = "base"
    needs_hidden = False  # True: on_verified gets the target's final normed hidden state

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        """Up to ks[i] drafts to follow reqs[i]'s last token (every request has its last token uncomputed)."""
        raise NotImplementedError

    def on_verified(self, req: Request, drafts: list[int], accepted: int, argmax: list[int],
                    hidden: torch.Tensor | None) -> None:  # fmt: skip
        """After req's verify step: `accepted` of `drafts` were kept and the target's token was appended; argmax
        [len(drafts) + 1] is the target's argmax at each verify row; hidden [dim] at the row of the new last token."""

    def release(self, req: Request) -> None:
        """req finished or was aborted: drop what is kept for it."""


def copy_from(toks: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from toks[start:], reading on through the copied ones when the text ends (a repeat of
    period len(toks) - start continues)."""
    out: list[int] = []
    for i in range(k):
        j = start + i
        out.append(toks[j] if j < len(toks) else out[j - len(toks)])
    return out


class NgramProposer(Proposer):
    """Prompt lookup (apoorvumang/prompt-lookup-decoding; vLLM's ngram proposer): find the latest earlier
    occurrence of the request's last n tokens (n from max_n down to min_n) in its prompt + output, and draft the
    tokens that followed it. The index of n-grams grows with the text (O(new tokens) per step). min_n = 2: a
    single-token match drafts poorly, and a step without drafts is cheaper than a verify step (measured on the
    tiny model: max_n 5, min_n 2, k 16 beat min_n 1 and max_n 3 on held-out code, benchmarks/spec_bench.py)."""

    name = "ngram"

    def __init__(self, max_n: int = 5, min_n: int = 2) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.index: dict[str, tuple[int, list[dict]]] = {}  # request id -> (indexed up to, per-n maps)

    def _update(self, req: Request, toks: list[int]) -> list[dict]:
        done, maps = self.index.get(req.request_id, (0, [{} for _ in range(self.max_n + 1)]))
        end = len(toks) - 1  # index n-grams ending before the last token: each has a continuation
        for e in range(max(done, 1), end + 1):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                maps[n][tuple(toks[e - n : e])] = e
        self.index[req.request_id] = (max(done, end + 1), maps)
        return maps

    def match(self, req: Request, k: int) -> list[int]:
        toks = req.prompt_ids + req.output_ids
        maps = self._update(req, toks)
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            e = maps[n].get(tuple(toks[-n:]))
            if e is not None:
                return copy_from(toks, e, k)
        return []

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        return [Draft(self.match(r, k)) for r, k in zip(reqs, ks, strict=True)]

    def release(self, req: Request) -> None:
        self.index.pop(req.request_id, None)
