"""The paged KV tensors and how many blocks fit: k, v [L, num_blocks, Hkv, block_size, D], block 0 a zeroed
scratch block (padding rows of a graph bucket point at it, so their writes never touch a live sequence).
Which request owns which block is engine/core/block_manager.py's business."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SCRATCH_BLOCK = 0


@dataclass
class KVMemoryPlan:
    """How the KV budget was derived (reported in info() and benchmark results)."""

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


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the scratch block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, NB, Hkv, BS, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, SCRATCH_BLOCK].zero_()
        self.v[:, SCRATCH_BLOCK].zero_()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
