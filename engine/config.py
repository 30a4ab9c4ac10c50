"""ModelConfig: the shape and numerics of a Llama-family model, read from an HF config.json (llama, mistral, qwen2)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# ModelConfig field -> its config.json key, with the least value it may take (head_dim 0 = derive it).
_INT_FIELDS = {"vocab_size": ("vocab_size", 1), "dim": ("hidden_size", 1), "n_layers": ("num_hidden_layers", 1),
               "n_heads": ("num_attention_heads", 1), "n_kv_heads": ("num_key_value_heads", 1),
               "ffn_dim": ("intermediate_size", 1), "head_dim": ("head_dim", 0),
               "max_position_embeddings": ("max_position_embeddings", 1), "sliding_window": ("sliding_window", 0)}


def _int(key: str, value: Any, minimum: int = 1) -> int:
    """value as a size: an int (not a bool, float or string) >= minimum, else ValueError naming the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}: expected a {'positive' if minimum else 'non-negative'} int, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    """value as a positive finite float (int or float, not bool or string), else ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}: expected a positive finite number, got {value!r}")
    return float(value)


def _opt(d: dict[str, Any], key: str, default: Any) -> Any:
    """d[key], or default when the key is absent or null (as HF treats a null optional key)."""
    value = d.get(key)
    return default if value is None else value


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"); see engine.model.rope_inv_freq."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # intermediate_size
    head_dim: int = 0  # 0 = dim // n_heads (filled in by __post_init__)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: q/k/v projections carry a bias
    sliding_window: int = 0  # 0 = full attention
    # Layers that use the sliding window (None = every layer). Qwen2 windows only layers >= max_window_layers.
    sliding_layers: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: Anvil supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name, (key, minimum) in _INT_FIELDS.items():
            _int(key, getattr(self, name), minimum)
        _number("rms_norm_eps", self.rms_norm_eps)
        _number("rope_theta", self.rope_theta)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    # ---- derived values ----
    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Rows of the fused [q; k; v] projection."""
        return self.q_size + 2 * self.kv_size

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        return self.head_dim**-0.5

    def window(self, layer: int) -> int:
        """Sliding-window size for one layer (0 = full causal attention)."""
        if self.sliding_window <= 0:
            return 0
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return 0
        return self.sliding_window

    @property
    def num_params(self) -> int:
        per_layer = self.dim * self.qkv_size + self.q_size * self.dim + 3 * self.dim * self.ffn_dim + 2 * self.dim
        if self.qkv_bias:
            per_layer += self.qkv_size
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    @property
    def decode_read_params(self) -> int:
        """Parameters one decode step reads in full: all but the input embedding table (a row lookup per token),
        which is read in full only when it is tied to the lm_head. Times the dtype's bytes: the weight traffic
        that bounds batch-1 decode."""
        return self.num_params - (0 if self.tie_word_embeddings else self.vocab_size * self.dim)

    # ---- HF config.json ----
    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON: {e}") from e
        try:
            return cls.from_hf(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: Anvil supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config lacks required key(s): {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("mlp_bias") or (model_type != "qwen2" and d.get("attention_bias")):
            raise ValueError("unsupported: attention_bias / mlp_bias on a llama/mistral model")
        n_layers = _int("num_hidden_layers", d["num_hidden_layers"])
        n_heads = _int("num_attention_heads", d["num_attention_heads"])
        theta, scaling = _parse_rope(d)
        window, layers = _parse_window(d, model_type, n_layers)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        return cls(
            model_type=model_type,
            vocab_size=_int("vocab_size", d["vocab_size"]),
            dim=_int("hidden_size", d["hidden_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=_int("num_key_value_heads", _opt(d, "num_key_value_heads", n_heads)),
            ffn_dim=_int("intermediate_size", d["intermediate_size"]),
            head_dim=0 if d.get("head_dim") is None else _int("head_dim", d["head_dim"]),
            rms_norm_eps=_number("rms_norm_eps", d.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_int("max_position_embeddings", _opt(d, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            sliding_window=window,
            sliding_layers=layers,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json this config round-trips through (used to write test and random checkpoints)."""
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {"rope_type": "llama3", **asdict(self.rope_scaling)},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if not self.eos_token_ids:
            d["eos_token_id"] = None
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window or None
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window > 0
            d["sliding_window"] = self.sliding_window or None
            d["max_window_layers"] = min(self.sliding_layers) if self.sliding_layers else self.n_layers
            if self.sliding_window and self.sliding_layers is None:
                d["max_window_layers"] = 0
        return d


def _parse_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and Llama-3 scaling from either the legacy (rope_theta + rope_scaling) or the
    transformers>=5 (rope_parameters) form."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = _number("rope_theta", params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("unsupported: partial_rotary_factor != 1")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, llama3)")
    lacking = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if lacking:
        raise ValueError(f"llama3 rope_scaling lacks {', '.join(lacking)}")
    scaling = RopeScaling(
        factor=_number("rope_scaling.factor", params["factor"]),
        low_freq_factor=_number("rope_scaling.low_freq_factor", params["low_freq_factor"]),
        high_freq_factor=_number("rope_scaling.high_freq_factor", params["high_freq_factor"]),
        original_max_position_embeddings=_int(
            "rope_scaling.original_max_position_embeddings",
            params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192)),
        ),
    )
    return theta, scaling


def _parse_window(d: dict[str, Any], model_type: str, n_layers: int) -> tuple[int, tuple[int, ...] | None]:
    """(window, layers using it) as HF applies them: Mistral windows every layer when sliding_window is set;
    Qwen2 only when use_sliding_window, and then only layers >= max_window_layers (or those that layer_types
    marks "sliding_attention")."""
    if model_type == "llama":
        return 0, None
    window = d.get("sliding_window")
    if window is not None:
        _int("sliding_window", window, 0)
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if not window:
        return 0, None
    if model_type == "mistral":
        return window, None
    layer_types = d.get("layer_types")
    if layer_types:
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    else:
        start = _int("max_window_layers", d.get("max_window_layers", 28), 0)
        layers = tuple(range(start, n_layers))
    if len(layers) == n_layers:
        return window, None
    return (window, layers) if layers else (0, None)


# ---------------------------------------------------------------- the engine core's settings
_BACKENDS = ("auto", "torch", "triton")
_FRESH = ("sdpa", "flash", "triton", "tma")
_GEMV = ("tune", "cublas", "triton")
_SPEC = ("none", "draft", "ngram", "lookahead", "medusa")
_ACCEPTANCE = ("rejection", "typical")


@dataclass(frozen=True)
class EngineConfig:
    """How the generation core runs one model: scheduler budget, paged KV cache, CUDA graphs, kernels.
    Frozen and validated at construction; `from_options` builds one from a suite's `[options.anvil]` table."""

    max_num_seqs: int = 256  # requests running at once (decode batch ceiling)
    max_num_batched_tokens: int = 8192  # token budget of one step (decode tokens + prompt chunks)
    max_model_len: int | None = None  # longest prompt + output; None = the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block (a power of two)
    kv_fraction: float = 0.9  # share of GPU memory the process may fill (weights + activations + KV)
    num_kv_blocks: int | None = None  # fixed KV pool size in blocks (tests, forced preemption); None = sized
    chunked_prefill: bool = True  # split prompts longer than prefill_chunk across steps, mixed with decode
    prefill_chunk: int | None = None  # most prompt tokens of one request per step; None = max_num_batched_tokens
    cuda_graphs: bool = True  # replay captured decode steps (CUDA only)
    # Automatic prefix caching (vLLM's APC): the full KV blocks of every finished or preempted request stay cached
    # (idle, evicted least recently used) and a new request starts from the longest cached prefix of its prompt.
    # Off by default here (a benchmark's repeated prompts would skip their prefill); `bench serve` turns it on, as
    # `vllm serve` does. A session's turns (Request.session_id) are cached either way.
    enable_prefix_caching: bool = False
    graph_buckets: tuple[int, ...] | None = None  # decode batch sizes captured; None = 1, 2, 4, 8, 16, 24, 32, ...
    # A mixed step with at most this many prompt tokens replays a decode graph, one row per prompt token (each row
    # a query at its own position over the cache: engine/worker/graphs.py); more runs the eager forward. 0 = never.
    # Serving with a prefix cache makes most arrivals a few uncached tokens beside the running decodes: on the H200
    # 64 halved Poisson 32 req/s TTFT p99 and TPOT (results/gpu/serving-h200/graph-mixed-d0000db/).
    graph_mixed_tokens: int = 64
    attention_backend: str = "auto"  # auto (triton on CUDA, torch elsewhere) | torch | triton
    # Fresh prompts of one length in a step (triton backend): triton = the paged prefill kernel, as for every other
    # prompt row (no per-shape cost); sdpa = one SDPA call, torch's kernel choice (cuDNN on sm_90: faster on long
    # prompts, but it builds a plan per new shape, ~60 ms on the H200 for each new prompt length); flash = SDPA
    # limited to FlashAttention-2 (a one-time ~13 ms start, no per-shape plan); tma = our fresh-prompt kernel over the
    # prompts' own K/V rows through TMA (engine/kernels/triton/fresh_prefill.py; sm_90+, any mix of lengths up to a
    # sliding window, no per-shape cost; elsewhere the paged kernel, the reason in info()), the default: 16-27% faster
    # than the paged kernel from 2,048 tokens on the H100 (results/gpu/core-h100/ttft-cae533b/). Serving prompts of
    # varied lengths: not sdpa (results/gpu/serving-h200/fresh-attention-479d3d7/).
    fresh_attention: str = "tma"
    # sdpa / flash: pad a fresh prompt's SDPA call up to a multiple of this many tokens (zero rows after the prompt;
    # causal masking keeps them out of the real rows), so cuDNN builds one plan per bucket (all warmed at start-up,
    # up to the longest one-step prompt) instead of one per new prompt length. 0 = exact lengths.
    fresh_pad: int = 0
    gemv: str = "tune"  # tune (fastest of Triton configs and cuBLAS per shape, measured) | cublas | triton
    seed: int = 0  # seed of requests that sample without their own
    allow_fallback: bool = False  # True: a fast path that fails to build falls back (reason in info()); else raise
    tensor_parallel_size: int = 1  # ranks the model is split over (engine/distributed; one process per rank)
    spec: str = "none"  # speculative decoding (engine/spec): none | draft | ngram | lookahead | medusa
    num_spec_tokens: int = 4  # k: drafts per request per step, verified in one forward of k+1 tokens
    draft_model: str | None = None  # spec=draft: the draft's folder or name; spec=medusa: the heads' folder (or the
    #                                 model whose medusa/ subfolder holds them)
    # How sampling requests verify drafts (greedy ones always match the argmax): rejection = the lossless rule;
    # typical = Medusa's typical acceptance, p(x) > min(typical_epsilon, typical_delta * exp(-H(p))), with any
    # proposer. LOSSY: outputs no longer follow the target's distribution exactly (engine/spec/verify.py).
    spec_acceptance: str = "rejection"
    typical_epsilon: float = 0.09  # the threshold's ceiling, in (0, 1] (Medusa's posterior_threshold)
    typical_delta: float = 0.3  # the entropy term's factor, > 0 (Medusa's posterior_alpha, sqrt(0.09))

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks", "prefill_chunk"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: need at least 2 (one is the scratch block), got {self.num_kv_blocks}")
        if isinstance(self.kv_fraction, bool) or not isinstance(self.kv_fraction, int | float):
            raise ValueError(f"kv_fraction: expected a number in (0, 1], got {self.kv_fraction!r}")
        if not 0.0 < float(self.kv_fraction) <= 1.0:
            raise ValueError(f"kv_fraction: expected a number in (0, 1], got {self.kv_fraction!r}")
        for name in ("chunked_prefill", "cuda_graphs", "allow_fallback", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend: expected one of {', '.join(_BACKENDS)}, got {self.attention_backend!r}")
        if self.fresh_attention not in _FRESH:
            raise ValueError(f"fresh_attention: expected one of {', '.join(_FRESH)}, got {self.fresh_attention!r}")
        _nonnegative_int("graph_mixed_tokens", self.graph_mixed_tokens, "0: never")
        _nonnegative_int("fresh_pad", self.fresh_pad, "0: no padding")
        if self.gemv not in _GEMV:
            raise ValueError(f"gemv: expected one of {', '.join(_GEMV)}, got {self.gemv!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if self.graph_buckets is not None:
            b = self.graph_buckets
            if not isinstance(b, tuple | list) or not b:
                raise ValueError(f"graph_buckets: expected a non-empty list of positive ints, got {b!r}")
            for i, x in enumerate(b):
                _positive_int(f"graph_buckets[{i}]", x)
            object.__setattr__(self, "graph_buckets", tuple(sorted(set(b))))
        if not self.chunked_prefill and self.prefill_chunk is not None:
            raise ValueError("prefill_chunk: set, but chunked_prefill is false")
        if self.spec not in _SPEC:
            raise ValueError(f"spec: expected one of {', '.join(_SPEC)}, got {self.spec!r}")
        _positive_int("num_spec_tokens", self.num_spec_tokens)
        if self.num_spec_tokens > 32:
            raise ValueError(f"num_spec_tokens: at most 32, got {self.num_spec_tokens}")
        if self.draft_model is not None and (not isinstance(self.draft_model, str) or not self.draft_model):
            raise ValueError(f"draft_model: expected a folder or model name, got {self.draft_model!r}")
        if self.spec in ("draft", "medusa") and self.draft_model is None:
            raise ValueError(f"draft_model: required when spec = {self.spec!r}")
        if self.spec_acceptance not in _ACCEPTANCE:
            raise ValueError(f"spec_acceptance: expected one of {', '.join(_ACCEPTANCE)}, got {self.spec_acceptance!r}")
        eps = self.typical_epsilon
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < eps <= 1.0:  # NaN fails too
            raise ValueError(f"typical_epsilon: expected a number in (0, 1], got {self.typical_epsilon!r}")
        _number("typical_delta", self.typical_delta)

    @property
    def chunk(self) -> int:
        """Most prompt tokens one request computes in a step."""
        if not self.chunked_prefill:
            return self.max_num_batched_tokens
        return min(self.prefill_chunk or self.max_num_batched_tokens, self.max_num_batched_tokens)

    def model_len(self, model: ModelConfig) -> int:
        return min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> EngineConfig:
        """From a suite's options table: an unknown key or a wrong type is a ValueError naming the key."""
        known = cls.fields()
        unknown = sorted(k for k in opts if k not in known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown engine option (known: {', '.join(known)})")
        kw = dict(opts)
        if isinstance(kw.get("graph_buckets"), list):
            kw["graph_buckets"] = tuple(kw["graph_buckets"])
        return cls(**kw)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _nonnegative_int(name: str, v: Any, zero: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}: expected an int >= 0 ({zero}), got {v!r}")
