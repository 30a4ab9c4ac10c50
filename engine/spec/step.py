"""The engine core's speculative step: propose -> schedule (drafts ride with each request's last token, q_len =
1 + k over its cache) -> one verify forward with logits at every draft row -> accept -> roll back -> outputs.
Greedy requests accept by argmax matching; sampling ones by `spec_acceptance`: the lossless rejection rule, or
Medusa's typical acceptance (lossy; engine/spec/verify.py).

It runs synchronously (no one-step-ahead overlap): a proposal needs the tokens the previous step accepted. Rejected
drafts' K/V stay in the request's blocks past num_computed_tokens, which is set back, and the next step overwrites
those slots. Requests without drafts (prompt chunks, `speculate = False`, nothing proposed) share the same forward
and sample their one token by the same rule with zero drafts (greedy: argmax; else one draw from the warped
distribution with the request's generator, exactly as the plain sampler draws).

On CUDA with graphs (the Triton backend), a step whose requests each verify at most k drafts after their last
token replays a verify graph (engine/worker/verify_graphs.py: every request padded to k+1 rows, batch sizes up to
32); steps with prompt chunks, larger batches, proposers that need hidden states (Medusa) and steps without any
draft take ModelRunner.execute_verify (eager, or its decode graph for a step of decodes only).
"""

from __future__ import annotations

import time
from collections import deque

from engine.request import Request, RequestOutput
from engine.sampling import make_generator
from engine.spec import make_proposer
from engine.spec.verify import greedy_accept, rejection_accept, typical_accept
from engine.worker.verify_graphs import VerifyGraphs

MAX_VERIFY_BUCKET = 32  # verify graphs for the decode buckets up to this batch size


class SpecDecoder:
    def __init__(self, config, model, runner) -> None:
        self.k = config.num_spec_tokens
        self.method = config.spec
        self.proposer = make_proposer(config, model, runner)
        self.acceptance = config.spec_acceptance  # sampling requests' rule: rejection (lossless) | typical (lossy)
        self.typical = (config.typical_epsilon, config.typical_delta)
        self.totals = {"verify_steps": 0, "proposed": 0, "accepted": 0, "propose_s": 0.0}
        self.done: deque[dict] = deque(maxlen=256)  # per-request stats of the latest finished requests
        # forwards by path: verify graph replays, eager verify forwards, steps without drafts (runner's own path)
        self.paths = {"graphed_verify_steps": 0, "eager_verify_steps": 0, "draftless_steps": 0}
        self.verify_graphs: VerifyGraphs | None = None
        buckets = [b for b in runner.buckets if b <= min(MAX_VERIFY_BUCKET, config.max_num_seqs)]
        self.no_graphs = _no_graphs(runner, self.proposer, buckets)  # why there are no verify graphs, or None
        if self.no_graphs is None:
            self.verify_graphs = VerifyGraphs(runner, self.k, buckets)
            if self.verify_graphs.fallback and not config.allow_fallback:
                raise RuntimeError(f"verify graph capture failed: {self.verify_graphs.fallback} "
                                   "(allow_fallback = true verifies eagerly)")  # fmt: skip

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
        logits, sampled, hidden = self._verify(core.runner, sched)
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
                a, t = self._sample_accept(logits[row : row + s + 1], req)
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

    def _sample_accept(self, logits, req: Request) -> tuple[int, int]:
        """(accepted drafts, next token) of a sampling request by the configured rule; logits [s+1, V]."""
        d, sp = req.spec_tokens, req.sampling
        if self.acceptance == "typical":
            return typical_accept(logits, d, sp.temperature, sp.top_k, sp.top_p, req.generator, *self.typical)
        q = None if req.spec_probs is None else req.spec_probs[: len(d)]
        return rejection_accept(logits, d, q, sp.temperature, sp.top_k, sp.top_p, req.generator)

    def _verify(self, runner, sched):
        """(logits [R, V], sampled requests, hidden or None) of the step, from a verify graph when the step fits."""
        vg = self.verify_graphs
        if not any(r.spec_tokens for r in sched.requests):
            self.paths["draftless_steps"] += 1
        elif vg is not None and not self.proposer.needs_hidden and vg.fits(sched):
            self.paths["graphed_verify_steps"] += 1
            return vg.run(sched)
        else:
            self.paths["eager_verify_steps"] += 1
        return runner.execute_verify(sched, self.proposer.needs_hidden)

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
        vg = self.verify_graphs
        typical = {"typical_epsilon": self.typical[0], "typical_delta": self.typical[1]}
        return {"method": self.method, "num_spec_tokens": self.k, "acceptance": self.acceptance,
                **(typical if self.acceptance == "typical" else {}), **_rates(t["proposed"], t["accepted"],
                t["verify_steps"]), "propose_s": round(t["propose_s"], 4), "requests": list(self.done),
                "verify_graphs": list(vg.buckets) if vg is not None and vg.buckets else None,
                "verify_graph_fallback": self.no_graphs if vg is None else vg.fallback, **self.paths}  # fmt: skip


def _no_graphs(runner, proposer, buckets: list[int]) -> str | None:
    """Why verify graphs are not built for this runner and proposer; None = build them."""
    if proposer.needs_hidden:
        return "the proposer needs hidden states"
    if runner.graphs is None:
        return "no decode graphs (not CUDA, or cuda_graphs off)"
    if runner.backend.name != "triton":  # the torch backend reads host seq lengths: nothing to capture it with
        return f"attention backend {runner.backend.name}"
    return None if buckets else f"no decode bucket <= {MAX_VERIFY_BUCKET}"


def _rates(proposed: int, accepted: int, steps: int) -> dict:
    return {"proposed": proposed, "accepted": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_accepted_len": (accepted + steps) / steps if steps else None}  # fmt: skip


__all__ = ["SpecDecoder"]
