"""What every engine is fed: seeded random prompt ids within the model's vocabulary, identical across engines."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from adapters.base import ModelSpec


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` ids drawn uniformly from [0, vocab_size), from Python's Mersenne Twister seeded
    with `seed` (the same ids on every machine, engine and process)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size} (the model's vocabulary could not be read "
                         "from its config.json or preset)")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(count)]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_config(model: ModelSpec):
    """The engine-independent shape of the model (engine.config.ModelConfig): its synthetic preset, or its
    config.json parsed as a Llama-family config. Raises ValueError / FileNotFoundError when there is none."""
    if model.synthetic:
        from engine.presets import PRESETS

        if model.synthetic not in PRESETS:
            raise ValueError(f"unknown synthetic preset {model.synthetic!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[model.synthetic]
    if not model.path:
        raise ValueError(f"model {model.name!r} has no resolved path")
    from engine.config import ModelConfig

    return ModelConfig.from_dir(model.path)


def vocab_size(model: ModelSpec) -> int:
    """The model's vocabulary size, from its config.json (any architecture) or its synthetic preset."""
    if model.synthetic:
        return int(model_config(model).vocab_size)
    if not model.path:
        raise ValueError(f"model {model.name!r} has no resolved path")
    cfg = json.loads((Path(model.path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"])


def weight_bytes_per_step(model: ModelSpec) -> int | None:
    """Bytes of weights one decode step must read (ModelConfig.decode_read_params at the model's dtype), the
    numerator of achieved weight bandwidth; None when the config cannot be read as a Llama-family model."""
    try:
        return model_config(model).decode_read_params * DTYPE_BYTES[model.dtype]
    except (ValueError, KeyError, OSError, TypeError):
        return None


@dataclass(frozen=True)
class Context:
    """What a scenario needs besides the adapter and its params."""

    engine: str  # the engine under test (registry name)
    case_id: str  # same for every engine measuring the same thing (used to find reference outputs)
    vocab_size: int
    out_dir: Path  # the run folder (scenarios may keep artifacts under out_dir / "artifacts")
    model: ModelSpec | None = None  # what the adapter loaded
    opts: dict | None = None  # the load options the adapter got ([options.<engine>] of the suite)
    weight_bytes: int | None = None  # weights read per decode step (weight_bytes_per_step), for GB/s
    copy_gb_s: float | None = None  # the GPU's measured device-to-device copy bandwidth (envinfo), for % of it

    @property
    def model_name(self) -> str:
        return self.model.name if self.model else ""

    @property
    def model_path(self) -> str:
        return (self.model.path or "") if self.model else ""

    def artifact(self, kind: str, suffix: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.case_id)
        p = self.out_dir / "artifacts" / kind / f"{safe}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def run_batch(adapter, prompts: list[list[int]], gen_len: int) -> list:
    """One greedy, ignore-EOS batch through the adapter; raises if any request came back with an error."""
    from adapters.base import GenRequest

    results = adapter.generate([GenRequest(prompt_ids=list(p), max_new_tokens=gen_len, ignore_eos=True) for p in prompts])
    if len(results) != len(prompts):
        raise RuntimeError(f"adapter returned {len(results)} results for {len(prompts)} requests")
    for r in results:
        if r.finish_reason == "error":
            raise RuntimeError(f"request failed in the engine: {r.error}")
        if r.first_token_time is None or not r.token_times:
            raise RuntimeError("adapter returned no token timestamps")
    return results
