"""The TMA fresh-prompt attention kernel (engine/kernels/triton/fresh_prefill.py) on a GPU == the float64 reference
within twice the error of the same computation in the input dtype: fresh prompts of awkward lengths in one call, GQA
4:1 / 1:1 / 8:1, head_dim 64 / 128, bf16 / fp16 / fp32, v a column slice of qkv, the default and other launch
configs (a config that does not fit the GPU is skipped with the reason). Needs an sm_90+ GPU (TMA)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.reference import _attend, _window_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    (32, 8, 128, [2048], torch.bfloat16),  # the Llama-3-8B layout, one prompt
    (8, 2, 128, [5, 97, 1, 1025], torch.bfloat16),
    (4, 4, 64, [13, 300], torch.float16),
    (16, 2, 64, [1, 700, 6], torch.float16),  # 8:1
    (8, 2, 128, [257, 129, 3], torch.float32),
]
# (BLOCK_M, BLOCK_N, num_warps, num_stages, WS): benchmarks/bench_attention.py's FRESH_SWEEP picks from these shapes
CONFIGS = [(128, 64, 8, 3, False), (128, 128, 8, 2, False), (256, 64, 16, 3, False), (64, 64, 4, 3, False),
           (128, 64, 8, 3, True)]  # fmt: skip
PARAMS = [(*c, None) for c in CASES] + [(*CASES[i], cfg) for i in (0, 1, 3) for cfg in CONFIGS]


@pytest.mark.parametrize("h,hkv,d,lens,dtype,config", PARAMS)
def test_fresh_prefill_kernel_matches_reference(h, hkv, d, lens, dtype, config):
    import triton

    from engine.kernels.triton.fresh_prefill import fresh_prefill_attention, supported

    why = supported(h, hkv, d, torch.device("cuda"))
    if why:
        pytest.skip(why)
    if config is not None:
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WS"), config, strict=True))
    g = torch.Generator(device="cuda").manual_seed(0)
    qs = [0]
    for n in lens:
        qs.append(qs[-1] + n)
    t = qs[-1]
    q = torch.randn(t, h, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(t, hkv, d, device="cuda", dtype=dtype, generator=g)
    wide = torch.randn(t, (h + 2 * hkv) * d, device="cuda", dtype=dtype, generator=g)
    v = wide[:, (h + hkv) * d :].view(t, hkv, d)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    try:
        fresh_prefill_attention(q, k, v, torch.tensor(qs, dtype=torch.int32, device="cuda"), d**-0.5, 0, len(lens),
                                max(lens), out=out, config=config)  # fmt: skip
    except triton.runtime.errors.OutOfResources as e:
        if config is None:
            raise
        pytest.skip(f"{config} does not fit this GPU: {e}")
    for b, n in enumerate(lens):
        s, e = qs[b], qs[b + 1]
        ks = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        mask = _window_mask(n, n, 0, True, 0, "cuda")
        qq = q[s:e].transpose(0, 1)
        ref = _attend(qq.double(), ks.double(), vs.double(), d**-0.5, mask).transpose(0, 1)
        same = _attend(qq, ks, vs, d**-0.5, mask).transpose(0, 1)
        err = (out[s:e].double() - ref).abs().max().item()
        bound = max(2 * (same.double() - ref).abs().max().item(), 1e-5)
        assert err <= bound, (b, err, bound)
