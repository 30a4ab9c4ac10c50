"""Lookahead decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
arXiv 2402.02057; hao-ai-lab/LookaheadDecoding), simplified to run on a causal chain.

The paper runs, in one forward with a custom attention mask, a 2-D lookahead branch (W positions x N-1 Jacobi
iterations) that produces n-grams, and a verification branch that checks up to G pool n-grams starting with the
last token. Our attention backends take causal chains over the paged cache, so one verify chain does both jobs:

* Jacobi window. The request keeps a guess for the positions after its last token. The chain fed to the target
  is [last token, guess...]; the target's argmax at each row is one Jacobi update of the next position (y_i <-
  argmax p(. | prefix, y_<i)). The accepted prefix is the converged part; the updates past it (conditioned on the
  first rejected guess) are the next guess, as in Jacobi decoding. The initial guess is prompt tokens (as the
  paper initialises its window).
* N-gram pool from the trajectories. The output at position P in iteration t was conditioned on the input at
  P-1, which was iteration t-1's output there: following these diagonals gives N-grams (each token the model's
  continuation of the previous one), added to a pool keyed by their first token (at most G per key, newest first).
* Verification branch. When the pool holds n-grams starting with the last token, the newest is verified: it
  takes the first N-1 places of the chain and the Jacobi guess fills the rest (one candidate, not G).

With `use_text`, n-grams of the request's own text are added to the pool as well (the paper's "prompt as
reference" variant for code and summarisation). Lossless by construction: drafts are only proposals.
"""

from __future__ import annotations

from engine.request import Request
from engine.spec.proposer import Draft, Proposer


class _State:
    def __init__(self) -> None:
        self.guess: list[int] = []  # Jacobi iterate for the positions after the last token
        self.grams: dict[int, tuple[int, ...]] = {}  # position -> the diagonal n-gram (<= N) ending there
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> continuations (N-1), newest first
        self.text_done = 0  # the request's text is in the pool up to here (use_text)


class LookaheadProposer(Proposer):
    name = "lookahead"

    def __init__(self, n: int = 4, g: int = 8, use_text: bool = True) -> None:
        self.n, self.g, self.use_text = n, g, use_text
        self.state: dict[str, _State] = {}

    def _add(self, st: _State, gram: tuple[int, ...]) -> None:
        conts = st.pool.setdefault(gram[0], [])
        cont = gram[1:]
        if cont in conts:
            conts.remove(cont)
        conts.insert(0, cont)
        del conts[self.g :]

    def _extend(self, st: _State, toks: list[int], guess: list[int], k: int) -> list[int]:
        """guess padded to k tokens: the pool's continuation of its last token, else prompt tokens."""
        out = list(guess[:k])
        while len(out) < k:
            last = out[-1] if out else toks[-1]
            conts = st.pool.get(last)
            if conts:
                out += conts[0][: k - len(out)]
            else:
                out.append(toks[(len(out) * 7 + len(toks)) % len(toks)])  # a prompt-ish token, deterministic
        return out

    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        drafts = []
        for r, k in zip(reqs, ks, strict=True):
            if k <= 0:
                drafts.append(Draft([]))
                continue
            st = self.state.setdefault(r.request_id, _State())
            toks = r.prompt_ids + r.output_ids
            if self.use_text:
                for e in range(max(st.text_done, self.n), len(toks) + 1):
                    self._add(st, tuple(toks[e - self.n : e]))
                st.text_done = len(toks) + 1
            cand = st.pool.get(toks[-1])
            chain = list(cand[0][:k]) + st.guess[len(cand[0]) : k] if cand else st.guess[:k]
            drafts.append(Draft(self._extend(st, toks, chain, k)))
        return drafts

    def on_verified(self, req, drafts, accepted, argmax, hidden) -> None:
        st = self.state.get(req.request_id)
        if st is None or not drafts:
            return
        p_last = req.num_tokens - 2 - accepted  # position of the chain's first input (the old last token)
        inputs = [None] + drafts  # inputs[j] sits at position p_last + j; inputs[0] is already verified
        grams = {}
        for j, o in enumerate(argmax):
            pos = p_last + 1 + j  # argmax[j] is the Jacobi update of this position
            prev = st.grams.get(pos - 1)
            inp = inputs[j] if j else req.token_at(pos - 1)
            base = prev if j > 0 and prev is not None and prev[-1] == inp else (inp,)
            gram = (base + (o,))[-self.n :]
            if len(gram) == self.n:
                self._add(st, gram)
            grams[pos] = gram
        st.grams = grams
        st.guess = argmax[accepted + 1 :]  # the updates past the accepted prefix: the next Jacobi iterate

    def release(self, req: Request) -> None:
        self.state.pop(req.request_id, None)
