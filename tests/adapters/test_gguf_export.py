"""GGUF export: tensor names, layouts (Q/K permutation), hyperparameters and SentencePiece metadata, read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf not installed: pip install gguf")

from engine import gguf_export  # noqa: E402
from tests.adapters._tiny import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mistral"), arch="mistral", tokenizer=False, tie=True)


def _fields(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if not f.data:
            continue
        vals = [f.parts[i] for i in f.data]
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(vals[0]).decode()
        elif f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(v) for v in vals]
            else:
                out[name] = [v.item() for v in vals]
        else:
            out[name] = vals[0].item()
    return out


def _rope_rotate_half(x, pos, theta=10000.0):
    """HF: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos * inv
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[d // 2:], x[: d // 2]])
    return x * cos + rot * sin


def _rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp (LLAMA_ROPE_TYPE_NORM): pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos * inv
    out = x.copy()
    out[0::2] = x[0::2] * np.cos(ang) - x[1::2] * np.sin(ang)
    out[1::2] = x[0::2] * np.sin(ang) + x[1::2] * np.cos(ang)
    return out


def test_permute_qk_turns_hf_rope_into_llamacpp_rope():
    rng = np.random.default_rng(0)
    n_head, head_dim, dim = 3, 8, 5
    w, h = rng.standard_normal((n_head * head_dim, dim)), rng.standard_normal(dim)
    wp = gguf_export.permute_qk(w, n_head)
    for head in range(n_head):
        sl = slice(head * head_dim, (head + 1) * head_dim)
        hf = _rope_rotate_half(w[sl] @ h, pos=7)
        cpp = _rope_interleaved(wp[sl] @ h, pos=7)
        # same attention scores need the same vectors up to the fixed row permutation of the head
        perm = gguf_export.permute_qk(np.arange(head_dim, dtype=float)[:, None], 1)[:, 0].astype(int)
        np.testing.assert_allclose(cpp, hf[perm], rtol=1e-12, atol=1e-12)


def test_tensor_names():
    assert gguf_export.gguf_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_export.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_export.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(gguf_export.ExportError, match="unexpected tensor"):
        gguf_export.gguf_name("model.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_export_reads_back(llama_dir, tmp_path, outtype):
    import sentencepiece as spm
    from safetensors.numpy import load_file

    out = gguf_export.export(llama_dir, tmp_path / "m.gguf", outtype)
    r = gguf.GGUFReader(out)
    f = _fields(r)
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 160)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.freq_base"] == 10000.0 and f["llama.context_length"] == 256
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.file_type"] == (0 if outtype == "f32" else 1)
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    assert f["tokenizer.ggml.model"] == "llama"
    assert [t.decode() for t in f["tokenizer.ggml.tokens"]] == [sp.id_to_piece(i) for i in range(512)]
    np.testing.assert_allclose(f["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(512)])
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and set(types[259:]) == {gguf.TokenType.NORMAL}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.unknown_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is True

    hf = load_file(llama_dir / "model.safetensors")
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 2 * 9
    want_2d = np.float32 if outtype == "f32" else np.float16
    for name, t in tensors.items():
        assert t.data.dtype == (np.float32 if name.endswith("norm.weight") else want_2d), name
    tol = 0 if outtype == "f32" else 1e-3
    q = gguf_export.permute_qk(hf["model.layers.1.self_attn.q_proj.weight"], 4)
    k = gguf_export.permute_qk(hf["model.layers.1.self_attn.k_proj.weight"], 2)
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight"].data, q, atol=tol)
    np.testing.assert_allclose(tensors["blk.1.attn_k.weight"].data, k, atol=tol)
    np.testing.assert_allclose(tensors["blk.1.attn_v.weight"].data, hf["model.layers.1.self_attn.v_proj.weight"], atol=tol)
    np.testing.assert_allclose(tensors["output.weight"].data, hf["lm_head.weight"], atol=tol)
    np.testing.assert_array_equal(tensors["blk.0.ffn_norm.weight"].data, hf["model.layers.0.post_attention_layernorm.weight"])


def test_mistral_head_dim_tied_and_placeholder_vocab(mistral_dir, tmp_path):
    out = gguf_export.export(mistral_dir, tmp_path / "m.gguf", "bf16")
    r = gguf.GGUFReader(out)
    f = _fields(r)
    assert (f["llama.attention.key_length"], f["llama.attention.value_length"]) == (32, 32)
    assert f["llama.rope.dimension_count"] == 32 and f["llama.rope.freq_base"] == 1e6
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses token_embd
    toks = f["tokenizer.ggml.tokens"]
    assert len(toks) == 512 and toks[:3] == [b"<unk>", b"<s>", b"</s>"] and toks[3] == b"<0x00>"
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16 and list(q.shape) == [64, 128]


def test_cli_and_errors(llama_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    res = subprocess.run([sys.executable, "-m", "engine.gguf_export", str(llama_dir), str(out), "--outtype", "f16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "wrote" in res.stdout and not list(tmp_path.glob("*.partial"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    res = subprocess.run([sys.executable, "-m", "engine.gguf_export", str(bad), str(tmp_path / "x.gguf")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not supported" in res.stderr


def test_missing_tensor_is_named(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (broken / f).write_bytes((llama_dir / f).read_bytes())
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(gguf_export.ExportError, match="blk.1.ffn_up.weight"):
        gguf_export.export(broken, tmp_path / "x.gguf")


def test_cached_export_reuses_and_invalidates(llama_dir, tmp_path):
    import shutil

    a = gguf_export.cached_export(llama_dir, "f32", tmp_path / "cache")
    mtime = a.stat().st_mtime_ns
    assert gguf_export.cached_export(llama_dir, "f32", tmp_path / "cache") == a and a.stat().st_mtime_ns == mtime
    assert gguf_export.cached_export(llama_dir, "f16", tmp_path / "cache") != a
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    assert gguf_export.cache_key(copy, "f32") != gguf_export.cache_key(llama_dir, "f32")


def test_export_random_llama3_shapes(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 48, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 1024, "eos_token_id": [7, 8],
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}}
    out = gguf_export.cached_export_random("mini", cfg, "f16", tmp_path)
    assert gguf_export.cached_export_random("mini", cfg, "f16", tmp_path) == out  # cached
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    assert t["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    factors = np.asarray(t["rope_freqs.weight"].data)
    assert factors.shape == (4,) and factors[0] == 1.0 and factors[-1] == 8.0  # high freqs kept, low freqs scaled
    assert list(t["blk.0.attn_k.weight"].shape) == [32, 8] and t["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert abs(float(np.asarray(t["token_embd.weight"].data, dtype=np.float32).std()) - 0.02) < 0.002
    f = _fields(r)
    assert f["tokenizer.ggml.eos_token_id"] == 7 and len(f["tokenizer.ggml.tokens"]) == 300
    with pytest.raises(gguf_export.ExportError, match="not supported"):
        gguf_export.cached_export_random("q", {**cfg, "architectures": ["Qwen2ForCausalLM"]}, "f16", tmp_path)
