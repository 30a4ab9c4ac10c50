"""`bench quantize MODEL OUT --method rtn|awq|gptq|nf4`: quantize a float checkpoint's Linears (all but the
lm_head) to 4 bits and write an HF-layout folder that engine.quant.load_quantized (and engine.load) reads."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def quantize_cmd(
    model: str = typer.Argument(..., help="a float checkpoint folder or a name engine.hub knows ('tiny')"),
    out: Path = typer.Argument(..., help="output folder (created)"),
    method: str = typer.Option("awq", "--method", help="rtn | awq | gptq | nf4"),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size (rtn, awq, gptq)"),
    device: str = typer.Option("cpu", "--device", help="where to quantize: cpu | cuda"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="model dtype while quantizing; scales are stored in it"),
    calib_samples: int = typer.Option(128, "--calib-samples", help="calibration sequences (awq, gptq)"),
    calib_seq: int = typer.Option(512, "--calib-seq", help="tokens per calibration sequence"),
    act_order: bool = typer.Option(False, "--act-order", help="gptq: columns by decreasing Hessian diagonal"),
    double_quant: bool = typer.Option(False, "--double-quant", help="nf4: quantize against int8 absmax"),
) -> None:
    """Quantize MODEL's Linears (all but the lm_head) to 4 bits; write OUT, an HF-layout folder that
    engine.quant.load_quantized reads. Calibration (awq, gptq) is CPython standard-library code (engine.quant.calib.stdlib_calibration, the
    held-out modules of the tiny model excluded), encoded with the model's own tokenizer."""
    import engine
    from engine.hub import resolve
    from engine.quant import METHODS, quantize_model, save_quantized, stdlib_calibration

    if method not in METHODS:
        typer.echo(f"error: unknown --method {method!r} (supported: {', '.join(METHODS)})", err=True)
        raise typer.Exit(2)
    src = Path(model) if (Path(model) / "config.json").is_file() else resolve(model)
    t0 = time.time()
    lm = engine.load(src, dtype, device)
    calib = None
    if method in ("awq", "gptq"):
        if lm.tokenizer is None:
            typer.echo(f"error: {src} has no tokenizer files: {method} needs them for calibration", err=True)
            raise typer.Exit(2)
        calib = list(stdlib_calibration(lm.tokenizer, n_samples=calib_samples, seq_len=calib_seq))
    opts = {"act_order": act_order} if method == "gptq" else {"double_quant": double_quant} if method == "nf4" else {}
    packed = quantize_model(lm.model, method, calib=calib, group_size=group_size, **opts)
    path = save_quantized(lm.model, lm.config, out, method, source_dir=src)
    typer.echo(f"{method}: {len(packed)} Linears quantized in {time.time() - t0:.1f}s -> {path}")
