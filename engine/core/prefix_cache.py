"""Content-addressed KV blocks for session reuse: a full block is named by its chain hash, hash(parent's hash, its
token ids), so one name means one whole prefix; a later request whose tokens start with that prefix shares the block
instead of computing it again. A cached block that no request holds is idle: it counts as free and is evicted least
recently used when blocks are needed (the BlockManager takes plain free blocks first)."""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.by_hash: dict[int, int] = {}  # chain hash -> block id
        self.hash_of: dict[int, int] = {}  # block id -> chain hash
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # block id -> its token ids (a hash collision never matches)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with no holder, least recently used first
        self.query_tokens = 0  # prompt tokens of admitted requests (first admission)
        self.hit_tokens = 0  # of them, taken from the cache
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.hash_of)

    def chain(self, token_ids: list[int], num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """(chain hash, token ids) of the first num_blocks full blocks of token_ids."""
        out, parent, bs = [], None, self.block_size
        for i in range(num_blocks):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = hash((parent, toks))
            out.append((parent, toks))
        return out

    def lookup(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Blocks of the longest cached prefix of token_ids that is at most max_tokens long (full blocks only)."""
        found = []
        for h, toks in self.chain(token_ids, max(0, max_tokens) // self.block_size):
            b = self.by_hash.get(h)
            if b is None or self.tokens_of[b] != toks:
                break
            found.append(b)
        return found

    def insert(self, block: int, h: int, toks: tuple[int, ...]) -> None:
        """Name a filled block (no-op when the block or the name is already cached: the first copy wins)."""
        if block in self.hash_of or h in self.by_hash:
            return
        self.by_hash[h], self.hash_of[block], self.tokens_of[block] = block, h, toks

    def evict(self) -> int | None:
        """Forget the least recently used idle block and return it (None when none is idle)."""
        if not self.idle:
            return None
        b, _ = self.idle.popitem(last=False)
        del self.by_hash[self.hash_of.pop(b)]
        del self.tokens_of[b]
        self.evictions += 1
        return b

    def record(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def stats(self) -> dict:
        return {"cached_blocks": len(self.hash_of), "idle_blocks": len(self.idle), "query_tokens": self.query_tokens,
                "hit_tokens": self.hit_tokens, "hit_rate": self.hit_rate, "evictions": self.evictions}  # fmt: skip
