"""`bench quantize`: a quantized folder that load_quantized reads; a bad method exits 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from harness.cli import app


def test_bench_quantize_rtn_then_load(tmp_path):
    from engine.quant import load_quantized

    res = CliRunner().invoke(app, ["quantize", "tiny", str(tmp_path / "q"), "--method", "rtn"])
    assert res.exit_code == 0, res.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "anvil", "format": "int4", "bits": 4, "group_size": 128, "method": "rtn",
                  "zero_point": True, "sym": False, "desc_act": False, "in_scale": False}
    lm = load_quantized(tmp_path / "q", "bfloat16", "cpu")
    assert type(lm.model.layers[0].feed_forward.w2.method).__name__ == "Int4LinearMethod"
    assert type(lm.model.output.method).__name__ == "UnquantizedLinearMethod"


def test_bench_quantize_unknown_method(tmp_path):
    res = CliRunner().invoke(app, ["quantize", "tiny", str(tmp_path / "q"), "--method", "int3"])
    assert res.exit_code == 2 and "unknown --method 'int3'" in res.output
