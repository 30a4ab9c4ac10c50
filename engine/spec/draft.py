"""A draft model as the proposer: a smaller model sharing the target's tokenizer (tiny-draft for tiny), run over
its own paged KV cache by its own ModelRunner and BlockManager (with CUDA graphs of its one-token steps when the
target runs graphs).

Per request the draft remembers which tokens its cache holds (`fed`). Each step it first catches up: it computes
the request's tokens from the first one that differs from `fed` (rejected drafts are simply recomputed over, so
its cache stays in sync whatever the target accepted; after a full acceptance only the last draft and the bonus
token are new), all requests in one mixed forward whose last rows give draft 1, then k-1 one-token steps.
Greedy requests draft the argmax; sampling ones draw from the draft's warped distribution q (kept for the
rejection rule) with a generator of their own, seeded from the request's seed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.model.llama import Transformer
from engine.request import Request
from engine.sampling import make_generator
from engine.spec.proposer import Draft, Proposer
from engine.spec.verify import _draw, target_probs
from engine.worker.model_runner import ModelRunner

DRAFT_SEED_OFFSET = 0x5EED  # the draft's generator differs from the request's own, reproducibly


class _State:
    def __init__(self, rid: str) -> None:
        self.shadow = Request([0], request_id=f"draft:{rid}")  # holds the draft's block ids for the request
        self.fed: list[int] = []  # tokens whose K/V the draft's cache holds, in order
        self.gen: torch.Generator | None = None


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, draft: Transformer, config: EngineConfig, target: ModelRunner) -> None:
        if draft.config.vocab_size != target.mc.vocab_size:
            raise ValueError(f"draft_model: vocabulary {draft.config.vocab_size} != the target's {target.mc.vocab_size}")
        # a KV pool of as many blocks as the target's (a smaller model: fewer bytes), no GEMV tuning; its one-token
        # steps replay the draft runner's decode graphs when the target uses graphs (the catch-up forward is eager)
        cfg = replace(config, spec="none", draft_model=None, num_kv_blocks=target.pool.num_blocks,
                      cuda_graphs=target.graphs is not None, gemv="cublas", allow_fallback=True)  # fmt: skip
        self.runner = ModelRunner(draft, cfg, target.max_model_len)
        self.blocks = BlockManager(self.runner.pool.num_blocks, cfg.block_size)
        self.device = self.runner.device
        self.state: dict[str, _State] = {}
        self.graph_steps = self.eager_steps = 0  # draft forwards replayed from a graph / run eagerly

    def _forward(self, feeds: list[tuple[_State, list[int], int]]) -> torch.Tensor:
        """feeds: (state, tokens, first position), one-token feeds first. Logits [len(feeds), V] at each last row."""
        ids, pos, seq, qs, lens, tables, rows = [], [], [], [0], [], [], []
        for b, (st, toks, p0) in enumerate(feeds):
            ids += toks
            pos += range(p0, p0 + len(toks))
            seq += [b] * len(toks)
            qs.append(len(ids))
            lens.append(p0 + len(toks))
            tables.append(st.shadow.block_ids[: self.blocks.blocks_for(p0 + len(toks))])
            rows.append(len(ids) - 1)
            st.fed[p0:] = toks
        nd = sum(1 for f in feeds if len(f[1]) == 1)
        g = self.runner.graphs
        if g is not None and nd == len(feeds) and g.bucket(nd) is not None:  # every feed one token: a graph replay
            self.graph_steps += 1
            return g.run(ids, pos, lens, tables, [], None)
        self.eager_steps += 1
        return self.runner.forward(self.runner.build_batch(ids, pos, seq, qs, lens, tables, nd, rows))

    def _pick(self, logits: torch.Tensor, reqs: list[Request], states: list[_State]):
        """Draft tokens [n] (host) and, per request, q [V] for sampling ones (None for greedy)."""
        toks = logits.argmax(dim=-1)
        qs: list[torch.Tensor | None] = [None] * len(reqs)
        for i, (r, st) in enumerate(zip(reqs, states, strict=True)):
            s = r.sampling
            if s.greedy:
                continue
            if st.gen is None:
                seed = None if s.seed is None else s.seed + DRAFT_SEED_OFFSET
                st.gen = make_generator(seed, self.device)
            q = target_probs(logits[i : i + 1], s.temperature, s.top_k, s.top_p)
            toks[i] = _draw(q, st.gen)[0]
            qs[i] = q[0]
        return toks.tolist(), qs

    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        out = [Draft([]) for _ in reqs]
        live: list[tuple[int, _State, list[int], int]] = []  # (index, state, tokens to feed, first position)
        for i, (r, k) in enumerate(zip(reqs, ks, strict=True)):
            if k <= 0:
                continue
            st = self.state.get(r.request_id) or self.state.setdefault(r.request_id, _State(r.request_id))
            toks = r.prompt_ids + r.output_ids
            dc = 0
            lim = min(len(st.fed), len(toks) - 1)  # the last token is always fed: its logits give draft 1
            while dc < lim and st.fed[dc] == toks[dc]:
                dc += 1
            del st.fed[dc:]
            if not self.blocks.allocate(st.shadow, len(toks) + k - 1):
                continue  # the draft's pool is full: no drafts for this request this step
            live.append((i, st, toks[dc:], dc))
        if not live:
            return out
        live.sort(key=lambda x: len(x[2]) != 1)  # one-token feeds first (the attention metadata's order)
        idx = [x[0] for x in live]
        states = [x[1] for x in live]
        rq = [reqs[i] for i in idx]
        logits = self._forward([(st, t, p0) for _, st, t, p0 in live])
        step = 0
        while True:
            toks, qs = self._pick(logits, rq, states)
            for j, i in enumerate(idx):
                out[i].tokens.append(toks[j])
                if qs[j] is not None:
                    out[i].probs = qs[j][None] if out[i].probs is None else torch.cat([out[i].probs, qs[j][None]])
            step += 1
            keep = [j for j, i in enumerate(idx) if ks[i] > step]
            if not keep:
                return out
            idx, states, rq = [idx[j] for j in keep], [states[j] for j in keep], [rq[j] for j in keep]
            feeds = [(st, [out[i].tokens[-1]], len(st.fed)) for i, st in zip(idx, states, strict=True)]
            logits = self._forward(feeds)

    def release(self, req: Request) -> None:
        st = self.state.pop(req.request_id, None)
        if st is not None:
            self.blocks.free(st.shadow)
