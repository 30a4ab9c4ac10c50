"""safetensors loading: HF -> engine names, fused packing, sharded checkpoints, and errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.generator import Generator
from engine.testing import random_hf_state, save_checkpoint, tiny_config
from engine.weights import INDEX_FILE, WeightsError, load_state_dict

QWEN2 = tiny_config("qwen2")
LLAMA = tiny_config("llama")


def test_fused_qkv_bias_and_gate_up_packing(tmp_path):
    hf = random_hf_state(QWEN2, seed=3)
    save_checkpoint(tmp_path, QWEN2, hf)
    sd = load_state_dict(tmp_path, QWEN2)
    p = "model.layers.1."
    assert torch.equal(
        sd["layers.1.attention.wqkv.weight"],
        torch.cat(
            [hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"]]
        ),
    )
    assert torch.equal(
        sd["layers.1.attention.wqkv.bias"],
        torch.cat([hf[p + "self_attn.q_proj.bias"], hf[p + "self_attn.k_proj.bias"], hf[p + "self_attn.v_proj.bias"]]),
    )
    assert torch.equal(
        sd["layers.1.feed_forward.w13.weight"],
        torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
    )
    assert torch.equal(sd["layers.1.attention.wo.weight"], hf[p + "self_attn.o_proj.weight"])
    assert torch.equal(sd["layers.1.ffn_norm.weight"], hf[p + "post_attention_layernorm.weight"])
    assert torch.equal(sd["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(sd["output.weight"], hf["lm_head.weight"])


def test_sharded_equals_single_file(tmp_path):
    hf = random_hf_state(LLAMA, seed=4)
    single = save_checkpoint(tmp_path / "single", LLAMA, hf)
    sharded = save_checkpoint(tmp_path / "sharded", LLAMA, hf, shards=3)
    assert len(json.loads((sharded / INDEX_FILE).read_text())["weight_map"]) == len(hf)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a, b = load_state_dict(single, LLAMA), load_state_dict(sharded, LLAMA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = [[1, 2, 3, 4]]
    la, lb = (Generator(engine.load(p), 1, 16).logits(prompts)[0] for p in (single, sharded))
    assert torch.equal(la, lb)


def test_dtype_and_tokenizer_none(tmp_path):
    save_checkpoint(tmp_path, LLAMA, random_hf_state(LLAMA))
    loaded = engine.load(tmp_path, dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.config == LLAMA
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.tokenizer is None  # no tokenizer files in the folder
    assert Generator(loaded, 1, 16).logits([[5, 6]])[0].dtype == torch.float32
    with pytest.raises(ValueError, match="int8"):
        engine.load(tmp_path, dtype="int8")


def test_tied_ignores_lm_head_copy_and_rotary_buffers(tmp_path):
    tied = tiny_config("llama", tie_word_embeddings=True)
    hf = random_hf_state(tied)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_checkpoint(tmp_path, tied, hf)
    sd = load_state_dict(tmp_path, tied)
    assert "output.weight" not in sd and not any("inv_freq" in k for k in sd)


def _expect_error(tmp_path, config, state, match_tensor: str, match_file: str, shards: int = 1):
    save_checkpoint(tmp_path, config, state, shards=shards)
    with pytest.raises(WeightsError) as e:
        engine.load(tmp_path)
    msg = str(e.value)
    assert match_tensor in msg and match_file in msg, msg


def test_missing_tensor_named(tmp_path):
    hf = random_hf_state(LLAMA)
    del hf["model.layers.1.mlp.up_proj.weight"]
    _expect_error(tmp_path, LLAMA, hf, "model.layers.1.mlp.up_proj.weight", "model.safetensors")


def test_missing_lm_head_when_untied(tmp_path):
    hf = random_hf_state(LLAMA)
    del hf["lm_head.weight"]
    _expect_error(tmp_path, LLAMA, hf, "lm_head.weight", "model.safetensors")


def test_missing_qwen2_bias_named(tmp_path):
    hf = random_hf_state(QWEN2)
    del hf["model.layers.0.self_attn.k_proj.bias"]
    _expect_error(tmp_path, QWEN2, hf, "model.layers.0.self_attn.k_proj.bias", "model.safetensors")


def test_unexpected_tensor_named(tmp_path):
    hf = random_hf_state(LLAMA)
    hf["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    _expect_error(tmp_path, LLAMA, hf, "model.layers.0.self_attn.q_norm.weight", "model.safetensors")


def test_misshaped_tensor_named_with_shapes(tmp_path):
    hf = random_hf_state(LLAMA)
    hf["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)  # config wants [32, 64]
    _expect_error(tmp_path, LLAMA, hf, "model.layers.1.self_attn.k_proj.weight", "model.safetensors")
    with pytest.raises(WeightsError, match=r"\[16, 64\], expected \[32, 64\]"):
        engine.load(tmp_path)


def test_sharded_errors_name_the_shard(tmp_path):
    hf = random_hf_state(LLAMA)
    hf["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)
    _expect_error(
        tmp_path / "shape", LLAMA, hf, "model.layers.1.mlp.down_proj.weight", "-of-00002.safetensors", shards=2
    )

    # the index maps a tensor to a shard that does not hold it
    path = save_checkpoint(tmp_path / "lying", LLAMA, random_hf_state(LLAMA), shards=2)
    index = json.loads((path / INDEX_FILE).read_text())
    name = "model.norm.weight"
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, str(shard))
    with pytest.raises(WeightsError, match=rf"{name}.*{shard.name}"):
        engine.load(path)

    # the index does not list a tensor at all
    del index["weight_map"]["model.layers.0.input_layernorm.weight"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"model.layers.0.input_layernorm.weight.*{INDEX_FILE}"):
        engine.load(path)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA.to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        engine.load(tmp_path)


# ---- index entries must stay in the model folder; corrupt files are named ---------------------------------------
def _sharded(tmp_path, name="m"):
    path = save_checkpoint(tmp_path / name, LLAMA, random_hf_state(LLAMA), shards=2)
    return path, json.loads((path / INDEX_FILE).read_text())


def _remap(path, index, tensor, target) -> None:
    index["weight_map"][tensor] = target
    (path / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "dotdot_inside", "symlink_out"])
def test_index_entry_outside_the_folder_is_refused(tmp_path, how):
    path, index = _sharded(tmp_path)
    tensor = "model.norm.weight"
    shard = path / index["weight_map"][tensor]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy = outside / shard.name
    copy.write_bytes(shard.read_bytes())  # a valid file: only its place is wrong
    target = {"absolute": str(copy), "dotdot": f"../elsewhere/{shard.name}",
              "dotdot_inside": f"sub/../{shard.name}", "symlink_out": "linked.safetensors"}[how]
    if how == "symlink_out":
        (path / target).symlink_to(copy)
    if how == "dotdot_inside":
        (path / "sub").mkdir()
    _remap(path, index, tensor, target)
    with pytest.raises(WeightsError, match="outside the model folder") as e:
        load_state_dict(path, LLAMA)
    assert tensor in str(e.value) and repr(target) in str(e.value) and INDEX_FILE in str(e.value)


def test_index_entry_symlink_inside_the_folder_and_hf_cache_blobs_are_accepted(tmp_path):
    path, index = _sharded(tmp_path)
    tensor = "model.norm.weight"
    shard = index["weight_map"][tensor]
    (path / "sub").mkdir()
    (path / "sub" / "alias.safetensors").symlink_to(path / shard)
    _remap(path, index, tensor, "sub/alias.safetensors")
    expected = load_state_dict(path, LLAMA)
    # the HF hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in path.iterdir():
        if f.is_file() and not f.is_symlink():
            (blobs / f"blob-{f.name}").write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    _remap(snap, index, tensor, shard)  # writes through the snapshot's symlink into its blob
    got = load_state_dict(snap, LLAMA)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("entry", [7, None, ["a.safetensors"]])
def test_index_entry_not_a_file_name_is_refused(tmp_path, entry):
    path, index = _sharded(tmp_path)
    _remap(path, index, "model.norm.weight", entry)
    with pytest.raises(WeightsError, match=r"model\.norm\.weight"):
        load_state_dict(path, LLAMA)


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage", "empty"])
@pytest.mark.parametrize("shards", [1, 2])
def test_corrupt_safetensors_file_is_named(tmp_path, damage, shards):
    path = save_checkpoint(tmp_path / "m", LLAMA, random_hf_state(LLAMA), shards=shards)
    victim = sorted(path.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[:-100], "header_only": data[:5], "garbage": b"\x00garbage\xff" * 10,
                        "empty": b""}[damage])
    with pytest.raises(WeightsError, match="not a valid safetensors file") as e:
        load_state_dict(path, LLAMA)
    assert str(victim) in str(e.value)
