"""safetensors loader: single-file or sharded HF checkpoints -> engine-named, fused tensors, checked against the config.

HF names map to engine names (model.layers.{i}.self_attn.q_proj.weight -> layers.{i}.attention.wqkv.weight,
packed [q; k; v]; mlp.gate_proj/up_proj -> feed_forward.w13, packed [gate; up]). Every tensor's shape is checked
against the config before its data is read; a missing, unexpected or mis-shaped tensor raises WeightsError
naming the tensor and the file.

Tensor parallelism: with `tp` (engine/model/layers/parallel.py TPShard) each rank reads only its slices of each
tensor through safe_open(...).get_slice (its query / KV heads of q/k/v, its columns of o_proj, its ffn rows of
gate/up and columns of down, its vocabulary rows of embed_tokens / lm_head), after the full shapes are checked.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open

from engine.config import ModelConfig
from engine.model.layers.parallel import TPShard
from engine.model.llama import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightsError(ValueError):
    """A checkpoint does not match its config (the message names the tensor and the file)."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config holds, with its shape (lm_head only when untied)."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.dim),
        "model.norm.weight": (c.dim,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.dim,)
        shapes[p + "post_attention_layernorm.weight"] = (c.dim,)
        shapes[p + "self_attn.q_proj.weight"] = (c.q_size, c.dim)
        shapes[p + "self_attn.k_proj.weight"] = (c.kv_size, c.dim)
        shapes[p + "self_attn.v_proj.weight"] = (c.kv_size, c.dim)
        shapes[p + "self_attn.o_proj.weight"] = (c.dim, c.q_size)
        if c.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (c.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (c.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (c.kv_size,)
        shapes[p + "mlp.gate_proj.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "mlp.up_proj.weight"] = (c.ffn_dim, c.dim)
        shapes[p + "mlp.down_proj.weight"] = (c.dim, c.ffn_dim)
    return shapes


def engine_layout(config: ModelConfig) -> dict[str, list[str]]:
    """Engine tensor name -> the HF tensors concatenated (dim 0, in order) to make it."""
    layout: dict[str, list[str]] = {
        "tok_embeddings.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        layout["output.weight"] = ["lm_head.weight"]
    for i in range(config.n_layers):
        hf, en = f"model.layers.{i}.", f"layers.{i}."
        layout[en + "attention_norm.weight"] = [hf + "input_layernorm.weight"]
        layout[en + "ffn_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        layout[en + "attention.wqkv.weight"] = [hf + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if config.qkv_bias:
            layout[en + "attention.wqkv.bias"] = [hf + f"self_attn.{x}_proj.bias" for x in "qkv"]
        layout[en + "attention.wo.weight"] = [hf + "self_attn.o_proj.weight"]
        layout[en + "feed_forward.w13.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        layout[en + "feed_forward.w2.weight"] = [hf + "mlp.down_proj.weight"]
    return layout


def _ignored(name: str, config: ModelConfig) -> bool:
    # rotary buffers some exporters save; a tied model's redundant lm_head copy
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


@contextmanager
def _open(file: Path):
    """safe_open(file), with a corrupt or truncated file reported as WeightsError naming it."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise WeightsError(f"{file}: not a valid safetensors file (truncated or corrupt?): {e}") from e


def _hf_blobs(folder: Path) -> Path | None:
    """The blobs/ folder a HF hub cache snapshot (models--org--name/snapshots/<rev>) symlinks its files into."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent / "blobs"
    return None


def _index_entry(path: Path, index: Path, name: str, fname: object) -> Path:
    """The file an index entry names, refused (WeightsError naming the entry) unless it is a relative path inside
    the model folder: no absolute path, no '..', no symlink out of the folder (except a HF cache snapshot's
    symlinks into its repo's blobs/)."""
    if not isinstance(fname, str) or not fname:
        raise WeightsError(f"{index}: tensor {name} is mapped to {fname!r}, not a file name")
    lexical = PurePosixPath(fname.replace("\\", "/"))
    bad = lexical.is_absolute() or PureWindowsPath(fname).drive or ".." in lexical.parts
    file = path / lexical
    if not bad and file.exists():
        real, roots = file.resolve(), [path.resolve()]
        if (blobs := _hf_blobs(path)) is not None:
            roots.append(blobs.resolve())
        bad = not any(real.is_relative_to(r) for r in roots)
    if bad:
        raise WeightsError(f"{index}: tensor {name} is mapped to {fname!r}, which is outside the model folder {path} "
                           f"(absolute paths, '..' and symlinks out of the folder are refused)")
    return file


def checkpoint_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (reads headers only)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: weight_map is not a JSON object")
        files = {name: _index_entry(path, index, name, fname) for name, fname in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise WeightsError(f"{index}: tensor {name} is mapped to {f.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def load_state_dict(
    path: str | Path, config: ModelConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    tp: TPShard | None = None,
) -> dict[str, torch.Tensor]:
    """Read, check, fuse and convert a checkpoint into engine-named tensors on `device` in `dtype` (this rank's
    shard of each under tensor parallelism: `tp`, built for this `config`)."""
    path = Path(path)
    dt = to_dtype(dtype)
    files = checkpoint_files(path)
    expected = hf_shapes(config)
    where = INDEX_FILE if (path / INDEX_FILE).is_file() else SINGLE_FILE

    unexpected = sorted(n for n in files if n not in expected and not _ignored(n, config))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"unexpected tensor {unexpected[0]} in {files[unexpected[0]]}{more}")
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"missing tensor {missing[0]}: not in {path / where}{more}")

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)

    hf: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise WeightsError(f"missing tensor {name}: {path / where} maps it to {file.name}, which lacks it")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise WeightsError(
                        f"tensor {name} in {file} has shape {list(shape)}, expected {list(expected[name])} "
                        f"for this config.json"
                    )
                t = f.get_tensor(name) if tp is None else tp.read(name, f.get_slice(name))
                hf[name] = t.to(device=device, dtype=dt)

    state: dict[str, torch.Tensor] = {}
    for eng, parts in engine_layout(config).items():
        state[eng] = hf[parts[0]] if len(parts) == 1 else torch.cat([hf.pop(p) for p in parts], dim=0)
    return state


def load_model(
    path: str | Path, config: ModelConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    tp: TPShard | None = None,
) -> Transformer:
    """The model (under tensor parallelism: this rank's shard, built on tp.local_config())."""
    if tp is None or tp.world == 1:
        return Transformer.from_state_dict(config, load_state_dict(path, config, dtype, device))
    return Transformer.from_state_dict(tp.local_config(), load_state_dict(path, config, dtype, device, tp), tp)
