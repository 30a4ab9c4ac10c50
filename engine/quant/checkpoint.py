"""Quantized checkpoints on disk: `save_quantized` writes an HF-layout folder in Anvil's own format
(`quant_method: anvil`), `load_quantized` reads that and users' AutoAWQ GEMM / GPTQ folders
(engine/quant/formats.py) into a model whose Linears (all but the lm_head) hold packed int4 / NF4 weights.

The folder: config.json (the model's HF config plus `quantization_config` {quant_method, format, bits,
group_size, method, zero_point, desc_act, in_scale}), model.safetensors (HF tensor names; each quantized Linear's
tensors below its HF prefix, e.g. model.layers.0.self_attn.q_proj.qweight; the fused [q; k; v] and [gate; up]
rows are split back per projection), and the tokenizer files copied from the source folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.quant.apply import install, quantized_weight
from engine.quant.formats import (
    QuantSpec,
    UnsupportedQuantization,
    concat_rows,
    decode,
    parse_quant_config,
    tensor_names,
)
from engine.quant.int4 import Int4Weight
from engine.quant.nf4 import NF4Weight
from engine.weights import checkpoint_files, engine_layout, hf_shapes, to_dtype

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip


def _split_rows(q: Int4Weight | NF4Weight, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """The packed weight of a fused Linear -> one tensor dict per projection (rows split)."""
    rows = {k: v for k, v in q.tensors().items() if k in ("qweight", "scales", "zeros", "absmax")}
    shared = {k: v for k, v in q.tensors().items() if k in ("g_idx", "in_scale")}
    if isinstance(q, NF4Weight) and q.absmax is None:
        from engine.quant.nf4 import absmax_of

        rows["absmax"] = absmax_of(q)
    parts = [{k: v.clone() for k, v in shared.items()} for _ in sizes]  # safetensors refuses shared storage
    for name, t in rows.items():
        for d, piece in zip(parts, torch.split(t, sizes), strict=True):
            d[name] = piece
    return parts


def quantization_config(weights: list[Int4Weight | NF4Weight], method: str) -> dict:
    if all(isinstance(w, NF4Weight) for w in weights):
        return {"quant_method": "anvil", "format": "nf4", "bits": 4, "block_size": 64, "method": method}
    return {"quant_method": "anvil", "format": "int4", "bits": 4, "group_size": weights[0].group_size,
            "method": method, "zero_point": True, "sym": False,
            "desc_act": any(w.g_idx is not None for w in weights),
            "in_scale": any(w.in_scale is not None for w in weights)}


def save_quantized(model: torch.nn.Module, config: ModelConfig, out_dir: str | Path, method: str,
                   source_dir: str | Path | None = None) -> Path:
    """Write the quantized model (after engine.quant.quantize_model) as an HF-layout folder; copies the tokenizer
    files from source_dir (the float model's folder) when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(config)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    packed = []
    for eng, hf_names in engine_layout(config).items():
        mod_name, leaf = eng.rsplit(".", 1)
        mod = model.get_submodule(mod_name) if leaf == "weight" else None
        q = quantized_weight(mod) if mod is not None else None
        if q is None:
            dense = state[eng]
            for name, piece in zip(hf_names, torch.split(dense, [shapes[n][0] for n in hf_names]), strict=True):
                tensors[name] = piece.contiguous()
            continue
        packed.append(q)
        sizes = [shapes[n][0] for n in hf_names]
        for name, part in zip(hf_names, _split_rows(q, sizes), strict=True):
            prefix = name.removesuffix(".weight")
            for k, t in part.items():
                tensors[f"{prefix}.{k}"] = t.contiguous().cpu()
    if not packed:
        raise ValueError("the model has no quantized Linear: run engine.quant.quantize_model first")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf = config.to_hf()
    hf["torch_dtype"] = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
    hf["quantization_config"] = quantization_config(packed, method)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if source_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(source_dir) / f).is_file():
                shutil.copy2(Path(source_dir) / f, out / f)
    return out


def read_spec(path: Path) -> QuantSpec:
    d = json.loads((path / "config.json").read_text())
    qc = d.get("quantization_config")
    if qc is None and (path / "quantize_config.json").is_file():  # older AutoGPTQ folders
        qc = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
    if qc is None:
        raise UnsupportedQuantization(f"{path}: config.json has no quantization_config")
    try:
        return parse_quant_config(qc)
    except UnsupportedQuantization as e:
        raise UnsupportedQuantization(f"{path / 'config.json'}: {e}") from e


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for f, ns in by_file.items():
        with safe_open(f, framework="pt", device="cpu") as h:
            for n in ns:
                out[n] = h.get_tensor(n)
    return out


def load_quantized_state(path: str | Path, config: ModelConfig, dtype, device):
    """(dense engine-named tensors, {module name: packed weight}) of a quantized folder."""
    path = Path(path)
    spec = read_spec(path)
    dt = to_dtype(dtype)
    files = checkpoint_files(path)
    required, optional = tensor_names(spec)
    dense: dict[str, torch.Tensor] = {}
    packed: dict[str, Int4Weight | NF4Weight] = {}
    used: set[str] = set()
    for eng, hf_names in engine_layout(config).items():
        if all(n in files for n in hf_names):
            parts = _read(files, hf_names)
            used.update(hf_names)
            dense[eng] = torch.cat([parts[n] for n in hf_names]).to(device=device, dtype=dt)
            continue
        mod_name = eng.removesuffix(".weight")
        decoded = []
        for n in hf_names:
            prefix = n.removesuffix(".weight")
            missing = [r for r in required if f"{prefix}.{r}" not in files]
            if missing:
                raise UnsupportedQuantization(f"{path}: {prefix} has neither .weight nor .{missing[0]} ({spec.kind})")
            names = [f"{prefix}.{r}" for r in required + optional if f"{prefix}.{r}" in files]
            used.update(names)
            t = {k.rsplit(".", 1)[1]: v for k, v in _read(files, names).items()}
            bias = t.pop("bias", None)
            if bias is not None and not config.qkv_bias and bool(bias.any()):
                raise UnsupportedQuantization(f"{path}: {prefix}.bias is nonzero but this model has no biases")
            decoded.append(decode(t, spec))
        packed[mod_name] = concat_rows(decoded, f"{path}: {mod_name}").to(device, dt) \
            if isinstance(decoded[0], Int4Weight) else _nf4_to(concat_rows(decoded, mod_name), device)
    extra = sorted(n for n in files if n not in used and not n.endswith(("rotary_emb.inv_freq", ".bias")))
    if extra:
        raise UnsupportedQuantization(f"{path}: unexpected tensor {extra[0]} for {spec.kind}"
                                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return dense, packed


def _nf4_to(w: NF4Weight, device) -> NF4Weight:
    return NF4Weight(w.qweight.to(device), w.absmax.to(device))


def load_quantized(path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu"):
    """LoadedModel of a quantized folder (anvil, AutoAWQ GEMM, GPTQ). With the pluggable Linear
    (engine.model.layers.linear) the Linears get Int4LinearMethod / NF4LinearMethod; on an older tree the weights
    are dequantized into nn.Linear (fake quantization, same numbers as the reference path)."""
    from engine.model import LoadedModel, Transformer
    from engine.quant.methods import Linear
    from engine.tokenizer import Tokenizer

    path = Path(path)
    config = ModelConfig.from_dir(path)
    dense, packed = load_quantized_state(path, config, dtype, device)
    with torch.device("meta"):
        model = Transformer(config)
    if Linear is None:  # older tree: dense nn.Linear
        for name in packed:
            w = model.get_submodule(name).weight
            dense[name + ".weight"] = torch.empty(w.shape, dtype=to_dtype(dtype), device=device)
    else:
        for name, q in packed.items():
            install(model.get_submodule(name), q.to("meta") if isinstance(q, Int4Weight) else _nf4_to(q, "meta"))
        dense.update({f"{name}.{k}": v for name, q in packed.items() for k, v in _runtime_tensors(q).items()})
    model.load_state_dict(dense, strict=True, assign=True)
    model.requires_grad_(False).eval()
    for name, q in packed.items():
        mod = model.get_submodule(name)
        if Linear is None:
            install(mod, q)
        else:
            mod.method.process_weights_after_loading(mod)
    model.ensure_rope(min(config.max_position_embeddings, 32768))
    return LoadedModel(model=model, config=config, tokenizer=Tokenizer.from_dir(path))


def _runtime_tensors(q: Int4Weight | NF4Weight) -> dict[str, torch.Tensor]:
    return q.tensors() if isinstance(q, Int4Weight) else {"qweight": q.qweight, "absmax": q.absmax}
