"""CUDA graphs of the ordinary forward for decode-only steps, one per batch-size bucket (nano-vllm's
capture_cudagraph): static input buffers, largest bucket first, one memory pool; a replay is copy-in, replay,
slice. Padding rows of a bucket have seq_len 0 and a zero block-table row, so they write the scratch block and
attend nothing.

A mixed step with few prompt tokens replays the same graphs (ModelRunner.execute, EngineConfig.graph_mixed_tokens):
every prompt token becomes a row of its own, a "sequence" of one query at its position p with seq_len p + 1 and
its request's block table. Every layer writes the step's K/V into the cache before attention reads it, so row p
attends positions 0 .. p: the prompt chunk's causal attention over its cached prefix, one row at a time.

StaticGraphs holds what decode graphs and the speculative verify graphs (engine/worker/verify_graphs.py) share:
the static buffers of up to max(buckets) sequences of q rows each, the capture, the copy-in of a step."""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.attention.metadata import AttentionMetadata, ForwardBatch
from engine.worker.graph_capture import GraphRunner


class StaticGraphs:
    """Static inputs for sequences of q query rows each (decode: q = 1): input_ids / positions / seq_idx
    [max_bs * q], seq_lens [max_bs], cu_seqlens_q [max_bs + 1] (multiples of q), block_tables [max_bs, max_blocks].
    One static ForwardBatch per bucket (`_static`, per subclass) over the leading slices. capture=False keeps no
    graph: GraphRunner.run then runs the step eagerly over the same buffers (the CPU tests' path)."""

    def __init__(self, runner, buckets: list[int], q: int, max_blocks: int, capture: bool = True) -> None:
        self.runner, self.q, self.max_blocks = runner, q, max_blocks
        dev = runner.device
        mb = max(buckets)
        self.input_ids = torch.zeros(mb * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(mb * q, dtype=torch.int64, device=dev)
        self.seq_idx = torch.arange(mb, dtype=torch.int32, device=dev).repeat_interleave(q)
        self.seq_lens = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.cu = torch.arange(mb + 1, dtype=torch.int32, device=dev) * q
        self.block_tables = torch.zeros(mb, max_blocks, dtype=torch.int32, device=dev)
        self.batches = {bs: self._static(bs) for bs in buckets}
        self.graphs = GraphRunner(dev)
        if capture:
            with torch.inference_mode():
                self.graphs.capture(self._step, buckets, self._reset)
            self.buckets = tuple(sorted(self.graphs.graphs))
            self.fallback = self.graphs.fallback
        else:
            self.buckets = tuple(sorted(buckets))
            self.fallback = "capture disabled: eager over the static buffers"

    def _static(self, bs: int) -> ForwardBatch:
        raise NotImplementedError

    def _step(self, bs: int) -> torch.Tensor:
        return self.runner.forward(self.batches[bs])

    def _eager(self, bs: int, lens: list[int]) -> ForwardBatch:
        """The static batch with the step's true host lengths (padding sequences 0), for a run without a graph: the
        torch backend reads them (the Triton one reads the device seq_lens)."""
        batch = self.batches[bs]
        return replace(batch, attn=replace(batch.attn, seq_lens_host=lens + [0] * (bs - len(lens))))

    def _reset(self) -> None:
        self.input_ids.zero_()
        self.positions.zero_()
        self.seq_lens.zero_()
        self.block_tables.zero_()

    def bucket(self, b: int) -> int | None:
        return next((x for x in self.buckets if x >= b), None)

    def _load(self, bs: int, ids: list[int], pos: list[int], lens: list[int], tables: list[list[int]],
              ncols: int) -> None:  # fmt: skip
        """Copy a step's host lists into bucket bs: ids / pos of the real sequences (q rows each), their seq_lens
        and block tables (zero-padded to ncols columns); the bucket's padding sequences get zero ids, positions,
        seq_lens and block-table rows. Columns >= ncols keep older values: the step must never index them."""
        r = self.runner
        rows, pad = bs * self.q, bs - len(lens)
        self.input_ids[:rows].copy_(r._tensor(ids + [0] * (rows - len(ids)), torch.int64), non_blocking=True)
        self.positions[:rows].copy_(r._tensor(pos + [0] * (rows - len(pos)), torch.int64), non_blocking=True)
        self.seq_lens[:bs].copy_(r._tensor(lens + [0] * pad, torch.int32), non_blocking=True)
        tab = [t + [0] * (ncols - len(t)) for t in tables] + [[0] * ncols] * pad
        self.block_tables[:bs, :ncols].copy_(r._tensor(tab, torch.int32), non_blocking=True)


class DecodeGraphs(StaticGraphs):
    def __init__(self, runner, buckets: list[int], capture: bool = True) -> None:
        super().__init__(runner, buckets, 1, runner.max_blocks_per_seq, capture)

    def _static(self, bs: int) -> ForwardBatch:
        meta = AttentionMetadata(
            num_seqs=bs, num_decodes=bs, query_start=list(range(bs + 1)), seq_lens_host=[1] * bs,
            cu_seqlens_q=self.cu[: bs + 1], seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            max_q_len=1, max_seq_len=self.runner.max_model_len, num_splits=self.runner.num_splits(bs),
        )
        return ForwardBatch(self.input_ids[:bs], self.positions[:bs], self.seq_idx[:bs], meta, None)

    def run(self, ids, pos, lens, tables, patch, prev) -> torch.Tensor:
        """Logits [b, V] of b one-query rows (host lists: a decode step, or a mixed step unrolled to one row per
        token), replayed in the smallest bucket >= b."""
        b = len(ids)
        bs = self.bucket(b)
        self._load(bs, ids, pos, lens, tables, max(len(t) for t in tables))
        if patch:
            self.runner._patch(self.input_ids, patch, prev)
        return self.graphs.run(bs, lambda _: self.runner.forward(self._eager(bs, lens)))[:b]
