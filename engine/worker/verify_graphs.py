"""CUDA graphs of the speculative verify forward: every request of the step padded to k+1 query rows (its last
token, its drafts, then pad rows), one graph per batch-size bucket, so a verify step is copy-in, replay, gather
instead of an eager forward of Python launches (ModelRunner.execute_verify; engine/spec/step.py picks the path).

Padding, and why it cannot change a real row: a request of s <= k drafts computed over c0 cached tokens gets ids
[last, d_1 .. d_s, 0 * (k - s)] at positions c0 .. c0 + k and seq_len c0 + k + 1. Pad rows come after the request's
real rows, so under the causal mask no real row sees them (the paged prefill kernel places query i of a sequence at
seq_len - q_len + i, the torch backend masks by the same rule). Their K/V land in the request's slots past its
real tokens (stale slots, overwritten before any later step reads them, like rejected drafts' slots) or, past the
blocks the request was given, in scratch block 0: block-table columns beyond the request's blocks are zero.
Padding sequences of a bucket have seq_len 0 and zero block-table rows (as in DecodeGraphs): they write block 0
and attend nothing.

Bounds: a pad row's position reaches max_model_len - 1 + k, so the rope table is grown to max_model_len + k + 1
positions and the static block table has ceil((max_model_len + k + 1) / block_size) + 1 columns; every step
zeroes its columns up to the last one a pad row indexes (_load's ncols), so no column written by an older step
is ever read or written through.

The static batch's seq_lens_host is [max_model_len + k + 1] * bs, never q_len: it only steers the Triton
backend's host-side choice, which must be the paged prefill launch (TritonBackend._sdpa False); the device
seq_lens carry the real lengths. Without a graph (capture=False, the CPU tests; or a failed capture) the same
static buffers run eagerly with the step's true host lengths, which the torch backend reads.
"""

from __future__ import annotations

import math

import torch

from engine.attention.metadata import AttentionMetadata, ForwardBatch
from engine.core.scheduler import SchedulerOutput
from engine.request import Request
from engine.worker.graphs import StaticGraphs


class VerifyGraphs(StaticGraphs):
    def __init__(self, runner, k: int, buckets: list[int], capture: bool = True) -> None:
        self.k = k
        self.bound = runner.max_model_len + k + 1  # positions a pad row may reach, exclusive
        model = runner.model
        # graphs captured before (the decode graphs) read the current rope table by address: keep it alive when
        # ensure_rope replaces it with a longer one (same values at every position they use)
        self._old_rope = model._cos_sin
        model.ensure_rope(self.bound)
        cols = math.ceil(self.bound / runner.config.block_size) + 1
        super().__init__(runner, buckets, k + 1, cols, capture)

    def _static(self, bs: int) -> ForwardBatch:
        q = self.q
        meta = AttentionMetadata(
            num_seqs=bs, num_decodes=0, query_start=list(range(0, bs * q + 1, q)), seq_lens_host=[self.bound] * bs,
            cu_seqlens_q=self.cu[: bs + 1], seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            max_q_len=q, max_seq_len=self.bound - 1,
        )
        n = bs * q
        return ForwardBatch(self.input_ids[:n], self.positions[:n], self.seq_idx[:n], meta, None)

    def fits(self, sched: SchedulerOutput) -> bool:
        """Whether the step can be padded into a bucket: every request samples and computes only its last token
        and at most k drafts (no prompt chunk, no recompute after preemption), and a bucket holds the batch."""
        if not sched.requests or self.bucket(len(sched.requests)) is None:
            return False
        return all(n == 1 + len(r.spec_tokens) and len(r.spec_tokens) <= self.k and sched.samples(i)
                   for i, (r, n) in enumerate(zip(sched.requests, sched.num_new, strict=True)))  # fmt: skip

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Request], None]:
        """execute_verify's contract for a step that `fits`: (logits [R, V] at every request's last token and its
        drafts, in batch order; the requests; None), from the [bs * (k+1), V] logits of the padded bucket."""
        r, q = self.runner, self.q
        ids, pos, _, qs, _, tables, _, sampled, _ = r._inputs(sched, None)
        b = len(tables)
        bs = self.bucket(b)
        pids, ppos, lens, rows = [], [], [], []
        for i in range(b):
            seg, c0 = ids[qs[i] : qs[i + 1]], pos[qs[i]]
            pids += seg + [0] * (q - len(seg))
            ppos += range(c0, c0 + q)
            lens.append(c0 + q)
            rows += range(i * q, i * q + len(seg))
        ncols = math.ceil(max(lens) / r.config.block_size)  # the column of every position < max(lens)
        self._load(bs, pids, ppos, lens, tables, ncols)
        logits = self.graphs.run(bs, lambda _: r.forward(self._eager(bs, lens)))  # [bs * q, V]
        return logits[r._tensor(rows, torch.int64)], sampled, None
