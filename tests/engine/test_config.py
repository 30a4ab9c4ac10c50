"""ModelConfig from HF config.json: families, RoPE (incl. Llama-3 scaling, against transformers), windows, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engine.config import ModelConfig, RopeScaling
from engine.model import rope_inv_freq
from engine.testing import LLAMA3_SCALING_SMALL, tiny_config

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
}


def test_llama3_8b_config_and_derived_values():
    c = ModelConfig.from_hf(LLAMA3_8B)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert c.head_dim == 128 and c.q_size == 4096 and c.kv_size == 1024 and c.qkv_size == 6144 and c.n_rep == 4
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert not c.tie_word_embeddings and not c.qkv_bias and c.window(0) == 0
    assert c.attn_scale == pytest.approx(128**-0.5)
    assert 8.0e9 < c.num_params < 8.1e9


def test_transformers5_rope_parameters_form():
    d = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {**LLAMA3_8B["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(d) == ModelConfig.from_hf(LLAMA3_8B)


def test_explicit_head_dim_tied_and_single_eos():
    d = tiny_config("mistral", head_dim=32, tie_word_embeddings=True).to_hf()
    d["eos_token_id"] = 7
    c = ModelConfig.from_hf(d)
    assert c.head_dim == 32 and c.q_size == 128 and c.dim == 64
    assert c.tie_word_embeddings and c.eos_token_ids == (7,)


def test_mistral_sliding_window_every_layer():
    c = ModelConfig.from_hf({**tiny_config("mistral").to_hf(), "sliding_window": 16})
    assert [c.window(i) for i in range(c.n_layers)] == [16, 16]
    assert ModelConfig.from_hf({**tiny_config("mistral").to_hf(), "sliding_window": None}).window(0) == 0


def test_qwen2_bias_and_use_sliding_window():
    base = tiny_config("qwen2").to_hf()
    off = ModelConfig.from_hf({**base, "use_sliding_window": False, "sliding_window": 16})
    assert off.qkv_bias and off.window(0) == 0 and off.window(1) == 0
    on = ModelConfig.from_hf({**base, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1})
    assert [on.window(i) for i in range(2)] == [0, 16]
    typed = ModelConfig.from_hf(
        {
            **base,
            "use_sliding_window": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    )
    assert [typed.window(i) for i in range(2)] == [8, 0]


@pytest.mark.parametrize(
    "config",
    [
        tiny_config("llama"),
        tiny_config("llama", rope_scaling=LLAMA3_SCALING_SMALL, tie_word_embeddings=True, eos_token_ids=(2, 3)),
        tiny_config("mistral", sliding_window=16, head_dim=32),
        tiny_config("qwen2", sliding_window=16, sliding_layers=(1,), eos_token_ids=()),
    ],
)
def test_to_hf_round_trip(config):
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING_SMALL, RopeScaling(8.0, 1.0, 4.0, 8192)])
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (128, 500000.0)])
def test_inv_freq_equals_transformers(scaling, head_dim, theta):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = tiny_config("llama", dim=head_dim * 4, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in c.to_hf().items() if k != "architectures"})
    if scaling is None:
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    else:
        inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert torch.equal(rope_inv_freq(c), inv)
    if scaling is not None:
        assert not torch.equal(inv, rope_inv_freq(tiny_config("llama", dim=head_dim * 4, rope_theta=theta)))


def test_unsupported_model_type_names_it(tmp_path):
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf(), "model_type": "falcon"}))
    with pytest.raises(ValueError, match=r"falcon.*") as e:
        ModelConfig.from_dir(tmp_path)
    assert "config.json" in str(e.value)


def test_unsupported_rope_and_act_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf({**tiny_config().to_hf(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="gelu"):
        ModelConfig.from_hf({**tiny_config().to_hf(), "hidden_act": "gelu"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf({k: v for k, v in tiny_config().to_hf().items() if k != "num_hidden_layers"})


def test_frozen():
    c = tiny_config()
    with pytest.raises(AttributeError):
        c.dim = 3


# ---- value validation: bad sizes / numerics are refused with the HF key named -----------------------------------
_SIZE_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim", "max_position_embeddings"]


@pytest.mark.parametrize("key", _SIZE_KEYS)
@pytest.mark.parametrize("value", [0, -4, 32.0, 2.5, True, "32", [4]])
def test_bad_size_is_refused_naming_the_key(key, value):
    d = {**tiny_config().to_hf(), key: value}
    with pytest.raises(ValueError, match=rf"^{key}: expected a positive int, got {re.escape(repr(value))}$"):
        ModelConfig.from_hf(d)


def test_bad_size_message_example_and_from_dir(tmp_path):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf({**LLAMA3_8B, "num_attention_heads": "32"})
    assert str(e.value) == "num_attention_heads: expected a positive int, got '32'"
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf(), "vocab_size": -1}))
    with pytest.raises(ValueError, match=r"config\.json: vocab_size: expected a positive int, got -1"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "16"])
def test_bad_sliding_window_is_refused(family, value):
    d = {**tiny_config(family).to_hf(), "sliding_window": value, "use_sliding_window": True}
    with pytest.raises(ValueError, match=r"^sliding_window: expected a non-negative int"):
        ModelConfig.from_hf(d)


def test_sliding_window_zero_and_null_mean_full_attention():
    for value in (0, None):
        c = ModelConfig.from_hf({**tiny_config("mistral").to_hf(), "sliding_window": value})
        assert c.sliding_window == 0 and c.window(0) == 0


@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [0, 0.0, -1e-5, float("nan"), float("inf"), True, "1e-5", None])
def test_bad_eps_and_theta_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: expected a positive finite number, got "):
        ModelConfig.from_hf({**tiny_config().to_hf(), key: value})


def test_bad_theta_in_rope_parameters_is_refused():
    d = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {**LLAMA3_8B["rope_scaling"], "rope_theta": "5e5"}
    with pytest.raises(ValueError, match=r"rope_theta: expected a positive finite number, got '5e5'"):
        ModelConfig.from_hf(d)


def test_null_optional_keys_keep_their_defaults():
    d = {**tiny_config().to_hf(), "num_key_value_heads": None, "head_dim": None}
    c = ModelConfig.from_hf(d)
    assert c.n_kv_heads == c.n_heads and c.head_dim == c.dim // c.n_heads
    assert ModelConfig.from_hf({**d, "rms_norm_eps": 1e-6, "rope_theta": 1000000}).rope_theta == 1000000


@pytest.mark.parametrize("field,key,value", [
    ("vocab_size", "vocab_size", 0), ("dim", "hidden_size", "64"), ("n_layers", "num_hidden_layers", 2.0),
    ("n_heads", "num_attention_heads", -4), ("n_kv_heads", "num_key_value_heads", True),
    ("ffn_dim", "intermediate_size", 0), ("head_dim", "head_dim", -2),
    ("max_position_embeddings", "max_position_embeddings", 0), ("sliding_window", "sliding_window", -1),
    ("rms_norm_eps", "rms_norm_eps", 0.0), ("rope_theta", "rope_theta", float("nan")),
])
def test_direct_construction_is_validated_too(field, key, value):
    with pytest.raises(ValueError, match=rf"^{key}: expected a "):
        tiny_config(**{field: value})
