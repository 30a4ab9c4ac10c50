"""Batch-1 prefill of short prompts replayed from a CUDA graph per token bucket (engine/fast_decode.py uses it).

A short prompt's eager prefill is bound by launching about 500 kernels from Python (11-17 ms at 128 tokens of an 8B
model on the H100, against 7 ms of GPU work; results/gpu/prefill-graphs-h100.json). Here the prompt is padded up to
the next bucket and the captured prefill replayed. Padding rows continue the positions in slot 0: causal attention
keeps them out of the prompt's rows, and the K/V they write at positions >= len(prompt) (blocks the caller reserved
up to the bucket) are overwritten by decode before any step reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.graphs import GraphRunner

PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512)  # batch-1 prefill buckets (prompts padded up to one)

# forward(ids, pos, seq, lens, write, last, windows) -> float32 logits at the `last` rows (FastGenerator._forward_prefill)
Forward = Callable[..., torch.Tensor]


class PrefillGraphs:
    """Captures forward over static slot-0 buffers for every bucket <= cap; `buckets` is empty and `fallback` says
    why when nothing was captured."""

    def __init__(self, forward: Forward, kv, device: torch.device, cap: int) -> None:
        self.forward = forward
        self.buckets: tuple[int, ...] = ()
        self.fallback: str | None = None
        want = [t for t in PREFILL_GRAPH_TOKENS if t <= cap]
        if not want:
            self.fallback = f"no token bucket fits {cap} tokens"
            return
        tmax = want[-1]
        self.ids = torch.zeros(tmax, dtype=torch.int64, device=device)
        self.pos = torch.arange(tmax, dtype=torch.int32, device=device)  # padding continues the positions
        self.seq = torch.zeros(tmax, dtype=torch.int32, device=device)  # all in slot 0
        self.last = torch.zeros(1, dtype=torch.int64, device=device)  # row of the prompt's last token
        kv.reserve(0, tmax)  # capture writes K/V of every bucket row into slot 0
        kv.sync_tables()

        def reset() -> None:
            kv.release_all()
            kv.sync_tables()

        self.runner = GraphRunner(device)
        with torch.inference_mode():
            self.runner.capture(self._static, want, reset)
        self.buckets = tuple(sorted(self.runner.graphs))
        self.fallback = self.runner.fallback

    def _static(self, t: int) -> torch.Tensor:
        return self.forward(self.ids[:t], self.pos[:t], self.seq[:t], [t], True, self.last, windows=False)

    def bucket(self, n: int) -> int | None:
        """The bucket a prompt of n tokens replays (None: too long, or nothing captured)."""
        return next((t for t in self.buckets if t >= n), None)

    def run(self, prompt: list[int], t: int) -> torch.Tensor:
        """Float32 last-token logits [1, V] of prompt (len <= t) through bucket t's graph, K/V written to slot 0."""
        n = len(prompt)
        self.ids[:n].copy_(torch.tensor(prompt, dtype=torch.int64))
        self.ids[n:t].zero_()
        self.last.fill_(n - 1)
        return self.runner.run(t, self._static).clone()
