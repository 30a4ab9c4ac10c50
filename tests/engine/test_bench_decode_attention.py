"""benchmarks/bench_decode_attention.py's variant syntax and its refusal without a GPU (the timing itself needs CUDA:
results/gpu/core-h200/decode-attn-*)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode_attention.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_decode_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variants_parse_into_the_launcher_knobs():
    m = _module()
    got = m.parse_variants("base=; fused-mc256=fused:1,min_chunk:256;n32=block_n:32,num_warps:8;")
    assert got == {"base": {}, "fused-mc256": {"fused": True, "min_chunk": 256}, "n32": {"block_n": 32, "num_warps": 8}}
    assert set(m.parse_variants(m.DEFAULT_VARIANTS)) >= {"base", "fused", "n32"}


@pytest.mark.parametrize("text,msg", [("=fused:1", "has no name"), ("x=warps:8", "'warps:8' in x"),
                                      ("x=fused", "'fused' in x"), ("x=block_n:big", "'block_n:big' in x")])  # fmt: skip
def test_a_malformed_variant_is_refused_by_name(text, msg):
    with pytest.raises(SystemExit) as e:
        _module().parse_variants(text)
    assert msg in str(e.value)


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    out = tmp_path / "x.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr and not out.exists()
