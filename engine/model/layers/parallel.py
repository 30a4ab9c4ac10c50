"""Tensor-parallel layers (Megatron / vLLM's ColumnParallelLinear, RowParallelLinear, QKVParallelLinear,
VocabParallelEmbedding, ParallelLMHead) and the sharding rule every rank loads its weights by.

Each rank builds the model from `TPShard.local_config(config)`: the same ModelConfig with this rank's query heads,
KV heads and ffn rows (dim, vocab, head_dim and everything else unchanged), so attention, its backend, the paged
KV pool (sharded by KV head: each rank's pool holds only its heads) and the model runner run unchanged.

- Column-parallel (no communication): wqkv holds the rank's [q; k; v] rows — query heads
  [r H/W, (r+1) H/W) and the KV heads they read; when Hkv < W each KV head is replicated on W/Hkv ranks (rank r
  keeps KV head r Hkv / W), as vLLM's QKVParallelLinear does. w13 holds rows [f0, f1) of gate and of up (the fused
  [gate; up] layout sliced per rank, so SiLU-and-mul stays local). qwen2's q/k/v biases are sliced the same way.
- Row-parallel (RowParallelLinear): wo and w2 hold the columns of the rank's heads / ffn rows; the partial
  products are summed by one all-reduce, and the residual is added after it, exactly once.
- VocabParallelEmbedding: rows [v0, v1) of the table (the last rank's padded with zero rows to V/W rounded up);
  ids outside the range look up row 0 and are zeroed, then one all-reduce.
- The lm_head (untied `output`, or the tied embedding shard): local logits [N, V/W] all-gathered into [N, V] on
  every rank, so every rank samples the same token from the same logits with the same seeded generator.

Divisibility: n_heads % W == 0; n_kv_heads % W == 0 or W % n_kv_heads == 0 (replication); ffn_dim and vocab
may split unevenly (ffn rows balanced, vocab padded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.distributed import state
from engine.model.layers.linear import Linear


def _split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Balanced contiguous split of n rows: rank's [start, stop)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class TPShard:
    """Which part of the model one rank holds (rank r of a world of W)."""

    rank: int
    world: int
    config: ModelConfig  # the full model's config

    def __post_init__(self) -> None:
        c, w = self.config, self.world
        if not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} outside a world of {w}")
        if c.n_heads % w:
            raise ValueError(f"tensor_parallel_size {w}: num_attention_heads {c.n_heads} is not divisible by it")
        if c.n_kv_heads % w and w % c.n_kv_heads:
            raise ValueError(f"tensor_parallel_size {w}: num_key_value_heads {c.n_kv_heads} neither divides it "
                             f"nor is divisible by it (KV heads are split or replicated)")  # fmt: skip
        if c.ffn_dim < w:
            raise ValueError(f"tensor_parallel_size {w}: intermediate_size {c.ffn_dim} is smaller than it")

    # ---- sizes
    @property
    def heads(self) -> tuple[int, int]:
        """This rank's query heads [start, stop)."""
        n = self.config.n_heads // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """This rank's KV heads [start, stop): a slice, or the one replicated head its query heads read."""
        hkv, w = self.config.n_kv_heads, self.world
        if hkv >= w:
            n = hkv // w
            return self.rank * n, (self.rank + 1) * n
        h = self.rank * hkv // w
        return h, h + 1

    @property
    def kv_replicas(self) -> int:
        return max(1, self.world // self.config.n_kv_heads)

    @property
    def ffn(self) -> tuple[int, int]:
        return _split(self.config.ffn_dim, self.world, self.rank)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab(self) -> tuple[int, int]:
        """This rank's vocabulary rows [start, stop) (stop - start may be less than vocab_per_rank on the last)."""
        p, v = self.vocab_per_rank, self.config.vocab_size
        return min(self.rank * p, v), min((self.rank + 1) * p, v)

    def local_config(self) -> ModelConfig:
        """The per-rank view the model, attention, KV pool and runner are built from."""
        (h0, h1), (k0, k1), (f0, f1) = self.heads, self.kv_heads, self.ffn
        return replace(self.config, n_heads=h1 - h0, n_kv_heads=k1 - k0, ffn_dim=f1 - f0,
                       head_dim=self.config.head_dim)  # fmt: skip

    # ---- the sharding rule of each checkpoint tensor (HF names)
    def hf_slice(self, name: str) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, padded_rows) of the HF tensor this rank reads, or None for a replicated one."""
        d = self.config.head_dim
        (h0, h1), (k0, k1), (f0, f1), (v0, v1) = self.heads, self.kv_heads, self.ffn, self.vocab
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, v0, v1, self.vocab_per_rank
        leaf = name.rsplit(".", 2)[-2]  # q_proj / gate_proj / ... / input_layernorm
        if leaf == "q_proj":
            return 0, h0 * d, h1 * d, 0
        if leaf in ("k_proj", "v_proj"):
            return 0, k0 * d, k1 * d, 0
        if leaf == "o_proj":
            return 1, h0 * d, h1 * d, 0
        if leaf in ("gate_proj", "up_proj"):
            return 0, f0, f1, 0
        if leaf == "down_proj":
            return 1, f0, f1, 0
        return None  # norms

    def read(self, name: str, sl) -> torch.Tensor:
        """This rank's part of one HF tensor from a safetensors slice (safe_open(...).get_slice(name)): only
        those bytes are read."""
        spec = self.hf_slice(name)
        if spec is None:
            return sl[:]
        dim, a, b, pad = spec
        t = sl[a:b] if dim == 0 else sl[:, a:b]
        if pad and t.shape[0] < pad:
            t = torch.cat([t, t.new_zeros((pad - t.shape[0], *t.shape[1:]))], dim=0)
        return t


# ---------------------------------------------------------------- layers
class RowParallelLinear(Linear):
    """Input split by rank (this rank's heads / ffn rows), output summed over ranks: y = all_reduce(W_r @ f(x_r))
    (+ residual after the all-reduce, exactly once). The method (dense, tuned GEMV, int4) does the local matmul;
    a residual is never passed to it, so no kernel fuses it before the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, method=None) -> None:
        if bias:
            raise ValueError("RowParallelLinear: a bias would be summed W times (Llama-family o/down have none)")
        super().__init__(in_features, out_features, bias=False, method=method)

    def forward(self, x, norm=None, act=False, residual=None):
        y = state.all_reduce(self.method.apply(self, x, norm=norm, act=act))
        return y if residual is None else residual + y


def row_linear(tp: TPShard | None, in_features: int, out_features: int, method=None) -> Linear:
    """A row-parallel Linear under tensor parallelism (world > 1), else a plain one."""
    if tp is None or tp.world == 1:
        return Linear(in_features, out_features, method=method)
    return RowParallelLinear(in_features, out_features, method=method)


class VocabParallelEmbedding(nn.Module):
    """Rows [v0, v1) of the embedding table (padded to vocab_per_rank); masked lookup + all-reduce."""

    def __init__(self, tp: TPShard, dim: int) -> None:
        super().__init__()
        self.start, self.stop = tp.vocab
        self.weight = nn.Parameter(torch.empty(tp.vocab_per_rank, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return state.all_reduce(out)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.stop}) of the vocabulary, {self.weight.shape[0]} rows held"


def gather_logits(local: torch.Tensor, tp: TPShard) -> torch.Tensor:
    """Local logits [N, vocab_per_rank] -> the full [N, V] on every rank (padding columns dropped)."""
    return state.all_gather(local, dim=-1)[:, : tp.config.vocab_size]
