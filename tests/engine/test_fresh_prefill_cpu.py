"""The TMA fresh-prompt attention kernel (engine/kernels/triton/fresh_prefill.py) == the float64 reference on the CPU,
under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before the kernels are defined): several
fresh prompts of awkward lengths in one call (1 token, shorter than a tile, not multiples of the tile sizes), first_seq
> 0 (earlier sequences untouched), GQA 4:1 / 1:1 / 8:1 / 2:1, head_dim 16..128, v as a column slice of a wider qkv
buffer, explicit launch configs; fp32, and fp16 for the 16-bit path. Then, without a GPU, its sm_90 build: TMA copies,
wgmma, shared memory within the SM's 227 KiB."""

from __future__ import annotations

import textwrap

import pytest
import torch

from engine.testing import run_script

pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from engine.kernels.reference import _attend, _window_mask
    from engine.kernels.triton.fresh_prefill import fresh_prefill_attention

    def check(h, hkv, d, lens, first_seq, config=None, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        qs = [0]
        for n in lens:
            qs.append(qs[-1] + n)
        t = qs[-1]
        q = torch.randn(t, h, d, generator=g).to(dtype)
        k = torch.randn(t, hkv, d, generator=g).to(dtype)
        wide = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)  # [q | k | v] rows: v is a column slice
        v = wide[:, (h + hkv) * d :].view(t, hkv, d)
        out = torch.full_like(q, float("nan"))  # poisoned: the attended sequences' rows must all be written
        todo = range(first_seq, len(lens))
        fresh_prefill_attention(q, k, v, torch.tensor(qs, dtype=torch.int32), d**-0.5, first_seq, len(todo),
                                max(lens[b] for b in todo), out=out, config=config)
        for b, n in enumerate(lens):
            s, e = qs[b], qs[b + 1]
            if b < first_seq:  # not attended: left untouched
                assert torch.isnan(out[s:e]).all(), ("wrote sequence", b)
                continue
            ks = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0).double()
            vs = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0).double()
            ref = _attend(q[s:e].transpose(0, 1).double(), ks, vs, d**-0.5, _window_mask(n, n, 0, True, 0, "cpu"))
            err = (out[s:e].double() - ref.transpose(0, 1)).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 4e-3  # 16-bit: P rounded to fp16 before the PV dot
            assert err <= tol, (h, hkv, d, lens, first_seq, config, dtype, b, err)

    small = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    case = sys.argv[1]
    if case == "gqa":  # 4:1, d64: lengths 37 / 1 / 100 / 5 in one call; then first_seq 2 with 16-key tiles
        check(8, 2, 64, [37, 1, 100, 5], 0)
        check(8, 2, 64, [37, 1, 100, 5], 2, config=small)
        check(8, 2, 64, [37, 1, 100, 5], 0, config={**small, "WS": True})  # the warp-specialized loop's branch
    elif case == "mha":  # 1:1, d32, and 8:1 d16 (8 heads a token: BLOCK_M 64 = 8 tokens)
        check(4, 4, 32, [33, 64, 7], 0)
        check(4, 4, 32, [33, 64, 7], 1, config={"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1})
        check(8, 1, 16, [70, 3], 0)
    elif case == "d128":  # head_dim 128, 4:1 and 2:1, fp32 and the 16-bit path (the interpreter has no bfloat16)
        check(4, 1, 128, [163, 7], 0)
        check(4, 2, 128, [1, 130], 0, dtype=torch.float16)
    print("OK")
    """
)


@pytest.mark.parametrize("case", ["gqa", "mha", "d128"])
def test_fresh_prefill_kernel_equals_reference_under_the_interpreter(case):
    run_script(SCRIPT, case, timeout=600)


def test_supported_names_what_it_cannot_take():
    from engine.kernels.triton.fresh_prefill import supported

    cpu = torch.device("cpu")
    assert supported(32, 8, 128, cpu) is None and supported(4, 4, 64, cpu) is None
    assert supported(14, 2, 64, cpu) == "GQA group 7 (14 / 2 heads) is not a power of two"
    assert supported(32, 8, 96, cpu) == "head_dim 96 is not a power of two in 16..256"
    assert supported(32, 8, 8, cpu) == "head_dim 8 is not a power of two in 16..256"


COMPILE = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.triton.fresh_prefill import _fresh_prefill_kernel, default_config

    class Hopper:  # default_config's device argument, without a GPU
        type = "cuda"

    for group, d in ((4, 128), (8, 64), (1, 128)):
        cfg = default_config(2048, group, d, torch.bfloat16, Hopper())
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        bq = bm // group
        sig = {"q_desc": f"tensordesc<bf16[{bq},{group},{d}]>", "k_desc": f"tensordesc<bf16[{bn},{d}]>",
               "v_desc": f"tensordesc<bf16[{bn},{d}]>", "o_ptr": "*bf16", "cu_q_ptr": "*i32", "qk_scale": "fp32",
               "seq_offset": "i32", "stride_ot": "i32", "stride_oh": "i32"}
        const = dict(GROUP=group, HEAD_DIM=d, BLOCK_M=bm, BLOCK_Q=bq, BLOCK_N=bn, PREC="tf32", WS=cfg["WS"])
        full = {**sig, **{k: "constexpr" for k in const}}
        names = list(full)
        aligned = ("o_ptr", "cu_q_ptr", "stride_ot", "stride_oh")  # what the JIT specializes
        src = ASTSource(_fresh_prefill_kernel, full, {(names.index(k),): v for k, v in const.items()},
                        {(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        ir = k.asm["ttgir"]
        assert k.metadata.shared <= 227 * 1024, (group, d, k.metadata.shared)
        assert "ttng.warp_group_dot" in ir, ("no wgmma", group, d)
        assert "async_tma_copy_global_to_local" in ir, ("K/V / q not loaded through TMA", group, d)
    print("OK")
    """
)


def test_the_default_hopper_config_compiles_for_sm90_with_tma_loads():
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas) to compile")
    run_script(COMPILE, interpret=False, timeout=600)
