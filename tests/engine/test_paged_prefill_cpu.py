"""The Triton paged prefill kernel (engine/kernels/triton/paged_prefill.py) == the torch reference on the CPU, under
the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before the kernels are defined): awkward q_len
and prefix sizes (not multiples of the block or tile sizes), several sequences in one call with first_seq > 0,
GQA 4:1 / 3:1 / 1:1, head_dim 64 / 32 / 24 (padded to BLOCK_D), sliding windows, explicit launch configs; fp32, and fp16 for the 16-bit path."""

from __future__ import annotations

import textwrap

import pytest

from engine.testing import run_script

pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")

SCRIPT = textwrap.dedent(
    """
    import math, sys
    import torch
    from engine.kernels.reference import _attend, _window_mask
    from engine.kernels.reference_paged import gather_paged
    from engine.kernels.triton.paged_prefill import paged_prefill_attention

    def check(h, hkv, d, page, specs, window, first_seq, config=None, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        nb = sum(math.ceil(n / page) for _, n in specs) + 3
        kc = torch.randn(nb, hkv, page, d, generator=g)
        vc = torch.randn(nb, hkv, page, d, generator=g)
        perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()  # scattered pages, block 0 unused
        qs, lens, tables, off = [0], [], [], 0
        width = max(math.ceil(n / page) for _, n in specs) + 1
        for ql, n in specs:
            k = math.ceil(n / page)
            tables.append(perm[off : off + k] + [0] * (width - k))
            off += k
            qs.append(qs[-1] + ql)
            lens.append(n)
        q = torch.randn(qs[-1], h, d, generator=g)
        q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
        bt = torch.tensor(tables, dtype=torch.int32)
        out = torch.full_like(q, float("nan"))  # poisoned: the rows of the attended sequences must be written
        todo = range(first_seq, len(specs))
        paged_prefill_attention(q, kc, vc, bt, torch.tensor(qs, dtype=torch.int32),
                                torch.tensor(lens, dtype=torch.int32), d**-0.5, window, first_seq,
                                len(todo), max(specs[b][0] for b in todo), out=out, config=config)
        for b in range(len(specs)):
            ql, n = specs[b]
            s, e = qs[b], qs[b + 1]
            if b < first_seq:  # not attended: left untouched
                assert torch.isnan(out[s:e]).all(), ("wrote sequence", b)
                continue
            ks = gather_paged(kc, bt[b], n).repeat_interleave(h // hkv, 0).double()
            vs = gather_paged(vc, bt[b], n).repeat_interleave(h // hkv, 0).double()
            mask = _window_mask(ql, n, n - ql, True, window, "cpu")
            ref = _attend(q[s:e].transpose(0, 1).double(), ks, vs, d**-0.5, mask).transpose(0, 1)
            err = (out[s:e].double() - ref).abs().max().item()
            tol = 1e-4 if dtype == torch.float32 else 4e-3  # 16-bit: P rounded to fp16 before the PV dot
            assert err <= tol, (h, hkv, d, page, specs, window, config, dtype, b, err)

    case = sys.argv[1]
    if case == "gqa":  # GQA 4:1, d64: q_len 1 / 7 / 33 / 100 over prefixes 0 / 5 / 40 / 130, first_seq > 0
        check(8, 2, 64, 16, [(3, 9), (1, 1), (7, 12), (33, 73), (100, 230)], 0, 1)
        check(8, 2, 64, 16, [(100, 100), (1, 131), (7, 47)], 0, 0)
    elif case == "mha":  # 1:1, d32, BLOCK_M 16 / 32 rows, page 8 (a tile spans several pages)
        check(2, 2, 32, 8, [(33, 33), (7, 12), (100, 140), (1, 41)], 0, 0)
        check(2, 2, 32, 8, [(5, 5), (33, 173)], 0, 1, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                                              "num_stages": 1})
    elif case == "window":  # sliding windows (edge tiles, window below / above a tile), GQA 3:1, d24 (padded)
        check(6, 2, 24, 16, [(33, 73), (100, 230), (1, 40)], 7, 0)
        check(6, 2, 24, 16, [(7, 12), (100, 100), (33, 163)], 50, 1)
        check(4, 1, 64, 16, [(100, 230), (1, 131)], 37, 0, config={"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4,
                                                                   "num_stages": 1})
    elif case == "d128":  # head_dim 128, GQA 4:1, over a prefix and fresh
        check(4, 1, 128, 16, [(33, 163), (7, 7)], 0, 0)
        check(4, 1, 128, 16, [(33, 163), (7, 7)], 0, 0, dtype=torch.float16)  # the 16-bit path (bf16: the
        # interpreter does not model bfloat16)
    print("OK")
    """
)


@pytest.mark.parametrize("case", ["gqa", "mha", "window", "d128"])
def test_paged_prefill_kernel_equals_reference_under_the_interpreter(case):
    run_script(SCRIPT, case, timeout=600)


COMPILE = textwrap.dedent(
    """
    import re, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.triton.paged_prefill import _paged_prefill_kernel, default_config

    class Hopper:  # default_config's device argument, without a GPU
        type = "cuda"

    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    ints = "window seq_offset stride_qt stride_qh stride_ot stride_oh stride_kb stride_kh stride_ks stride_btb"
    sig = {**{p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}, "bt_ptr": "*i32", "cu_q_ptr": "*i32",
           "lens_ptr": "*i32", "qk_scale": "fp32", **{k: "i32" for k in ints.split()}}
    for group, d, window in ((4, 128, False), (4, 128, True), (3, 96, False), (8, 64, False)):
        cfg = default_config(2048, group, d, torch.bfloat16, Hopper())
        const = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE=16, BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_Q=cfg["BLOCK_M"] // group, BLOCK_N=cfg["BLOCK_N"], PREC="tf32", WINDOW=window)
        full = {**sig, **{k: "constexpr" for k in const}}
        names = list(full)
        aligned = [k for k in sig if k.endswith("_ptr") or k.startswith("stride")]  # what the JIT specializes
        src = ASTSource(_paged_prefill_kernel, full, {(names.index(k),): v for k, v in const.items()},
                        {(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        ir = k.asm["ttgir"]
        assert k.metadata.shared <= 227 * 1024, (group, d, window, k.metadata.shared)
        assert "ttng.warp_group_dot" in ir and "async_copy_global_to_local" in ir, (group, d, window)
        waits = [int(n) for n in re.findall(r"async_wait %k_\\d+, %v_\\d+[^{]*\\{num = (\\d+)", ir)]
        assert waits and min(waits) > 0, ("the K/V copies are not prefetched", group, d, window, waits)
    print("OK")
    """
)


def test_the_default_hopper_config_compiles_for_sm90_with_pipelined_kv_loads():
    """Without a GPU: the sm_90 build of the default configs (GQA 4:1 d128 with and without a window, 3:1 d96 (padded to 128), 8:1 d64)
    fits in shared memory, uses wgmma, and keeps the K/V copies of a later tile in flight while a tile is computed
    (a Triton upgrade that changes the stage mapping fails here: re-run the --sweep)."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas) to compile")
    run_script(COMPILE, interpret=False, timeout=600)
