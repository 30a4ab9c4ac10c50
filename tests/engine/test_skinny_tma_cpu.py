"""The TMA skinny GEMM (engine/kernels/triton/skinny_tma.py, the GEMV tuner's "tma" kind) == float64 on the CPU,
under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before the kernels are defined): ragged
M / N / K (rows, W rows and K past the last box zero-filled by the descriptors), bias, the residual epilogue (also
in place, out = residual), x as a strided row view, every tuner config; fp32 and fp16. Then, without a GPU, every
config's sm_90 build at M = 32 and 64: TMA copies, wgmma, shared memory within the SM's 227 KiB; and `linear`'s
dispatch of the "tma" kind (SwiGLU first, as for cuBLAS)."""

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
    from engine.kernels.triton import gemv
    from engine.kernels.triton.skinny_tma import skinny_tma

    def check(m, n, k, cfg, bias=False, res=False, inplace=False, dtype=torch.float32, seed=0, act=False):
        g = torch.Generator().manual_seed(seed)
        wide = torch.randn(m, 3 * k, generator=g).to(dtype)
        x = wide[:, k : 2 * k]  # a strided row view (row stride 3k)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        r = torch.randn(m, n, generator=g).to(dtype) if res else None
        y64 = x.double() @ w.double().T + (b.double() if bias else 0)
        if act:  # through gemv.linear: x [m, 2k] = gate | up, SwiGLU first
            xa = torch.randn(m, 2 * k, generator=g).to(dtype)
            xs = gemv.silu_and_mul_torch(xa)
            y64 = xs.double() @ w.double().T + (b.double() if bias else 0)
            y = gemv.linear(xa, w, b, act=True, cfg=cfg, residual=r)
        else:
            out = r.clone() if inplace else None
            y = skinny_tma(x, w, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, bias=b,
                           residual=out if inplace else r, out=out)
            assert (y.data_ptr() == out.data_ptr()) if inplace else True
        if res:  # linear-then-add: the product rounded to dtype first
            y64 = y64.to(dtype).double() + r.double()
        err = ((y.double() - y64).abs().max() / y64.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert y.shape == (m, n) and y.dtype == dtype and err <= tol, (m, n, k, cfg, bias, res, dtype, err)

    case = sys.argv[1]
    c0, c1 = gemv.TMA_CONFIGS[0], gemv.GemvConfig("tma", 32, 64, 4, 2)
    if case == "ragged":  # M not a power of two, N past the last BLOCK_N, K past the last BLOCK_K
        check(3, 100, 200, c1)
        check(17, 70, 136, c1, bias=True)
        check(2, 33, 64, c1, res=True)
        check(5, 65, 72, c1, bias=True, res=True, inplace=True)
    elif case == "configs":  # each tuner config once, at shapes that span several programs and K tiles
        for i, cfg in enumerate(gemv.TMA_CONFIGS):
            check(9 + i, 2 * cfg.block_n + 5, 3 * cfg.block_k + 8, cfg, bias=i % 2 == 0, res=i % 3 == 0, seed=i)
    elif case == "fp16":  # the 16-bit path; M = 64 (the largest); SwiGLU through gemv.linear
        check(64, 96, 256, c1, res=True, dtype=torch.float16)
        check(6, 40, 128, c1, bias=True, dtype=torch.float16, act=True)
        check(4, 64, 64, c0, act=True, res=True)
    print("OK")
    """
)


@pytest.mark.parametrize("case", ["ragged", "configs", "fp16"])
def test_skinny_tma_equals_float64_under_the_interpreter(case):
    run_script(SCRIPT, case, timeout=600)


def test_supported_names_what_it_cannot_take():
    from engine.kernels.triton.skinny_tma import supported

    x, w = torch.randn(4, 64), torch.randn(32, 64)
    assert supported(x, w) == "not a CUDA tensor"  # outside the interpreter, on the CPU
    code = textwrap.dedent(
        """
        import torch
        from engine.kernels.triton.skinny_tma import supported
        x, w = torch.randn(4, 64), torch.randn(32, 64)
        assert supported(x, w) is None
        assert supported(torch.randn(65, 64), w) == "M = 65 > 64"
        assert supported(torch.randn(4, 70)[:, 1:64], torch.randn(32, 63)) == "x rows are not 16-byte aligned and contiguous"
        assert supported(x, torch.randn(32, 66)[:, :64]) == "w rows are not 16-byte aligned and contiguous"
        print("OK")
        """
    )
    run_script(code, timeout=300)


def test_the_tuner_offers_tma_configs_only_where_they_run():
    from engine.kernels.triton import gemv

    assert not any(c.kind == "tma" for c in gemv.candidates(1))
    assert [c for c in gemv.candidates(32) if c.kind == "tma"] == gemv.TMA_CONFIGS
    assert [c for c in gemv.candidates(64) if c.kind == "tma"] == gemv.TMA_CONFIGS
    assert not any(c.kind == "tma" for c in gemv.candidates(32, tma=False) + gemv.candidates(96))


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.triton.gemv import TMA_CONFIGS
    from engine.kernels.triton.skinny_tma import _skinny_tma_kernel

    for bm in (32, 64):
        for cfg in TMA_CONFIGS:
            sig = {"x_desc": f"tensordesc<bf16[{bm},{cfg.block_k}]>", "w_desc": f"tensordesc<bf16[{cfg.block_n},{cfg.block_k}]>",
                   "b_ptr": "*bf16", "y_ptr": "*bf16", "r_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                   "stride_ym": "i32", "stride_rm": "i32"}
            const = dict(HAS_BIAS=False, RES=True, PREC="tf32", BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=0)
            full = {**sig, **{k: "constexpr" for k in const}}
            names = list(full)
            aligned = ("b_ptr", "y_ptr", "r_ptr", "N", "K", "stride_ym", "stride_rm")  # what the JIT specializes
            src = ASTSource(_skinny_tma_kernel, full, {(names.index(k),): v for k, v in const.items()},
                            {(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ir = k.asm["ttgir"]
            assert k.metadata.shared <= 227 * 1024, (bm, str(cfg), k.metadata.shared)
            assert "async_tma_copy_global_to_local" in ir, ("x / W not loaded through TMA", bm, str(cfg))
            if cfg.block_n >= 64:
                assert "ttng.warp_group_dot" in ir, ("no wgmma", bm, str(cfg))
            print(bm, cfg, "shared", k.metadata.shared)
    print("OK")
    """
)


def test_every_tma_config_compiles_for_sm90_with_tma_loads():
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas) to compile")
    run_script(COMPILE, interpret=False, timeout=900)
