"""Paged KV blocks with reference counts: which blocks each request holds, allocated as its tokens grow and
freed the moment it finishes, is aborted or preempted (nano-vllm's BlockManager). Block 0 is the scratch block
and never handed out. A block shared by several holders (a cached prefix) returns to the free list when its
last reference goes."""

from __future__ import annotations

import math
from collections import deque

from engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the scratch block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Share of usable blocks in use (0..1)."""
        return 1.0 - self.num_free / self.num_usable

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def needed(self, req: Request, num_tokens: int) -> int:
        """Blocks req must get so that its first num_tokens tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(req.block_ids))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow req's blocks to hold num_tokens tokens; False (nothing changed) when too few are free."""
        n = self.needed(req, num_tokens)
        if n > len(self.free_ids):
            return False
        for _ in range(n):
            b = self.free_ids.popleft()
            self.ref[b] = 1
            req.block_ids.append(b)
        return True

    def share(self, req: Request, blocks: list[int]) -> None:
        """Give req extra references to already-filled blocks (a cached prefix)."""
        for b in blocks:
            if self.ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self.ref[b] += 1
            req.block_ids.append(b)

    def release(self, blocks: list[int]) -> list[int]:
        """Drop one reference to each block; returns the blocks that became free."""
        freed = []
        for b in blocks:
            if self.ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_ids.append(b)
                freed.append(b)
        return freed

    def free(self, req: Request) -> None:
        self.release(req.block_ids)
        req.block_ids = []
