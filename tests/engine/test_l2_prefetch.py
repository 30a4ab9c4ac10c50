"""The L2 prefetch of wo's weights ahead of attention (engine/kernels/csrc/l2_prefetch.cu, ops.l2_prefetch,
LinearMethod.prefetch, Attention.forward): who asks for what, the byte budget, and on the GPU that it changes no
value (the op itself, and greedy tokens of the engine with it on and off)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, ops
from engine.model.layers import attention as attention_mod
from engine.model.layers.linear import Linear, UnquantizedLinearMethod
from engine.presets import synthetic

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")


class _FakeExt:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def l2_prefetch(self, t, nbytes, chunk):
        self.calls.append((t.numel(), nbytes))


def test_l2_prefetch_takes_tensors_in_order_until_the_budget(monkeypatch):
    fake = _FakeExt()
    monkeypatch.setattr(ops, "_ext", fake)
    monkeypatch.setattr(ops, "l2_prefetch_enabled", lambda device: True)
    a, b, c = torch.zeros(100), torch.zeros(50, dtype=torch.bfloat16), torch.zeros(10)
    ops.l2_prefetch([a, b, c], 450)  # a: 400 bytes, then 50 of b's 100, nothing of c
    assert fake.calls == [(100, 400), (50, 50)]
    fake.calls.clear()
    ops.l2_prefetch([a, b, c], 10_000)
    assert fake.calls == [(100, 400), (50, 100), (10, 40)]
    fake.calls.clear()
    ops.l2_prefetch([a], 0)
    assert fake.calls == []


def test_l2_prefetch_is_off_on_the_cpu_and_with_the_switch(monkeypatch):
    assert not ops.l2_prefetch_enabled(torch.device("cpu"))
    ops.l2_prefetch([torch.zeros(8)], 1 << 20)  # no extension call on the CPU: nothing to fail
    monkeypatch.setattr(ops, "_prefetch_on", {})
    monkeypatch.setenv("ANVIL_L2_PREFETCH", "0")
    if torch.cuda.is_available():
        assert not ops.l2_prefetch_enabled(torch.device("cuda", 0))


def test_linear_method_prefetch_asks_for_its_own_tensors_weight_first(monkeypatch):
    seen = []
    monkeypatch.setattr(ops, "l2_prefetch", lambda tensors, budget: seen.append((tensors, budget)))
    lin = Linear(16, 8, bias=True, method=UnquantizedLinearMethod())
    lin.prefetch(123)
    (tensors, budget), = seen
    assert budget == 123 and tensors[0] is lin.weight and tensors[1] is lin.bias


@pytest.mark.parametrize("tokens,asked", [(1, True), (64, True), (65, False)])
def test_attention_prefetches_wo_on_decode_sized_steps_only(tokens, asked, monkeypatch):
    lm = synthetic("tiny-test", "float32", "cpu", seed=0)
    att = lm.model.layers[0].attention
    calls = []
    monkeypatch.setattr(type(att.wo), "prefetch", lambda self, budget: calls.append((self, budget)))
    monkeypatch.setattr(attention_mod, "PREFETCH_MAX_TOKENS", 64)

    class _Backend:
        def forward(self, qkv, batch, spec, cos_sin, k, v):
            return torch.zeros(qkv.shape[0], spec.n_heads * spec.head_dim)

    att.backend = _Backend()
    r = torch.randn(tokens, lm.config.dim)
    att(r, lm.model.layers[0].attention_norm, None, None)
    assert calls == ([(att.wo, attention_mod.PREFETCH_BUDGET)] if asked else [])


@pytest.mark.gpu
@needs_gpu
def test_l2_prefetch_op_changes_nothing_and_checks_its_input_gpu():
    from engine.kernels import ext

    if not ext.is_available():
        pytest.skip(f"anvil CUDA extension unavailable: {ext.why_unavailable()}")
    t = torch.randn(3, 1000, 77, device="cuda", dtype=torch.bfloat16)
    before = t.clone()
    for nbytes, chunk in [(-1, 65536), (1000, 16), (10**12, 1 << 20), (0, 4096)]:
        ext.l2_prefetch(t, nbytes, chunk)
    g = torch.cuda.CUDAGraph()  # capturable: the decode step's graphs contain it
    with torch.cuda.graph(g):
        ext.l2_prefetch(t, -1, 65536)
        y = t * 2
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(t, before) and torch.equal(y, before * 2)
    with pytest.raises(RuntimeError, match="chunk must be a multiple of 16"):
        ext.l2_prefetch(t, -1, 100)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.l2_prefetch(t.transpose(0, 1), -1, 65536)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ext.l2_prefetch(t.view(-1)[1:], -1, 65536)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_tokens_equal_with_and_without_prefetch_gpu(dtype, monkeypatch):
    lm = synthetic("tiny-test", dtype, "cuda", seed=2)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 17)]
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("ANVIL_L2_PREFETCH", on)
        monkeypatch.setattr(ops, "_prefetch_on", {})
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=128))
        outs[on] = [o.tokens for o in llm.generate(prompts, max_tokens=32)]
        assert ops.l2_prefetch_enabled(torch.device("cuda")) == (
            on == "1" and torch.cuda.get_device_capability()[0] >= 9
        )
    assert outs["0"] == outs["1"]
