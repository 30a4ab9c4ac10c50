"""The GEMV tuner checks and times each candidate as the step runs it (engine/kernels/triton/tune.py
`candidate_call` against GemvLinearMethod.apply in engine/worker/tuning.py): the residual epilogue of wo / w2, the
SwiGLU of w2, the RMSNorm prologue of qkv / w13 — at batch 1 (fma) and batch 4 (dot, TMA) — on the CPU under the
Triton interpreter, in a subprocess. On an H100 a TMA config tuned without the residual epilogue ran out of shared
memory in the captured step (results/gpu/core-h100/skinny-16f03ba/)."""

from __future__ import annotations

import textwrap

import pytest

from engine.testing import run_script

pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine.kernels.triton import gemv
    from engine.kernels.triton.tune import candidate_call
    from engine.model.layers.linear import Linear
    from engine.model.layers.norm import RMSNorm
    from engine.worker.tuning import GemvLinearMethod

    class Fixed:  # a tuner that answers one config
        def __init__(self, cfg):
            self.cfg = cfg

        def get(self, m, n, k, act):
            return self.cfg

    torch.manual_seed(0)
    n, k = 96, 64
    layer = Linear(k, n, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        layer.bias.normal_(0, 0.1)
    norm = RMSNorm(k, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    cases = [(1, gemv.FMA_CONFIGS[2]), (4, gemv.DOT_CONFIGS[0]), (4, gemv.TMA_CONFIGS[0])]
    checked = 0
    for m, cfg in cases:
        for role in ("wo", "w2", "qkv"):
            act = role == "w2"
            x = torch.randn(m, 2 * k if act else k)
            r = torch.randn(m, n) if role != "qkv" else None
            nrm = norm if role == "qkv" else None
            want = GemvLinearMethod(Fixed(cfg)).apply(layer, x, norm=nrm, act=act,
                                                       residual=None if r is None else r.clone())
            call = candidate_call(x, act, None if nrm is None else nrm.weight, r)
            got = call(cfg, layer.weight, layer.bias)
            assert torch.equal(got, want), (m, str(cfg), role, (got - want).abs().max().item())
            if r is not None:  # the epilogue is part of what the tuner runs: without it the result differs
                bare = candidate_call(x, act)(cfg, layer.weight, layer.bias)
                assert not torch.allclose(bare, want), (m, str(cfg), role)
            checked += 1
    assert checked == 9
    print("OK")
    """
)


def test_tuner_runs_each_candidate_as_the_step_does():
    run_script(SCRIPT, timeout=600)
