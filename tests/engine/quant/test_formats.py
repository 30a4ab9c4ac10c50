"""Users' AutoAWQ GEMM / GPTQ checkpoints -> Anvil's int4 format, bit-exact.

The packers here are independent references written from the upstream source (AutoAWQ
awq/modules/linear/gemm.py WQLinear_GEMM.from_linear; AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py
QuantLinear.pack): the same loops over numpy uint32 words, not our unpacker run backwards. When the `awq` package
imports, its own WQLinear_GEMM packs too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.quant.formats import UnsupportedQuantization, decode_awq, decode_gptq, parse_quant_config
from engine.quant.int4 import dequantize, unpack_int4
from engine.testing import random_hf_state, save_checkpoint, tiny_config

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(intweight: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AutoAWQ from_linear's loops. intweight [K, N], zeros [K/G, N] (ints 0..15)."""
    iw = intweight.astype(np.uint32)
    qweight = np.zeros((iw.shape[0], iw.shape[1] // 8), dtype=np.uint32)
    for col in range(iw.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= iw[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    z = zeros.astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    for col in range(z.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= z[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return qweight.astype(np.int32), qzeros.astype(np.int32)


def gptq_pack(intweight: np.ndarray, zeros: np.ndarray, v1: bool) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ QuantLinear.pack's loops (bits 4). intweight [K, N], zeros [K/G, N]; v1 stores zeros - 1."""
    iw = intweight.astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 8, iw.shape[1]), dtype=np.uint32)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= iw[j] << (4 * (j - i))
        i += 8
        row += 1
    z = (zeros - 1 if v1 else zeros).astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // 8), dtype=np.uint32)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= z[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return qweight.astype(np.int32), qzeros.astype(np.int32)


def random_codes(n, k, g, seed, zmin=0):
    r = np.random.default_rng(seed)
    q = r.integers(0, 16, size=(k, n))
    z = r.integers(zmin, 16, size=(k // g, n))
    s = torch.from_numpy(r.uniform(0.001, 0.02, size=(k // g, n))).half()
    return q, z, s


@pytest.mark.parametrize("n,k", [(96, 256), (200, 384)])
def test_awq_gemm_unpack_bit_exact(n, k):
    q, z, s = random_codes(n, k, 128, n)
    qw, qz = awq_pack(q, z)
    w = decode_awq({"qweight": torch.from_numpy(qw), "qzeros": torch.from_numpy(qz), "scales": s}, 128)
    assert torch.equal(unpack_int4(w.qweight).long(), torch.from_numpy(q).T)
    assert torch.equal(w.zeros.float(), torch.from_numpy(z).T.float())
    assert torch.equal(w.scales, s.T)
    expect = (torch.from_numpy(q).float() - torch.from_numpy(z).float().repeat_interleave(128, 0)) \
        * s.float().repeat_interleave(128, 0)
    assert torch.equal(dequantize(w), expect.T)


@pytest.mark.parametrize("v1", [True, False], ids=["gptq_v1", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_unpack_bit_exact(v1, act_order):
    n, k, g = 200, 384, 128
    q, z, s = random_codes(n, k, g, 7, zmin=1 if v1 else 0)  # v1 cannot store zero 0 (it would be -1)
    qw, qz = gptq_pack(q, z, v1)
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:  # AutoGPTQ desc_act: g_idx[perm[i]] = i // G
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
        g_idx = (torch.arange(k) // g)[torch.argsort(perm)].to(torch.int32)
    t = {"qweight": torch.from_numpy(qw), "qzeros": torch.from_numpy(qz), "scales": s, "g_idx": g_idx}
    w = decode_gptq(t, g, zero_plus_one=v1)
    assert torch.equal(unpack_int4(w.qweight).long(), torch.from_numpy(q).T)
    assert torch.equal(w.zeros.float(), torch.from_numpy(z).T.float())
    assert (w.g_idx is not None) == act_order
    gi = g_idx.long()
    expect = (torch.from_numpy(q).float() - torch.from_numpy(z).float()[gi]) * s.float()[gi]  # [K, N]
    assert torch.equal(dequantize(w), expect.T)


def test_gptq_v1_zero_15_means_16():
    """v1 stores zero - 1: a stored 15 is zero 16 (AutoGPTQ adds 1 after masking)."""
    q, z, s = random_codes(8, 128, 128, 1, zmin=1)
    z[:] = 16
    qw, qz = gptq_pack(q, z, v1=True)
    w = decode_gptq({"qweight": torch.from_numpy(qw), "qzeros": torch.from_numpy(qz), "scales": s}, 128, True)
    assert torch.equal(w.zeros, torch.full_like(w.zeros, 16))


def test_awq_package_packer_when_installed():
    gemm = pytest.importorskip("awq.modules.linear.gemm", reason="autoawq not installed")
    n, k, g = 64, 256, 128
    q, z, s = random_codes(n, k, g, 3)
    zs, sf = torch.from_numpy(z).float(), s.float()
    wt = (torch.from_numpy(q).float() - zs.repeat_interleave(g, 0)) * sf.repeat_interleave(g, 0)  # [K, N]
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = wt.T.contiguous()
    ql = gemm.WQLinear_GEMM.from_linear(lin, 4, g, scales=sf, zeros=zs)
    w = decode_awq({"qweight": ql.qweight, "qzeros": ql.qzeros, "scales": ql.scales}, g)
    assert torch.equal(unpack_int4(w.qweight).long(), torch.from_numpy(q).T)
    assert torch.equal(dequantize(w), wt.T)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 3, "version": "gemm"}, "bits=3"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": False}, "zero_point"),
    ({"quant_method": "gptq", "bits": 8}, "bits=8"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "exl2", "bits": 4}, "quant_method 'exl2'"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
])
def test_unsupported_options_are_named(qc, match):
    with pytest.raises(UnsupportedQuantization, match=match):
        parse_quant_config(qc)


# ---------------------------------------------------------------------------------------- whole checkpoints
CFG = tiny_config(dim=128, ffn_dim=256, head_dim=32)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def _write_quantized(path, kind: str, act_order: bool = False):
    """A tiny Llama in AWQ-GEMM or GPTQ-v1 layout; returns the dense HF state it stands for."""
    state = random_hf_state(CFG, seed=1)
    dense = dict(state)
    r = np.random.default_rng(0)
    for i in range(CFG.n_layers):
        perm_by_input = {}
        for p in PROJ:
            name = f"model.layers.{i}.{p}"
            n, k = state[name + ".weight"].shape
            q, z, s = random_codes(n, k, 128, int(r.integers(1 << 30)), zmin=1)
            gi = torch.arange(k) // 128
            if act_order:  # q/k/v and gate/up see the same input, hence share one act order (as in GPTQ)
                key = p.split("_")[0] if p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") else p
                key = "gate_up" if p in ("mlp.gate_proj", "mlp.up_proj") else key
                if key not in perm_by_input:
                    perm_by_input[key] = torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(i)))
                gi = (torch.arange(k) // 128)[perm_by_input[key]]
            del state[name + ".weight"]
            if kind == "awq":
                qw, qz = awq_pack(q, z)
            else:
                qw, qz = gptq_pack(q, z, v1=True)
                state[name + ".g_idx"] = gi.to(torch.int32)
            state[name + ".qweight"], state[name + ".qzeros"] = torch.from_numpy(qw), torch.from_numpy(qz)
            state[name + ".scales"] = s
            w = (torch.from_numpy(q).float() - torch.from_numpy(z).float()[gi]) * s.float()[gi]
            dense[name + ".weight"] = w.T.contiguous()
    hf = CFG.to_hf()
    hf["quantization_config"] = ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                  "zero_point": True} if kind == "awq" else
                                 {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": act_order,
                                  "sym": False})
    save_checkpoint(path, hf, state)
    return dense


@pytest.mark.parametrize("kind,act_order", [("awq", False), ("gptq", False), ("gptq", True)])
def test_load_user_checkpoint_matches_dense(tmp_path, kind, act_order):
    from engine.quant.checkpoint import load_quantized
    from engine.weights import load_model

    dense = _write_quantized(tmp_path / "q", kind, act_order)
    save_checkpoint(tmp_path / "d", CFG, dense)
    qm = load_quantized(tmp_path / "q", "float32", "cpu").model
    dm = load_model(tmp_path / "d", ModelConfig.from_dir(tmp_path / "d"), "float32", "cpu")
    from engine.generator import Generator

    ids = [list(range(3, 40))]
    a = Generator(qm, 1, 64).logits(ids)[0]
    b = Generator(dm, 1, 64).logits(ids)[0]
    assert (a - b).abs().max().item() < 1e-4


def test_unsupported_checkpoint_names_the_option(tmp_path):
    from engine.quant.checkpoint import load_quantized

    _write_quantized(tmp_path / "q", "awq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedQuantization, match="awq: version 'gemv' is not supported"):
        load_quantized(tmp_path / "q", "float32", "cpu")
