"""Test-only adapters whose per-token host times are planted, so metric definitions can be checked exactly.

Each one runs its timeline (ms after submit, per request) from a fixed t0; no time passes for real.
- StaticBatch: every request prefills together (40 ms), then one 10 ms decode step per token: phases do not mix.
- ChunkedPrefill: vLLM-like: one new request is prefilled per step, mixed into the decode of the running ones
  (a mixed step takes 20 ms, a pure decode step 10 ms), so later requests' first tokens come after earlier
  requests' second tokens. For 3 requests x 4 tokens:
      r0: 20 40 60 70     r1: 40 60 70 80     r2: 60 70 80 90
- Serial: the requests one after another (llama.cpp in process): 30 ms prefill, 10 ms per decode step.
- Bursty: a static batch that decodes a token every 10 ms but hands them over three at a time (every 30 ms), as a
  streamer that holds tokens back would: ITL gaps of 30, 0, 0 ms.
"""

from __future__ import annotations

from adapters.base import Adapter, GenRequest, GenResult

T0 = 100.0


class Planted(Adapter):
    name = "planted"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "planted 1.0"

    def load(self, model, opts=None) -> None:
        pass

    def timeline(self, n_requests: int, n_tokens: int) -> list[list[float]]:
        """Token times in ms after submit, one list per request."""
        raise NotImplementedError

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        n = requests[0].max_new_tokens
        out = []
        for r, ms in zip(requests, self.timeline(len(requests), n), strict=True):
            times = [T0 + t / 1e3 for t in ms]
            out.append(GenResult(output_ids=[1] * n, text=None, submit_time=T0, first_token_time=times[0],
                                 token_times=times, finish_reason="length", prompt_tokens=len(r.prompt_ids)))
        return out


class StaticBatch(Planted):
    def timeline(self, n_requests, n_tokens):
        return [[40.0 + 10.0 * k for k in range(n_tokens)] for _ in range(n_requests)]


class ChunkedPrefill(Planted):
    def timeline(self, n_requests, n_tokens):
        times: list[list[float]] = [[] for _ in range(n_requests)]
        t, admitted = 0.0, 0
        while any(len(x) < n_tokens for x in times):
            running = [i for i in range(admitted) if len(times[i]) < n_tokens]
            if admitted < n_requests:  # mixed step: prefill the next request, decode the running ones
                t += 20.0
                running.append(admitted)
                admitted += 1
            else:  # pure decode step
                t += 10.0
            for i in running:
                times[i].append(t)
        return times


class Serial(Planted):
    def timeline(self, n_requests, n_tokens):
        out, t = [], 0.0
        for _ in range(n_requests):
            t += 30.0
            ts = [t + 10.0 * k for k in range(n_tokens)]
            out.append(ts)
            t = ts[-1]
        return out


class Bursty(Planted):
    def timeline(self, n_requests, n_tokens):
        return [[40.0] + [40.0 + 30.0 * -(-k // 3) for k in range(1, n_tokens)] for _ in range(n_requests)]
