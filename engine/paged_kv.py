"""Paged KV cache: block allocator, per-sequence block tables, and KV tensors sized from free GPU memory.

Layout per layer: k[l], v[l] [num_blocks, Hkv, block_size, D] (see engine/kernels/reference_paged.py).
Block 0 is reserved as a zeroed scratch block: padding rows of a CUDA-graph bucket point their block tables at it,
so their (discarded) writes never touch a live sequence.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

SCRATCH_BLOCK = 0


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the request; the message says how many were asked for and how many are free."""


class BlockAllocator:
    """Free-list allocator over block ids 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 blocks (one is the scratch block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise KVCacheFull(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks - 1}")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for blk in blocks:
            if blk not in self._used:
                raise ValueError(f"block {blk} is not allocated (double free?)")
            self._used.remove(blk)
            self._free.append(blk)


@dataclass
class KVMemoryPlan:
    """How the KV budget was derived (reported in benchmark results)."""

    total_bytes: int  # device memory
    free_bytes: int  # cudaMemGetInfo free, after the warm-up
    peak_bytes: int  # torch peak allocated during the warm-up (weights + activations)
    current_bytes: int  # torch allocated after the warm-up (weights)
    fraction: float  # share of total memory the process may use
    bytes_per_block: int
    num_blocks_fit: int  # what the fraction allows
    num_blocks: int  # what was allocated (capped by max_blocks when given)
    kv_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * block_size * head_dim * itemsize


def plan_kv_blocks(
    block_bytes: int, fraction: float, device: torch.device | str = "cuda", max_blocks: int | None = None
) -> KVMemoryPlan:
    """Blocks that fit in `fraction` of the device memory after a warm-up (nano-vllm's rule): the budget is
    total * fraction - (memory used by anyone) - (torch peak during warm-up) + (torch current), i.e. the warm-up's
    activation peak stays reserved for the real run. Call after the warm-up forward."""
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    current = torch.cuda.memory_allocated(device)
    used = total - free
    budget = int(total * fraction - used - peak + current)
    fit = max(0, budget // block_bytes)
    n = fit if max_blocks is None else min(fit, max_blocks)
    return KVMemoryPlan(total, free, peak, current, fraction, block_bytes, fit, n, n * block_bytes)


class PagedKVCache:
    """KV tensors for all layers plus block tables for up to max_seqs sequence slots."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = math.ceil(max_seq_len / block_size)
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, NB, Hkv, BS, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, SCRATCH_BLOCK].zero_()
        self.v[:, SCRATCH_BLOCK].zero_()
        # host copy is the truth; the device copy is refreshed by sync_tables()
        self.tables_host = torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32)
        self.block_tables = torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._blocks: dict[int, list[int]] = {}  # slot -> its blocks
        self.capacity: dict[int, int] = {}  # slot -> tokens its blocks hold

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, slot: int, num_tokens: int) -> list[int]:
        """Make slot's blocks hold at least num_tokens tokens (grows the table; never shrinks)."""
        if not 0 <= slot < self.max_seqs:
            raise IndexError(f"slot {slot} outside 0..{self.max_seqs - 1}")
        if num_tokens > self.max_seq_len:
            raise ValueError(f"{num_tokens} tokens > max_seq_len {self.max_seq_len}")
        have = self._blocks.setdefault(slot, [])
        need = math.ceil(num_tokens / self.block_size) - len(have)
        if need > 0:
            new = self.allocator.allocate(need)
            self.tables_host[slot, len(have) : len(have) + need] = torch.tensor(new, dtype=torch.int32)
            have.extend(new)
        self.capacity[slot] = len(have) * self.block_size
        return have

    def release(self, slot: int) -> None:
        blocks = self._blocks.pop(slot, [])
        self.allocator.free(blocks)
        self.tables_host[slot].zero_()
        self.capacity.pop(slot, None)

    def release_all(self) -> None:
        for slot in list(self._blocks):
            self.release(slot)

    def sync_tables(self) -> None:
        """Copy the host block tables to the device tensor (in place: CUDA graphs keep reading the same one)."""
        self.block_tables.copy_(self.tables_host, non_blocking=False)

    def slots(self, seq_slots: list[int], positions: list[list[int]] | None = None) -> torch.Tensor:
        """Flat slot mapping (int64, host) for the given sequence slots and per-slot positions."""
        out: list[int] = []
        for s, pos in zip(seq_slots, positions or [], strict=True):
            blocks = self._blocks[s]
            out.extend(blocks[p // self.block_size] * self.block_size + p % self.block_size for p in pos)
        return torch.tensor(out, dtype=torch.int64)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]
