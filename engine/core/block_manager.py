"""Paged KV blocks with reference counts: which blocks each request holds, allocated as its tokens grow and
freed the moment it finishes, is aborted or preempted (nano-vllm's BlockManager). Block 0 is the scratch block
and never handed out. A block shared by several holders (a cached prefix) returns to the free list when its
last reference goes, or, when the prefix cache names it (engine/core/prefix_cache.py: a finished session's
blocks), stays cached and idle: it counts as free, and allocation takes plain free blocks first, then evicts
idle cached blocks least recently used first."""

from __future__ import annotations

import math
from collections import deque

from engine.core.prefix_cache import PrefixCache
from engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the scratch block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(1, num_blocks))
        self.cache = PrefixCache(block_size)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and idle cached ones (evicted on demand)."""
        return len(self.free_ids) + len(self.cache.idle)

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
        return n <= self.num_free

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow req's blocks to hold num_tokens tokens; False (nothing changed) when too few are free."""
        n = self.needed(req, num_tokens)
        if n > self.num_free:
            return False
        for _ in range(n):
            b = self.free_ids.popleft() if self.free_ids else self.cache.evict()
            self.ref[b] = 1
            req.block_ids.append(b)
        return True

    def share(self, req: Request, blocks: list[int]) -> None:
        """Give req extra references to already-filled blocks (a cached prefix; an idle one leaves the LRU)."""
        for b in blocks:
            if self.ref[b] <= 0:
                if b not in self.cache.idle:
                    raise ValueError(f"block {b} is not allocated")
                del self.cache.idle[b]
            self.ref[b] += 1
            req.block_ids.append(b)

    def match(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Cached blocks of the longest prefix of token_ids (full blocks, at most max_tokens tokens)."""
        return self.cache.lookup(token_ids, max_tokens)

    def cache_blocks(self, req: Request) -> None:
        """Name req's full computed blocks by content (prompt + output so far), so they outlive it as a prefix."""
        toks = req.prompt_ids + req.output_ids
        n = min(req.num_computed_tokens, len(toks), len(req.block_ids) * self.block_size) // self.block_size
        for b, (h, t) in zip(req.block_ids, self.cache.chain(toks, n), strict=False):
            self.cache.insert(b, h, t)

    def release(self, blocks: list[int]) -> list[int]:
        """Drop one reference to each block; returns the blocks that became free."""
        freed = []
        for b in blocks:
            if self.ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.cache.hash_of:
                    self.cache.idle[b] = None  # most recently used end
                else:
                    self.free_ids.append(b)
                freed.append(b)
        return freed

    def free(self, req: Request) -> None:
        self.release(req.block_ids[::-1])  # tail first: a cached chain is evicted from its end, never its head
        req.block_ids = []
