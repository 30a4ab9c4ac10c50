"""RTN / AWQ / GPTQ / NF4 quantizers, the packed format, calibration data, quantize_model and save/load (CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from engine.quant.awq import quantize_awq
from engine.quant.gptq import Hessian, quantize_gptq
from engine.quant.int4 import dequantize, matmul_reference, pack_int4, quantize_rtn, unpack_int4
from engine.quant.nf4 import NF4_CODE, dequantize_nf4, pack_nf4, quantize_nf4, unpack_nf4

REPO = Path(__file__).resolve().parents[3]


def correlated(t=2048, k=512, seed=0):
    """Activations with a few outlier channels and correlated features (what AWQ / GPTQ exploit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g))
    x[:, :8] *= 20
    return x


def test_pack_layout_low_nibble_first():
    q = torch.randint(0, 16, (5, 64))
    words = pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (5, 8)
    assert ((words[:, 0].long() & 0xFFFFFFFF) >> 4 * 3 & 0xF).tolist() == q[:, 3].tolist()
    assert torch.equal(unpack_int4(words).long(), q)


def test_rtn_error_at_most_half_a_step():
    w = torch.randn(96, 384)
    p = quantize_rtn(w, 128)
    step = p.scales.float().repeat_interleave(128, 1)
    assert ((dequantize(p) - w).abs() <= step / 2 + 1e-6).all()
    assert p.zeros.min() >= 0 and p.zeros.max() <= 15 and torch.equal(p.zeros, p.zeros.round())


def test_nf4_code_book_and_bnb_nibble_order():
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    codes = torch.randint(0, 16, (3, 64))
    packed = pack_nf4(codes)
    assert torch.equal(packed[:, 0] >> 4, codes[:, 0].to(torch.uint8))  # the even element is the high nibble
    assert torch.equal(unpack_nf4(packed).long(), codes)
    w = torch.randn(64, 128)
    p = quantize_nf4(w)
    table = torch.tensor(NF4_CODE)
    normed = w.view(64, 2, 64) / p.absmax[:, :, None]
    nearest = (normed[..., None] - table).abs().argmin(-1).view(64, 128)
    assert torch.equal(unpack_nf4(p.qweight).long(), nearest)


def test_nf4_double_quant_close_to_plain():
    w = torch.randn(64, 256)
    dq = quantize_nf4(w, double_quant=True)
    assert dq.absmax is None and dq.absmax_q.dtype == torch.int8 and dq.absmax_scale.numel() == 1
    a, b = dequantize_nf4(quantize_nf4(w)), dequantize_nf4(dq)
    assert ((b - w) ** 2).mean() < 1.1 * ((a - w) ** 2).mean()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    w, x = torch.randn(128, 512) * 0.02, correlated()
    h = Hessian(512, "cpu")
    for chunk in x.split(512):
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    ref = x @ w.T
    rtn = ((matmul_reference(x, quantize_rtn(w, 128)) - ref) ** 2).mean()
    q = quantize_gptq(w, h.h, 128, act_order=act_order)
    assert (q.g_idx is not None) == act_order
    if act_order:  # every group holds exactly 128 channels
        assert torch.bincount(q.g_idx.long()).tolist() == [128] * 4
    gptq = ((matmul_reference(x, q) - ref) ** 2).mean()
    assert gptq < 0.5 * rtn


def test_awq_beats_rtn_with_outlier_channels():
    w, x = torch.randn(128, 512) * 0.02, correlated(seed=1)
    ref = x @ w.T
    rtn = ((matmul_reference(x, quantize_rtn(w, 128)) - ref) ** 2).mean()
    q = quantize_awq(w, x, 128)
    assert q.in_scale is not None and q.in_scale.shape == (512,)
    assert ((matmul_reference(x, q) - ref) ** 2).mean() < 0.8 * rtn
    # folding in_scale into the dense weight gives the same product
    torch.testing.assert_close(x @ dequantize(q, fold_in_scale=True).T, matmul_reference(x, q), rtol=1e-4,
                               atol=1e-4)


def test_calibration_excludes_held_out_modules():
    sys.path.insert(0, str(REPO / "scripts"))
    import train_tiny as T

    from engine.quant.calib import HELD_OUT, calibration_files

    assert set(HELD_OUT) == set(T.HELD_OUT_TEST) | set(T.HELD_OUT_VAL)
    root = T.stdlib_dir()
    files = calibration_files()
    assert len(files) > 1000
    assert all(T.split_of(f.relative_to(root)) == "train" for f in files)


@pytest.fixture(scope="module")
def tiny():
    import engine

    return engine.load("tiny", "float32", "cpu")


def test_stdlib_calibration_batches(tiny):
    from engine.quant.calib import stdlib_calibration

    batches = list(stdlib_calibration(tiny.tokenizer, n_samples=6, seq_len=64, batch_size=4))
    assert [len(b) for b in batches] == [4, 2] and all(len(s) == 64 for b in batches for s in b)
    assert all(0 <= t < tiny.config.vocab_size for b in batches for s in b for t in s)


def _logits(model, ids):
    from engine.generator import Generator

    return Generator(model, 1, len(ids)).logits([ids])[0]


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "nf4"])
def test_quantize_model_save_load_roundtrip(tiny, tmp_path, method):
    import engine
    from engine.quant import load_quantized, quantize_model, save_quantized, stdlib_calibration

    lm = engine.load("tiny", "float32", "cpu")
    calib = list(stdlib_calibration(lm.tokenizer, n_samples=2, seq_len=128))
    packed = quantize_model(lm.model, method, calib=calib, max_rows=256)
    assert "output" not in packed and len(packed) == 4 * lm.config.n_layers
    ids = lm.tokenizer.encode("import os\n\n\ndef main(argv):\n    return 0\n")
    ref, q = _logits(tiny.model, ids), _logits(lm.model, ids)
    assert 0 < (q - ref).abs().max() < 10 and (q.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6
    out = save_quantized(lm.model, lm.config, tmp_path / "q", method, source_dir=engine.hub.resolve("tiny"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "anvil" and qc["method"] == method and (out / "tokenizer.model").is_file()
    loaded = load_quantized(out, "float32", "cpu")
    assert loaded.tokenizer is not None
    torch.testing.assert_close(_logits(loaded.model, ids), q, rtol=0, atol=1e-5)


def test_quantize_model_errors(tiny):
    from engine.quant import quantize_model

    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(tiny.model, "int3")
    with pytest.raises(ValueError, match="awq needs calibration data"):
        quantize_model(tiny.model, "awq")
