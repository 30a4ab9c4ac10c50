"""THE forward of the Llama family (llama, mistral with sliding windows, qwen2 with QKV bias) over a ForwardBatch.

Every path runs this code: the reference loop, the scheduler's mixed prefill/decode steps, CUDA-graph replays,
speculative verification. It is written over the residual stream r [T, dim]: each Linear takes its RMSNorm as a
prologue and the residual add as an epilogue (engine/model/layers/linear.py), so a kernel may fuse them; the
attention layer's backend does RoPE, the paged KV write and attention. Shapes: T tokens, H query heads, Hkv KV
heads, D head dim, V vocab. Parameter names are the engine's checkpoint names (engine/weights.py maps HF's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine import nvtx, ops
from engine.attention.base import AttentionBackend
from engine.attention.metadata import ForwardBatch
from engine.config import ModelConfig
from engine.model.layers.attention import Attention
from engine.model.layers.linear import Linear, LinearMethod
from engine.model.layers.norm import RMSNorm
from engine.model.layers.parallel import TPShard, VocabParallelEmbedding, gather_logits, row_linear
from engine.model.layers.rotary import rope_inv_freq


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, method: LinearMethod | None = None, tp: TPShard | None = None) -> None:
        super().__init__()
        self.w13 = Linear(config.dim, 2 * config.ffn_dim, method=method)  # [gate; up] rows (this rank's, under TP)
        self.w2 = row_linear(tp, config.ffn_dim, config.dim, method=method)  # row-parallel under TP: all-reduce

    def forward(self, r: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """r + w2(silu(gate) * up), [gate | up] = w13(norm(r))."""
        return self.w2(self.w13(r, norm=norm), act=True, residual=r)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, method: LinearMethod | None = None,
                 tp: TPShard | None = None) -> None:  # fmt: skip
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config, layer, method, tp)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward = FeedForward(config, method, tp)

    def forward(self, r: torch.Tensor, batch: ForwardBatch, cos_sin: torch.Tensor) -> torch.Tensor:
        r = self.attention(r, self.attention_norm, batch, cos_sin)
        return self.feed_forward(r, self.ffn_norm)


class Transformer(nn.Module):
    """Build on the meta device and load with `from_state_dict` (weights.py / presets.py do this); the model
    runner binds an attention backend and the paged KV cache before the first forward.

    Tensor parallelism: `tp` (engine/model/layers/parallel.py) and `config` = tp.local_config() (this rank's
    heads / KV heads / ffn rows): vocab-parallel embedding and lm_head, row-parallel wo / w2."""

    def __init__(self, config: ModelConfig, method: LinearMethod | None = None, tp: TPShard | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.world > 1 else None
        tp = self.tp
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim) if tp is None else \
            VocabParallelEmbedding(tp, config.dim)  # fmt: skip
        self.layers = nn.ModuleList(Block(config, i, method, tp) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        n_out = config.vocab_size if tp is None else tp.vocab_per_rank
        self.output = None if config.tie_word_embeddings else Linear(config.dim, n_out)
        self._cos_sin: torch.Tensor | None = None  # [max_pos, D] float32; not a buffer so .to(dtype) keeps it fp32
        self.capture_hidden = False  # True: forward keeps each layer's output in self.hidden (layer-wise parity)
        self.hidden: list[torch.Tensor] = []

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor], tp: TPShard | None = None
                        ) -> Transformer:  # fmt: skip
        """Engine-named tensors (already on their device and dtype) -> model, without copying them. Under
        tensor parallelism `config` is tp.local_config() and `state` this rank's shard."""
        with torch.device("meta"):
            model = cls(config, tp=tp)
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False).eval()
        for m in model.modules():
            if isinstance(m, Linear):
                m.method.process_weights_after_loading(m)
        model.ensure_rope(min(config.max_position_embeddings, 32768))
        return model

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def ensure_rope(self, max_pos: int) -> None:
        """Make the cos/sin table cover positions 0 .. max_pos-1 on the model's device."""
        t = self._cos_sin
        if t is None or t.shape[0] < max_pos or t.device != self.device:
            n = max(max_pos, 0 if t is None else t.shape[0])
            self._cos_sin = ops.rope_cos_sin(rope_inv_freq(self.config, self.device), n)

    def bind(self, backend: AttentionBackend, k: torch.Tensor, v: torch.Tensor) -> None:
        """Attach the attention backend and the paged KV cache k/v [L, num_blocks, Hkv, block_size, D]."""
        for block, kc, vc in zip(self.layers, k, v, strict=True):
            att = block.attention
            att.backend, att.k_cache, att.v_cache = backend, kc, vc

    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads as stored (4-bit packed weights, scales and zeros included): every
        Linear and norm; the input embedding table only when the lm_head shares it (one row of it otherwise)."""
        total = 0
        for mod in self.modules():
            if isinstance(mod, Linear | RMSNorm):
                ts = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
                total += sum(t.numel() * t.element_size() for t in ts)
        if self.output is None:
            total += self.tok_embeddings.weight.numel() * self.tok_embeddings.weight.element_size()
        return total

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [N, V] (model dtype) at batch.logits_indices (every row when None)."""
        cos_sin = self._cos_sin
        r = self.tok_embeddings(batch.input_ids)  # [T, dim], the residual stream
        self.hidden = []
        for i, layer in enumerate(self.layers):
            with nvtx.range(f"layer{i}"):
                r = layer(r, batch, cos_sin)
            if self.capture_hidden:
                self.hidden.append(r)
        if batch.logits_indices is not None:
            r = r[batch.logits_indices]  # [N, dim]
        logits = self.output(r, norm=self.norm) if self.output is not None else self._tied_head(r)  # [N, V]
        return logits if self.tp is None else gather_logits(logits, self.tp)  # [N, V/W] per rank -> [N, V]

    def _tied_head(self, r: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.norm(r), self.tok_embeddings.weight)


@dataclass
class LoadedModel:
    """What engine.load and engine.presets.synthetic return."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any | None = None  # engine.tokenizer.Tokenizer, or None when the folder has no tokenizer files
