"""What one forward computes: flattened tokens and, per sequence, where its queries and its KV blocks are.

Sequences are ordered decodes first: sequences 0 .. num_decodes-1 have one query each (tokens 0 .. num_decodes-1);
the rest are prompt chunks or speculative verifications (q_len >= 1) over a cached prefix. Sequence b's queries
are tokens query_start[b] .. query_start[b+1]-1 at positions seq_lens[b] - q_len .. seq_lens[b] - 1; its keys are
positions 0 .. seq_lens[b] - 1 in the paged cache (the new tokens' K/V are written before attention reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_decodes: int  # leading sequences with q_len == 1
    query_start: list[int]  # host [B+1]: token offsets of each sequence's queries
    seq_lens_host: list[int]  # host [B]: cached tokens incl. this step's, per sequence
    cu_seqlens_q: torch.Tensor  # [B+1] int32, device copy of query_start
    seq_lens: torch.Tensor  # [B] int32, device copy of seq_lens_host (graph buckets: padding rows 0)
    block_tables: torch.Tensor  # [B, max_blocks] int32, block ids (0 = the scratch block)
    max_q_len: int
    max_seq_len: int
    num_splits: int = 1  # split-KV programs per (sequence, KV head) for the decode kernel

    @property
    def all_decode(self) -> bool:
        return self.num_decodes == self.num_seqs


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    seq_idx: torch.Tensor  # [T] int32, the sequence (row of block_tables) of each token
    attn: AttentionMetadata
    logits_indices: torch.Tensor | None = None  # rows whose logits are wanted; None = every row

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
