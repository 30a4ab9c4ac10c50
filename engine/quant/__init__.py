"""Weight-only 4-bit quantization: int4 g128 (RTN, AWQ, GPTQ; AutoAWQ GEMM and GPTQ checkpoints imported) and NF4.

    quantize_model(model, "awq", calib=stdlib_calibration(tokenizer))   # every Linear but the lm_head, in place
    save_quantized(model, config, out_dir, "awq", source_dir=...)        # HF-layout folder, quant_method: anvil
    load_quantized(path, dtype, device)                                   # anvil / awq (gemm) / gptq folders

Modules: int4 (the packed format, RTN, reference), nf4, awq, gptq, calib (calibration data, input capture),
apply (quantize_model), methods (LinearMethods), formats (users' checkpoints), checkpoint (save / load).
"""

from engine.quant.apply import METHODS, quantize_model
from engine.quant.calib import stdlib_calibration
from engine.quant.checkpoint import load_quantized, save_quantized
from engine.quant.formats import UnsupportedQuantization

__all__ = ["METHODS", "UnsupportedQuantization", "load_quantized", "quantize_model", "save_quantized",
           "stdlib_calibration"]
