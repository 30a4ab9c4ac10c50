"""CUDA graphs of the ordinary forward for decode-only steps, one per batch-size bucket (nano-vllm's
capture_cudagraph): static input buffers, largest bucket first, one memory pool; a replay is copy-in, replay,
slice. Padding rows of a bucket have seq_len 0 and a zero block-table row, so they write the scratch block and
attend nothing."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata, ForwardBatch
from engine.worker.graph_capture import GraphRunner


class DecodeGraphs:
    def __init__(self, runner, buckets: list[int]) -> None:
        self.runner = runner
        dev = runner.device
        mb = max(buckets)
        self.max_blocks = runner.max_blocks_per_seq
        self.input_ids = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.seq_idx = torch.arange(mb, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.cu = torch.arange(mb + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(mb, self.max_blocks, dtype=torch.int32, device=dev)
        self.batches = {bs: self._static(bs) for bs in buckets}
        self.graphs = GraphRunner(dev)
        with torch.inference_mode():
            self.graphs.capture(lambda bs: runner.model(self.batches[bs]), buckets, self._reset)
        self.buckets = tuple(sorted(self.graphs.graphs))
        self.fallback = self.graphs.fallback

    def _static(self, bs: int) -> ForwardBatch:
        meta = AttentionMetadata(
            num_seqs=bs, num_decodes=bs, query_start=list(range(bs + 1)), seq_lens_host=[1] * bs,
            cu_seqlens_q=self.cu[: bs + 1], seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            max_q_len=1, max_seq_len=self.runner.max_model_len, num_splits=self.runner.num_splits(bs),
        )
        return ForwardBatch(self.input_ids[:bs], self.positions[:bs], self.seq_idx[:bs], meta, None)

    def _reset(self) -> None:
        self.input_ids.zero_()
        self.positions.zero_()
        self.seq_lens.zero_()
        self.block_tables.zero_()

    def bucket(self, b: int) -> int | None:
        return next((x for x in self.buckets if x >= b), None)

    def run(self, ids, pos, lens, tables, patch, prev) -> torch.Tensor:
        """Logits [b, V] of a decode-only step of b sequences (host lists), replayed in the smallest bucket >= b."""
        b = len(ids)
        bs = self.bucket(b)
        r = self.runner
        pad = bs - b
        ncols = max(len(t) for t in tables)
        self.input_ids[:bs].copy_(r._tensor(ids + [0] * pad, torch.int64), non_blocking=True)
        self.positions[:bs].copy_(r._tensor(pos + [0] * pad, torch.int64), non_blocking=True)
        self.seq_lens[:bs].copy_(r._tensor(lens + [0] * pad, torch.int32), non_blocking=True)
        rows = [t + [0] * (ncols - len(t)) for t in tables] + [[0] * ncols] * pad
        self.block_tables[:bs, :ncols].copy_(r._tensor(rows, torch.int32), non_blocking=True)
        if patch:
            r._patch(self.input_ids, patch, prev)
        return self.graphs.run(bs, lambda _: r.model(self.batches[bs]))[:b]

