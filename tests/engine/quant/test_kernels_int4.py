"""The int4 GEMV / GEMM and NF4 GEMV Triton kernels against the torch reference (dequantize, then matmul).

Error bound (flash-attention's rule): |kernel - ref64| <= 2 * |torch same precision - ref64| + a small floor,
where ref64 is the float64 product of x and the dequantized weights. On the CPU the kernels run under Triton's
interpreter (in one child process, tests/engine/quant/interp_cases.py) at small, awkward sizes; the `gpu` tests use
real Llama-3-8B shapes. bf16 is tested on the GPU only: under the interpreter (Triton 3.8) a bf16 tl.dot gave
garbage (~1e11) and the bf16 GEMV up to ~1 ulp off, an emulation limit, not the kernels'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.quant.interp_cases import run_case

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False)")
REPO = Path(__file__).resolve().parents[3]

CPU_SHAPES = [(200, 384), (200, 640)]  # N not a multiple of any BLOCK_N; K = 3 and 5 groups of 128
CPU_DTYPES = ["float32", "float16"]
# GemvConfig fields (block_n, block_k, split_k, warps, stages, dot, block_m, grouped): each config exercises tiles
# that cover several groups, a partial last tile, split-K (split_k > 1) or not, and both tile shapes (grouped:
# [BN, groups, G/8] words with broadcast scales; else [BN, BK/8] words with per-word scale gathers)
FMA = [[32, 256, 1, 4, 1, False, 16, True], [64, 128, 3, 4, 1, False, 16, False]]
DOT = [[32, 256, 2, 4, 1, True, 16, True], [64, 128, 1, 4, 1, True, 16, False]]
# GemmConfig (block_m, block_n, block_k, warps, stages, split_k, group_m, grouped)
GEMM = [[32, 64, 128, 4, 1, 1, 8, True], [64, 32, 256, 4, 1, 2, 8, False]]
CPU_CASES = (
    [
        dict(kind="int4_gemv", n=n, k=k, m=1, dtype=d, seed=i, config=c, bias=i == 0)
        for n, k in CPU_SHAPES
        for d in CPU_DTYPES
        for i, c in enumerate(FMA)
    ]
    + [
        dict(kind="int4_gemv", n=n, k=k, m=m, dtype=d, seed=m, config=c, bias=m == 3)
        for n, k in CPU_SHAPES
        for d in CPU_DTYPES
        for m, c in ((1, DOT[0]), (3, DOT[1]), (8, DOT[0]), (13, DOT[1]))
    ]
    + [
        dict(kind="int4_gemm", n=200, k=384, m=m, dtype=d, seed=m, config=c)
        for d in CPU_DTYPES
        for m, c in ((17, GEMM[0]), (40, GEMM[1]))
    ]
    + [
        dict(kind=kd, n=40, k=256, m=m, dtype="float32", group=gr, bias=True)
        for kd, m in (("int4_gemv", 1), ("int4_gemv", 5), ("int4_gemm", 20))
        for gr in (32, 64)
    ]
    + [
        dict(kind=kd, n=200, k=384, m=m, dtype="float32", act_order=True, config=c, bias=True)
        for kd, m, c in (("int4_gemv", 1, FMA[1]), ("int4_gemv", 5, DOT[0]), ("int4_gemm", 17, GEMM[1]))
    ]
    + [dict(kind="int4_matmul", n=200, k=640, m=m, dtype="float32", seed=m) for m in (1, 13, 40)]
    + [  # dequantize + F.linear (prefill): N / K not multiples of the tile, G 32 / 128, act-order, fp16 rounding
        dict(kind="int4_dequant", n=n, k=k, m=70, dtype=d, group=gr, act_order=ao, bias=True, seed=n)
        for n, k, gr, d, ao in ((200, 640, 128, "float32", False), (37, 96, 32, "float16", False),
                                (200, 384, 128, "float32", True))  # fmt: skip
    ]
    + [
        dict(kind="nf4_gemv", n=200, k=320, m=m, dtype=d, seed=m, config=c, bias=m == 3)
        for d in CPU_DTYPES
        for m, c in ((1, FMA[0]), (1, FMA[1]), (3, DOT[0]), (13, DOT[1]))
    ]
)


def case_id(c: dict) -> str:
    extra = (f"-g{c['group']}" if "group" in c else "") + ("-bias" if c.get("bias") else "")
    extra += ("-act_order" if c.get("act_order") else "") + (f"-cfg{c['config']}" if c.get("config") else "")
    return f"{c['kind']}-{c['n']}x{c['k']}-m{c['m']}-{c['dtype']}{extra}".replace(" ", "")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, tuple[float, float]]:
    """(error, bound) of every CPU case, run under TRITON_INTERPRET=1 (in a child process unless this one has it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {case_id(c): run_case(**c) for c in CPU_CASES}
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.quant.interp_cases"],
        input=json.dumps(CPU_CASES),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case_id(c): tuple(r) for c, r in zip(CPU_CASES, results, strict=True)}


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_kernel_cpu_interpreter(case, interpreted):
    err, bound = interpreted[case_id(case)]
    assert err <= bound, f"{case_id(case)}: max error {err:.3g} > bound {bound:.3g}"


def test_int4_launcher_rejects_bad_shapes():
    from engine.kernels.triton.int4_gemv import int4_gemv
    from engine.quant.int4 import quantize_rtn

    p = quantize_rtn(torch.randn(96, 256), 128)
    with pytest.raises(AssertionError, match="M <= 32"):
        int4_gemv(torch.zeros(33, 256), p.qweight, p.scales, p.zeros, 128)
    with pytest.raises(AssertionError, match="qweight"):
        int4_gemv(torch.zeros(1, 384), p.qweight, p.scales, p.zeros, 128)


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_int4", REPO / "benchmarks" / "bench_int4.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_table_roundtrip():
    """The sweep's best rows -> the int4_configs.json document -> lookup_entry -> a launch config."""
    from engine.kernels.triton.int4_gemm import GemmConfig
    from engine.kernels.triton.int4_gemv import GemvConfig, lookup_entry

    bench = _bench_module()
    fast, slow = GemvConfig(64, 512, 2, 8, 1, True, 16), GemvConfig(32, 256, 1, 4, 1, True, 16)
    rows = [
        dict(shape="wo", N=4096, K=4096, M=4, kernel="int4_gemv", config=slow._asdict(), median_ms=0.03,
             dense_ms=0.02, speedup_vs_dense=0.7, status="ok"),
        dict(shape="wo", N=4096, K=4096, M=4, kernel="int4_gemv", config=fast._asdict(), median_ms=0.01,
             dense_ms=0.02, speedup_vs_dense=2.0, status="ok"),
        dict(shape="wo", N=4096, K=4096, M=4, kernel="int4_gemv", config=None, median_ms=0.001,
             dense_ms=0.02, speedup_vs_dense=20.0, status="wrong: rel err 1 > 0.02"),
        dict(shape="wo", N=4096, K=4096, M=32, kernel="int4_gemm", config=GemmConfig(32, 64, 256)._asdict(),
             median_ms=0.02, dense_ms=0.02, speedup_vs_dense=1.0, status="ok"),
    ]  # fmt: skip
    table = bench.configs_table(bench.best_configs(rows), "GPU X", {"devices": {"GPU Y": {"int4": []}}})
    doc = json.loads(json.dumps(table))
    assert set(doc["devices"]) == {"GPU X", "GPU Y"}
    e = lookup_entry(doc["devices"], "GPU X", "int4", 3, 4096, 4096)  # M = 3 takes the M = 4 entry
    assert e["kernel"] == "gemv" and GemvConfig(**e["config"]) == fast
    e = lookup_entry(doc["devices"], "GPU X", "int4", 17, 4096, 4096)
    assert e["kernel"] == "gemm" and GemmConfig(**e["config"]) == GemmConfig(32, 64, 256)
    assert lookup_entry(doc["devices"], "GPU X", "int4", 33, 4096, 4096) is None
    assert lookup_entry(doc["devices"], "GPU X", "int4", 1, 4096, 14336) is None
    assert lookup_entry(doc["devices"], "GPU Z", "int4", 1, 4096, 4096) is None
    shipped = json.loads((REPO / "engine" / "kernels" / "triton" / "int4_configs.json").read_text())
    assert shipped["schema"] == table["schema"] and isinstance(shipped["devices"], dict)


def test_bench_sweep_cpu_smoke(tmp_path):
    """bench_int4.py's sweep bookkeeping under the interpreter: the defaults run and pass the reference check,
    the candidates are recorded as skipped once the (zero) time budget is spent, the JSON has the table."""
    out = tmp_path / "b.json"
    cmd = [sys.executable, "benchmarks/bench_int4.py", "--cpu-smoke", "--sweep", "--budget-s", "0", "--shapes",
           "40x256", "--ms", "1,17", "--iters", "1", "--out", str(out), "--configs-out", str(tmp_path / "t.json")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    by_status = {}
    for r in doc["rows"]:
        by_status.setdefault(r["status"].split(":")[0], []).append(r)
    assert {r["kernel"] for r in by_status["ok"]} == {"int4_gemv", "int4_gemm", "nf4_gemv", "bf16_cublas"}
    assert all(r["config"] is None for r in by_status["ok"]) and len(by_status["skipped"]) > 10
    assert {(b["format"], b["M"]) for b in doc["best"]} == {("int4", 1), ("int4", 17), ("nf4", 1), ("nf4", 17)}
    assert json.loads((tmp_path / "t.json").read_text())["devices"]["cpu-interpreter"]["int4"]


def poison() -> None:
    torch.empty(1 << 26, device="cuda").fill_(float("nan"))  # unwritten outputs show up as NaN


# ------------------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K): wo, w1/w3, w2, qkv
GPU_DTYPES = ["bfloat16", "float16"]


def gpu_case(**kw) -> None:
    poison()
    err, bound = run_case(device="cuda", **kw)
    assert err <= bound, f"{kw}: max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 128])
def test_int4_matmul_gpu(n, k, m, dtype):
    gpu_case(kind="int4_gemv" if m <= 32 else "int4_gemm", n=n, k=k, m=m, dtype=dtype, seed=m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8, 32])
@pytest.mark.parametrize("n,k", [(96, 256), (200, 384), (4000, 4096)])
def test_int4_gemm_small_m_and_awkward_gpu(n, k, m):
    gpu_case(kind="int4_gemm", n=n, k=k, m=m, dtype="bfloat16", seed=n)
    if m <= 32:
        gpu_case(kind="int4_gemv", n=n, k=k, m=m, dtype="bfloat16", seed=n)
    gpu_case(kind="int4_gemv" if m <= 32 else "int4_gemm", n=n, k=k, m=m, dtype="float32", group=64, bias=True)
    gpu_case(kind="int4_gemv" if m <= 32 else "int4_gemm", n=n, k=k, m=m, dtype="bfloat16", act_order=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n,k", GPU_SHAPES + [(200, 384)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_nf4_gemv_gpu(n, k, m, dtype):
    gpu_case(kind="nf4_gemv", n=n, k=k, m=m, dtype=dtype, seed=m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_sweep_configs_gpu(dtype):
    """Every candidate config of bench_int4.py --sweep (inline-PTX bit tricks included, which the interpreter
    cannot run) at an awkward N, with and without split-K."""
    bench = _bench_module()
    for c in bench.SWEEP_GEMV:
        for m in (1, 3, c.block_m) if c.dot else (1,):
            for split in (1, 0):
                cfg = list(c._replace(split_k=split))
                gpu_case(kind="int4_gemv", n=1000, k=4096, m=m, dtype=dtype, config=cfg, seed=m)
    for c in bench.SWEEP_GEMM:
        gpu_case(kind="int4_gemm", n=1000, k=4096, m=40, dtype=dtype, config=list(c), bias=True)
    for c in bench.SWEEP_NF4:
        for m in (1, 3) if c.dot else (1,):
            gpu_case(kind="nf4_gemv", n=1000, k=4096, m=m, dtype=dtype, config=list(c), bias=True)


# ------------------------------------------------------------------------------- the CUDA int4 GEMV (M <= 8)
needs_ext = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA not available (torch.cuda.is_available() is False): the CUDA int4 GEMV needs a GPU"
)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("tc", ["1", "0"])  # K, G multiples of 128: the tensor-core path, or the FMA kernel forced
def test_int4_cuda_gemv_gpu(n, k, m, dtype, tc, monkeypatch):
    monkeypatch.setenv("ANVIL_INT4_GEMV_TC", tc)
    gpu_case(kind="int4_cuda", n=n, k=k, m=m, dtype=dtype, seed=m, bias=m == 3)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("m", [1, 4, 7, 8])
@pytest.mark.parametrize("n,k,group", [(200, 384, 128), (1000, 4096, 64), (37, 1056, 32), (333, 2560, 256),
                                       (9, 32, 32), (4001, 3072, 128), (77, 5152, 32)])  # fmt: skip
def test_int4_cuda_gemv_awkward_gpu(n, k, group, m, monkeypatch):
    """N not a multiple of the rows per block, K not a multiple of the 1,024 columns a warp covers per
    iteration (a tail iteration with idle lanes) nor of the stages in flight (K = 2,560: 3 iterations; 5,152: 6),
    every group size the kernel takes, bias; at M = 1 the per-shape default and every rows-per-warp x stages
    variant (ANVIL_INT4_GEMV_R 2 / 4 / 8 x ANVIL_INT4_GEMV_P 1 / 2 / 4)."""
    monkeypatch.setenv("ANVIL_INT4_GEMV_TC", "0")  # the FMA kernel at every shape (test_kernels_int4_tc.py: the other)
    variants = [("", "")] + ([(r, p) for r in ("2", "4", "8") for p in ("1", "2", "4")] if m == 1 else [])
    for r, p in variants:
        monkeypatch.setenv("ANVIL_INT4_GEMV_R", r)
        monkeypatch.setenv("ANVIL_INT4_GEMV_P", p)
        for dtype in GPU_DTYPES:
            gpu_case(kind="int4_cuda", n=n, k=k, m=m, dtype=dtype, group=group, seed=n + m, bias=True)


@pytest.mark.gpu
@needs_ext
def test_int4_cuda_gemv_rejects_bad_input_gpu():
    from engine.kernels import ext
    from engine.quant.int4 import quantize_rtn

    p = quantize_rtn(torch.randn(64, 256) * 0.05, 128).to("cuda", torch.bfloat16)
    x = torch.randn(9, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="1 <= M <= 8 rows, got 9"):
        ext.int4_gemv(x, p.qweight, p.scales, p.zeros, 128)
    with pytest.raises(RuntimeError, match="float16 or bfloat16 x only"):
        ext.int4_gemv(x[:2].float(), p.qweight, p.scales, p.zeros, 128)
    with pytest.raises(RuntimeError, match=r"scales / zeros must be contiguous \[N, K/G\] = \[64, 4\]"):
        ext.int4_gemv(x[:2], p.qweight, p.scales, p.zeros, 64)
    assert not ext.int4_gemv_supported(x, 128, None)  # M = 9 goes to the Triton kernels
    assert ext.int4_gemv_supported(x[:8], 128, None) and not ext.int4_gemv_supported(x[:8], 128, p.qweight[0])


@pytest.mark.gpu
@needs_ext
def test_int4_linear_method_uses_cuda_gemv_gpu(monkeypatch):
    """Int4LinearMethod.matmul sends M <= 8 rows to the CUDA GEMV and more to Triton; both match the reference."""
    from engine.kernels import ext
    from engine.quant import methods
    from engine.quant.int4 import matmul_reference, quantize_rtn

    w = quantize_rtn(torch.randn(512, 1024) * 0.05, 128).to("cuda", torch.bfloat16)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.zeros, layer.bias = w.qweight, w.scales, w.zeros, None
    meth = methods.Int4LinearMethod(128)
    calls = []
    real = ext.int4_gemv
    monkeypatch.setattr(ext, "int4_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.setattr(methods, "INT4_CUDA_MAX_M", 8)
    monkeypatch.setattr(methods, "INT4_KERNEL", "gemv")  # forced (auto sends 9.. rows to int4_mma)
    for m in (1, 8, 9, 40):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        ref = matmul_reference(x, w).float()
        err = (meth.matmul(layer, x).float() - ref).abs().max().item()
        assert err <= 2e-2 * ref.abs().max().item(), (m, err)
    assert calls == [1, 8]
