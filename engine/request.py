"""A generation request as the core sees it (its own sampling, stop ids and length limit) and what a step reports.

The core has no prefill or decode phase (vLLM v1's rule): a request has `all_token_ids` (prompt + output so far)
and `num_computed_tokens` (how many of them are in the KV cache); each step lets the computed tokens catch up,
a prompt in chunks, then one token at a time. A token sampled on the device but not yet seen by the host is
`num_pending`: the next step may already feed it (one step ahead), the host appends it when it arrives.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # same seed + same prompt = same tokens, whatever else is in the batch

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not scheduled yet, or preempted (its KV freed, recomputed when it runs again)
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()
MAX_LOGPROBS = 20  # OpenAI's ceiling on top logprobs


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16  # new tokens at most
    stop_ids: frozenset[int] = frozenset()  # finish when one of these is sampled (it is kept in the output)
    ignore_eos: bool = False  # informational: callers put EOS into stop_ids unless this is set
    request_id: str = ""
    logprobs: int | None = None  # top-k logprobs of each sampled token (0 = its own only; None = off), at most 20
    session_id: str | None = None  # KV reuse: its full blocks stay cached when it finishes, for the next turn
    arrival_time: float = field(default_factory=time.perf_counter)
    # ---- state the core updates
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0  # sampled on the device, not yet appended (0 or 1)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    block_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # host time each output token became known
    num_preemptions: int = 0
    generator: object | None = None  # torch.Generator of a seeded sampling request (made by the core)
    # ---- speculative decoding (engine/spec): drafts verified in the next step, and their running totals
    speculate: bool = True  # False: this request never gets drafts, even when the engine speculates
    spec_tokens: list[int] = field(default_factory=list)  # drafts after the last token, scheduled with it
    spec_probs: object | None = None  # [len(spec_tokens), V] draft distributions (sampled drafts), else None
    spec_proposed: int = 0  # drafts verified so far
    spec_accepted: int = 0  # of which accepted
    spec_steps: int = 0  # verify steps with at least one draft
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    # output index -> (host float32 tensor [rows, 1 + 2k], row, this request's k, k of the tensor), filled when the
    # token is sampled, read (take_logprobs) once the step's copy to the host has completed
    logprob_rows: dict[int, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        self.stop_ids = frozenset(self.stop_ids)
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or None, got {lp!r}")

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens, pending included: what the KV cache must eventually hold, less the last."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids) + self.num_pending

    def token_at(self, i: int) -> int | None:
        """Token id at position i when the host knows it (None for a pending one)."""
        n = len(self.prompt_ids)
        if i < n:
            return self.prompt_ids[i]
        j = i - n
        return self.output_ids[j] if j < len(self.output_ids) else None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def take_logprobs(self, i: int) -> TokenLogprobs | None:
        """The logprobs of output token i (None when they were not asked for); call once its step has completed."""
        got = self.logprob_rows.pop(i, None)
        if got is None:
            return None
        host, row, k, kmax = got
        v = host[row].tolist()  # [token logprob, k top logprobs, k top ids (as floats: exact below 2**24)]
        return TokenLogprobs(v[0], [(int(v[1 + kmax + m]), v[1 + m]) for m in range(k)])


@dataclass
class TokenLogprobs:
    """Log-probabilities of one sampled token under the model's raw distribution (before temperature / top-k /
    top-p, as vLLM reports by default)."""

    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one step reports for one request."""

    request_id: str
    new_token_ids: list[int]  # tokens that became known in this step (0 or 1; more with speculative decoding)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    token_times: list[float]  # host time of each new token
    num_output_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per new token when the request asked for logprobs
    spec_proposed: int = 0  # the request's speculative totals so far (0 without speculation)
    spec_accepted: int = 0
    spec_steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None

    @property
    def mean_accepted_len(self) -> float | None:
        """Tokens emitted per verify step (accepted drafts + the target's own token)."""
        return (self.spec_accepted + self.spec_steps) / self.spec_steps if self.spec_steps else None
