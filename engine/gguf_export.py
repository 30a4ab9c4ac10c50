"""Export an HF-layout Llama / Mistral checkpoint (config.json + safetensors [+ tokenizer.model]) to a GGUF file for llama.cpp.

Usage: python -m engine.gguf_export MODEL_DIR OUT.gguf [--outtype f32|f16|bf16]

Written against the `gguf` package from PyPI (GGUFWriter); llama.cpp's convert_hf_to_gguf.py is not used (it does
not run with PyPI's gguf 0.19). What llama.cpp's "llama" architecture expects, and what this module does for it:
- tensor names: token_embd, output_norm, output, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}; shapes as HF stores them ([out, in]; ggml reverses the order itself).
- Q/K rows permuted: HF checkpoints order each head's rotary pairs as (first half, second half) ("rotate_half"),
  llama.cpp's rope for this architecture pairs adjacent rows (2i, 2i+1). `permute_qk` interleaves the two halves.
- tied embeddings: no `output` tensor; llama.cpp then reads token_embd for the LM head.
- Mistral: same tensors. llama.cpp's llama architecture has no sliding window, so outputs match HF only for
  sequences shorter than `sliding_window`.
- llama3-style rope scaling: a `rope_freqs` tensor of per-frequency factors; linear scaling: scaling type + factor.
- tokenizer: SentencePiece tokenizer.model -> tokens, scores, token types, bos/eos/unk(/pad) ids, add_bos. A folder
  without tokenizer.model gets a placeholder vocabulary (<unk>, <s>, </s>, byte tokens, then "[TOKn]") so llama.cpp
  loads it; such a GGUF takes token-id prompts only (its text encode/decode is meaningless).
- outtype f32 keeps every tensor in float32 (for parity); f16 / bf16 convert 2-D tensors and keep norms in f32.
Tensors are streamed one at a time (header and tensor infos first), so memory stays at about one tensor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
OUTTYPES = ("f32", "f16", "bf16")
EXPORTER_VERSION = 1  # bump when the produced file changes, so cached exports are rebuilt

_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message names the file and what is wrong."""


def gguf_name(hf_name: str) -> str | None:
    """HF tensor name -> llama.cpp GGUF name; None for tensors llama.cpp does not use; ExportError if unknown."""
    if _IGNORED.search(hf_name):
        return None
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"
    raise ExportError(f"unexpected tensor {hf_name!r}: not part of a Llama/Mistral checkpoint")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved-pair layout.
    w: [n_head * head_dim, in] -> same shape; within a head, row order becomes (0, d/2, 1, d/2+1, ...)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing (expected an HF-layout model folder)")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs) and cfg.get("model_type") not in ARCHITECTURES.values():
        raise ExportError(f"{path}: architectures {archs} / model_type {cfg.get('model_type')!r} not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise ExportError(f"{path}: missing key {key!r}")
    return cfg


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by model.safetensors.index.json, else *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors weights")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{index}: names shards that do not exist: {missing}")
    return files


def _tensor_index(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """tensor name -> (file, shape, safetensors dtype), from the headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, list[int], str]] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                out[name] = (f, list(sl.get_shape()), str(sl.get_dtype()))
    return out


def _load(path: Path, name: str, dtype: str) -> np.ndarray:
    """One tensor as float32 numpy; bf16 (no numpy dtype) goes through torch, the rest needs no torch import."""
    from safetensors import safe_open

    if dtype == "BF16":
        with safe_open(str(path), framework="pt") as sf:
            return sf.get_tensor(name).float().numpy()
    with safe_open(str(path), framework="numpy") as sf:
        return sf.get_tensor(name).astype(np.float32, copy=False)


def _vocab(model_dir: Path | None, cfg: dict) -> dict:
    """Tokenizer metadata: tokens, scores, types and special ids, from tokenizer.model or a placeholder."""
    from gguf import TokenType

    n_vocab = int(cfg["vocab_size"])
    sp_path = model_dir / "tokenizer.model" if model_dir else None
    tok_cfg_path = model_dir / "tokenizer_config.json" if model_dir else None
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path and tok_cfg_path.is_file() else {}
    if sp_path and sp_path.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(sp_path))
        if sp.vocab_size() > n_vocab:
            raise ExportError(f"{sp_path}: {sp.vocab_size()} pieces but config.json vocab_size is {n_vocab}")
        # Rows beyond the SentencePiece vocabulary (padded embeddings) become unused "[PADn]" tokens, as llama.cpp's
        # converter does.
        tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
        scores = [-10000.0] * n_vocab
        types = [int(TokenType.UNUSED)] * n_vocab
        for i in range(sp.vocab_size()):
            tokens[i] = sp.id_to_piece(i).encode("utf-8")
            scores[i] = float(sp.get_score(i))
            types[i] = int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                           else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                           else TokenType.NORMAL)
        special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
        placeholder = False
    else:
        if n_vocab < 3 + 256:
            raise ExportError(f"{model_dir or 'synthetic'}: no tokenizer.model and vocab_size {n_vocab} < 259 (too small for the "
                              "placeholder vocabulary)")
        tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
        tokens += [f"[TOK{i}]".encode() for i in range(len(tokens), n_vocab)]
        scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(259, n_vocab)]
        types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)] + [int(TokenType.BYTE)] * 256
        types += [int(TokenType.NORMAL)] * (n_vocab - 259)
        special = {"unk": 0, "bos": 1, "eos": 2, "pad": -1}
        placeholder = True
    # config.json's ids win over the tokenizer's defaults (that is what transformers does at generation time).
    for key in ("bos", "eos", "pad"):
        val = cfg.get(f"{key}_token_id")
        if isinstance(val, list):
            val = val[0] if val else None
        if isinstance(val, int):
            special[key] = val
    return {"tokens": tokens, "scores": scores, "types": types, "special": special,
            "add_bos": bool(tok_cfg.get("add_bos_token", True)), "add_eos": bool(tok_cfg.get("add_eos_token", False)),
            "placeholder": placeholder}


def rope_settings(cfg: dict) -> tuple[float, str, dict]:
    """(theta, scaling type, scaling parameters) from config.json: transformers <5 writes rope_theta + rope_scaling,
    transformers 5 writes rope_parameters {rope_type, rope_theta, factor, ...}."""
    rs = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    theta = float(rs.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = str(rs.get("rope_type", rs.get("type", "")) or "default").lower()
    return theta, kind, rs


def _llama3_rope_factors(rs: dict, base: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, as llama.cpp reads them from `rope_freqs`."""
    factor, lo, hi = float(rs.get("factor", 8.0)), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < hi_wavelen:
            out.append(1.0)
        elif wavelen > lo_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _convert(arr: np.ndarray, outtype: str) -> np.ndarray:
    """float32 array -> the bytes to write: 1-D tensors stay f32; bf16 comes back as uint8 from gguf.quants."""
    from gguf import GGMLQuantizationType, quants

    if arr.ndim < 2 or outtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if outtype == "f16":
        return np.ascontiguousarray(arr, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), GGMLQuantizationType.BF16)


def _hparams(cfg: dict, where: str) -> dict:
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    hp = dict(n_layer=int(cfg["num_hidden_layers"]), n_embd=n_embd, n_head=n_head,
              n_head_kv=int(cfg.get("num_key_value_heads") or n_head), head_dim=int(cfg.get("head_dim") or n_embd // n_head),
              n_ff=int(cfg["intermediate_size"]), n_vocab=int(cfg["vocab_size"]),
              tied=bool(cfg.get("tie_word_embeddings", False)))
    theta, rope_type, rs = rope_settings(cfg)
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"{where}: rope_scaling type {rope_type!r} not supported by this exporter")
    hp.update(theta=theta, rope_type=rope_type, rs=rs,
              rope_freqs=_llama3_rope_factors(rs, theta, hp["head_dim"]) if rope_type == "llama3" else None)
    return hp


def _shapes(hp: dict) -> dict[str, list[int]]:
    """Every tensor llama.cpp's llama architecture reads, in write order, with its (HF-order) shape."""
    d, q, kv, ff = hp["n_embd"], hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"], hp["n_ff"]
    out = {"token_embd.weight": [hp["n_vocab"], d]}
    for i in range(hp["n_layer"]):
        for t, shape in (("attn_norm", [d]), ("attn_q", [q, d]), ("attn_k", [kv, d]), ("attn_v", [kv, d]),
                         ("attn_output", [d, q]), ("ffn_norm", [d]), ("ffn_gate", [ff, d]), ("ffn_up", [ff, d]),
                         ("ffn_down", [d, ff])):
            out[f"blk.{i}.{t}.weight"] = shape
    out["output_norm.weight"] = [d]
    if not hp["tied"]:
        out["output.weight"] = [hp["n_vocab"], d]
    return out


def _write(out: Path, cfg: dict, title: str, hp: dict, vocab: dict, outtype: str,
           shapes: dict[str, list[int]], arrays: Iterator[np.ndarray]) -> Path:
    """Write metadata, tensor infos (`shapes`, in order), then `arrays` one by one; atomically via a .partial file."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")  # per process: concurrent exports of one file are safe
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(title)
    w.add_vocab_size(hp["n_vocab"])
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_rope_freq_base(hp["theta"])
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if hp["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rs"]["factor"]))
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    for kind, tok_id in vocab["special"].items():
        if tok_id is not None and tok_id >= 0:
            getattr(w, f"add_{kind}_token_id")(int(tok_id))
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])

    infos = list(shapes.items())  # tensor infos come before any data; shapes and byte sizes are known without loading
    if hp["rope_freqs"] is not None:
        infos.insert(0, ("rope_freqs.weight", list(hp["rope_freqs"].shape)))
        arrays = itertools.chain([hp["rope_freqs"]], arrays)
    for name, shape in infos:
        if len(shape) < 2 or outtype == "f32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
        elif outtype == "f16":
            w.add_tensor_info(name, shape, np.dtype(np.float16), 2 * math.prod(shape))
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float16), 2 * math.prod(shape),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (name, shape), arr in zip(infos, arrays, strict=True):
            if list(arr.shape) != list(shape):
                raise ExportError(f"{name}: shape {list(arr.shape)} but {list(shape)} was announced")
            w.write_tensor_data(_convert(arr, outtype))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32") -> Path:
    """Write `out` (atomically: a .partial file renamed at the end) and return its path."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    cfg = read_config(model_dir)
    hp = _hparams(cfg, str(model_dir / "config.json"))
    index = _tensor_index(weight_files(model_dir))
    source: dict[str, str] = {}  # gguf name -> hf name
    for hf_name in index:
        name = gguf_name(hf_name)
        if name is not None and not (name == "output.weight" and hp["tied"]):
            source[name] = hf_name
    shapes = _shapes(hp)
    if set(source) != set(shapes):
        raise ExportError(f"{model_dir}: tensors missing {sorted(set(shapes) - set(source))[:8]}, "
                          f"unexpected {sorted(set(source) - set(shapes))[:8]}")
    for name, shape in shapes.items():
        if index[source[name]][1] != shape:
            raise ExportError(f"{source[name]}: shape {index[source[name]][1]} but config.json implies {shape}")

    def arrays() -> Iterator[np.ndarray]:
        for name in shapes:
            path, _shape, dtype = index[source[name]]
            arr = _load(path, source[name], dtype)
            if name.endswith("attn_q.weight"):
                arr = permute_qk(arr, hp["n_head"])
            elif name.endswith("attn_k.weight"):
                arr = permute_qk(arr, hp["n_head_kv"])
            yield arr

    return _write(out, cfg, model_dir.name, hp, _vocab(model_dir, cfg), outtype, shapes, arrays())


def export_random(cfg: dict, out: str | os.PathLike, outtype: str = "f16", seed: int = 0, std: float = 0.02,
                  title: str = "synthetic") -> Path:
    """A GGUF with `cfg`'s shapes (an HF config.json dict) and random weights (normal(0, std), norms 1) and the
    placeholder vocabulary: for speed runs of synthetic presets, never for parity."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    hp = _hparams(cfg, title)
    shapes = _shapes(hp)
    rng = np.random.default_rng(seed)

    def arrays() -> Iterator[np.ndarray]:
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                yield np.ones(shape, dtype=np.float32)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= std
                yield arr

    return _write(out, cfg, title, hp, _vocab(None, cfg), outtype, shapes, arrays())


def default_cache_dir() -> Path:
    return Path(os.environ.get("ANVIL_GGUF_CACHE") or Path.home() / ".cache" / "anvil" / "gguf")


def cache_key(model_dir: str | os.PathLike, outtype: str) -> str:
    """Digest of what the export reads (names, sizes, mtimes of the weight and tokenizer files, config.json's bytes)
    plus the exporter version and outtype: a changed checkpoint or exporter gives a new key."""
    import hashlib

    model_dir = Path(model_dir)
    h = hashlib.sha256(f"v{EXPORTER_VERSION}:{outtype}".encode())
    h.update((model_dir / "config.json").read_bytes())
    extra = [model_dir / n for n in ("tokenizer.model", "tokenizer_config.json", "model.safetensors.index.json")]
    for f in weight_files(model_dir) + [f for f in extra if f.is_file()]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cached_export(model_dir: str | os.PathLike, outtype: str = "f32", cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF for `model_dir`, exported on first use into <cache_dir>/<folder name>-<key>/model-<outtype>.gguf
    (cache_dir: argument, else $ANVIL_GGUF_CACHE, else ~/.cache/anvil/gguf)."""
    model_dir = Path(model_dir).resolve()
    read_config(model_dir)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"{model_dir.name}-{cache_key(model_dir, outtype)}" / f"model-{outtype}.gguf"
    if not out.is_file():
        export(model_dir, out, outtype)
    return out


def cached_export_random(preset: str, cfg: dict, outtype: str = "f16", cache_dir: str | os.PathLike | None = None,
                         seed: int = 0) -> Path:
    """export_random() on first use, cached under <cache_dir>/synthetic-<preset>-<key>/model-<outtype>.gguf."""
    import hashlib

    archs = cfg.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise ExportError(f"synthetic:{preset}: architectures {archs} not supported (supported: {', '.join(ARCHITECTURES)})")
    key = hashlib.sha256(f"v{EXPORTER_VERSION}:{outtype}:{seed}:{json.dumps(cfg, sort_keys=True)}".encode()).hexdigest()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"synthetic-{preset}-{key[:20]}" / f"model-{outtype}.gguf"
    if not out.is_file():
        export_random(cfg, out, outtype, seed=seed, title=f"synthetic:{preset}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.gguf_export", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="HF-layout folder: config.json, *.safetensors, optionally tokenizer.model")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--outtype", choices=OUTTYPES, default="f32")
    args = p.parse_args(argv)
    try:
        path = export(args.model_dir, args.out, args.outtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
