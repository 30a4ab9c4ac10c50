"""Speculative decoding: proposers draft up to k tokens per running request, the core verifies them in one forward
of k+1 tokens over the paged cache (engine/core/engine_core.py `_spec_step`) and accepts by engine/spec/verify.py.

Proposers: `draft` (a smaller model sharing the tokenizer, over its own paged KV), `ngram` (prompt lookup over the
prompt and the generated text), `lookahead` (Jacobi iteration with an n-gram pool), `medusa` (extra heads on the
target's last hidden state). EngineConfig.spec picks one; `make_proposer` builds it.
"""

from __future__ import annotations

from engine.spec.proposer import Draft, NgramProposer, Proposer


def make_proposer(config, model, runner) -> Proposer:
    """The proposer EngineConfig.spec names, for the target `model` run by `runner`."""
    if config.spec == "ngram":
        return NgramProposer()
    if config.spec == "lookahead":
        from engine.spec.lookahead import LookaheadProposer

        return LookaheadProposer()
    if config.spec == "draft":
        import engine
        from engine.spec.draft import DraftModelProposer

        lm = engine.load(config.draft_model, model.dtype, model.device)
        return DraftModelProposer(lm.model, config, runner)
    if config.spec == "medusa":
        from engine.spec.medusa import MedusaProposer, load_heads

        return MedusaProposer(load_heads(config.draft_model, model.dtype, model.device), model)
    raise ValueError(f"spec: no proposer for {config.spec!r}")


__all__ = ["Draft", "NgramProposer", "Proposer", "make_proposer"]
