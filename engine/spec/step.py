"""The engine core's speculative step: propose -> schedule (drafts ride with each request's last token, q_len =
1 + k over its cache) -> one verify forward with logits at every draft row -> accept -> roll back -> outputs.

It runs synchronously (no one-step-ahead overlap): a proposal needs the tokens the previous step accepted. Rejected
drafts' K/V stay in the request's blocks past num_computed_tokens, which is set back, and the next step overwrites
those slots. Requests without drafts (prompt chunks, `speculate = False`, nothing proposed) share the same forward
and sample their one token by the same rule with zero drafts (greedy: argmax; else one draw from the warped
distribution with the request's generator, exactly as the plain sampler draws).
"""

from __future__ import annotations

import time
from collections import deque

from engine.request import Request, RequestOutput
from engine.sampling import make_generator
from engine.spec import make_proposer
from engine.spec.verify import greedy_accept, rejection_accept


class SpecDecoder:
    def __init__(self, config, model, runner) -> None:
        self.k = config.num_spec_tokens
        self.method = config.spec
        self.proposer = make_proposer(config, model, runner)
        self.totals = {"verify_steps": 0, "proposed": 0, "accepted": 0, "propose_s": 0.0}
        self.done: deque[dict] = deque(maxlen=256)  # per-request stats of the latest finished requests

    # ---------------------------------------------------------------- one step
    def step(self, core) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self._propose(core)
        self.totals["propose_s"] += time.perf_counter() - t0
        sched = core.scheduler.schedule()
        for r in sched.preempted:
            r.spec_tokens, r.spec_probs = [], None
        if not sched.requests:
            return []
        logits, sampled, hidden = core.runner.execute_verify(sched, self.proposer.needs_hidden)
        for req, n in zip(sched.requests, sched.num_new, strict=True):
            req.num_computed_tokens += n
        core.stats["steps"] += 1
        core.stats["tokens"] += sched.num_tokens
        argmax = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        outs, row = [], 0
        for req in sampled:
            d, s = req.spec_tokens, len(req.spec_tokens)
            am = argmax[row : row + s + 1]
            sp = req.sampling
            if sp.greedy:
                a, t = greedy_accept(d, am)
            else:
                if req.generator is None:
                    req.generator = make_generator(sp.seed, core.runner.device) if sp.seed is not None \
                        else core.runner.default_gen  # fmt: skip
                q = None if req.spec_probs is None else req.spec_probs[:s]
                a, t = rejection_accept(logits[row : row + s + 1], d, q, sp.temperature, sp.top_k, sp.top_p,
                                        req.generator)  # fmt: skip
            h = None if hidden is None else hidden[row + a]
            row += s + 1
            req.num_computed_tokens -= s - a  # the rejected drafts' slots are stale: recomputed over next step
            if s:
                req.spec_proposed += s
                req.spec_accepted += a
                req.spec_steps += 1
                self.totals["verify_steps"] += 1
                self.totals["proposed"] += s
                self.totals["accepted"] += a
            req.spec_tokens, req.spec_probs = [], None
            out = self._append(core, req, d[:a] + [t], now)
            if out.finished:
                self.release(req)
            else:
                self.proposer.on_verified(req, d, a, am, h)
            outs.append(out)
        return outs

    def _propose(self, core) -> None:
        """Drafts for every running request whose only uncomputed token is its last, at most k and never past
        max_tokens or the context (the target's token follows the accepted drafts)."""
        reqs, ks = [], []
        for r in core.scheduler.running:
            r.spec_tokens, r.spec_probs = [], None
            if not r.speculate or r.num_computed_tokens != r.num_tokens - 1:
                continue
            k = min(self.k, r.max_tokens - r.num_output_tokens - 1, core.max_model_len - r.num_tokens - 1)
            if k > 0:
                reqs.append(r)
                ks.append(k)
        if not reqs:
            return
        for r, k, d in zip(reqs, ks, self.proposer.propose(reqs, ks), strict=True):
            r.spec_tokens = list(d.tokens[:k])
            r.spec_probs = None if d.probs is None or not r.spec_tokens else d.probs[: len(r.spec_tokens)]

    def _append(self, core, req: Request, toks: list[int], now: float) -> RequestOutput:
        """Append the step's tokens up to a stop id or the length limit; finish the request there."""
        reason, new = None, []
        for t in toks:
            req.output_ids.append(t)
            req.token_times.append(now)
            new.append(t)
            if t in req.stop_ids:
                reason = "stop"
            elif len(req.output_ids) >= req.max_tokens or req.num_tokens >= core.max_model_len:
                reason = "length"
            if reason is not None:
                break
        core.stats["generated"] += len(new)
        if reason is not None:
            core.scheduler.finish(req, reason)
            core.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, new, reason is not None, reason, [now] * len(new), len(req.output_ids),
                             None, req.spec_proposed, req.spec_accepted, req.spec_steps)  # fmt: skip

    def release(self, req: Request) -> None:
        self.proposer.release(req)
        if req.spec_steps:
            self.done.append({"request_id": req.request_id, **_rates(req.spec_proposed, req.spec_accepted,
                                                                       req.spec_steps)})  # fmt: skip

    def info(self) -> dict:
        t = self.totals
        return {"method": self.method, "num_spec_tokens": self.k, **_rates(t["proposed"], t["accepted"],
                t["verify_steps"]), "propose_s": round(t["propose_s"], 4), "requests": list(self.done)}  # fmt: skip


def _rates(proposed: int, accepted: int, steps: int) -> dict:
    return {"proposed": proposed, "accepted": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_accepted_len": (accepted + steps) / steps if steps else None}  # fmt: skip


__all__ = ["SpecDecoder"]
