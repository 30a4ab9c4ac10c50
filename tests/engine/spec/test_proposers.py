"""The proposers' own logic on hand-made requests: prompt lookup's longest latest match and its copy through a
repeat, lookahead's pool from Jacobi trajectories, Medusa heads' save/load round trip and zero-init identity."""

from __future__ import annotations

import torch

from engine.request import Request
from engine.spec.lookahead import LookaheadProposer
from engine.spec.medusa import MedusaHeads, load_heads, save_heads
from engine.spec.proposer import NgramProposer, copy_from


def test_copy_reads_on_through_a_repeat():
    assert copy_from([1, 2, 3, 1, 2], 3, 5) == [1, 2, 1, 2, 1]
    assert copy_from([5, 6, 7, 8], 1, 2) == [6, 7]


def test_ngram_prefers_the_longest_then_latest_match():
    p = NgramProposer(max_n=3, min_n=1)
    r = Request([9, 1, 2, 7, 5, 1, 2, 8, 4, 3, 2])
    # "3 2" and "2" : the longest suffix that occurred before is "2" (after 1): latest occurrence is at index 6 -> 8
    assert p.match(r, 3) == [8, 4, 3]
    r.output_ids += [8]  # suffix "2 8" now matches the earlier "2 8" at 6..7 -> continues with 4, 3, 2, 8
    assert p.match(r, 4) == [4, 3, 2, 8]
    assert p.match(Request([1, 2, 3]), 4) == []  # nothing repeats


def test_lookahead_pool_learns_a_loop_from_its_trajectories():
    la = LookaheadProposer(n=3, g=4, use_text=False)
    r = Request([1, 2, 3, 4])
    loop = [5, 6, 7, 8]
    # the "target" always continues the loop 5 6 7 8 5 6 ...; argmax[j] is its token after the chain's j-th input
    nxt = {5: 6, 6: 7, 7: 8, 8: 5, 4: 5, 1: 2, 2: 3, 3: 4}
    for _ in range(6):
        (d,) = la.propose([r], [4])
        chain = [r.output_ids[-1] if r.output_ids else 4] + d.tokens
        argmax = [nxt.get(t, 5) for t in chain]
        a = 0
        while a < 4 and d.tokens[a] == argmax[a]:
            a += 1
        r.output_ids += d.tokens[:a] + [argmax[a]]
        la.on_verified(r, d.tokens, a, argmax, None)
    assert r.output_ids[:8] == loop + loop
    assert la.state[r.request_id].pool  # n-grams were collected


def test_medusa_heads_round_trip_and_zero_init(tmp_path):
    h = MedusaHeads(8, 3)
    x = torch.randn(2, 8)
    assert torch.equal(h(x), x[:, None, :].expand(2, 3, 8))  # zero init: every head passes h through
    with torch.no_grad():
        h.weight.normal_()
        h.bias.normal_()
    save_heads(h, tmp_path / "medusa", dtype=torch.float32)
    g = load_heads(tmp_path)  # the model folder: its medusa/ subfolder holds the heads
    assert torch.equal(g(x), h(x))
