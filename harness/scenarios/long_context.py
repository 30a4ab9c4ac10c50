"""Long-context scenario: prefill tok/s and TTFT vs prompt length, decode speed at that context, peak memory.

suites/long_context.toml sweeps `prompt_len` (1k ... 32k, and beyond where the model allows); each cell runs
`repeats` prompts of that many tokens (each its own, so a server's prefix cache cannot serve a repeat) after `warmup`
runs of `warmup_len` tokens (default: the same length, so a first-call cost per shape is paid untimed), and records
TTFT, prefill tok/s (prompt / TTFT), decode tok/s over `decode_tokens` generated at that context, peak memory
(torch's peak allocation for in-process CUDA engines, NVML device memory and process RSS from telemetry) and energy
per token on GPUs.

The context limit comes from, smallest first: `context_len` in the suite, the adapter's `max_context`, the model's
max_position_embeddings (config.json or synthetic preset), engine options max_seq_len / n_ctx. A prompt that does
not fit (prompt_len + decode_tokens > limit) is never truncated: the cell is refused with a reason naming the
lengths and where the limit came from, before anything is sent to the engine.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

from adapters.base import Adapter, GenRequest, ModelSpec
from harness import metrics as M
from harness.scenarios import Param, Skip
from harness.telemetry import Telemetry, flat_metrics

PARAMS = {
    "prompt_len": Param(int, 1024, sweep=True, min=1, help="prompt tokens (one cell per length)"),
    "decode_tokens": Param(int, 32, sweep=True, min=2, help="tokens generated at that context"),
    "repeats": Param(int, 1, min=1, help="timed runs"),
    "warmup": Param(int, 1, min=0, help="untimed runs first, each on its own prompt"),
    "warmup_len": Param(int, 0, min=0, help="prompt tokens of a warm-up run (0 = prompt_len: the measured runs then "
                        "meet no shape for the first time)"),
    "context_len": Param(int, 0, min=0, help="context the model/server allows (0 = from the model files)"),
    "seed": Param(int, 0),
    "telemetry_interval_s": Param(float, 0.1, min=0.01),
}
KNOWN = set(PARAMS)
OWN_TELEMETRY = True  # samples around the measured runs only (not the warm-up)
KEY_METRICS = (
    "ttft_ms",
    "prefill_tok_s",
    "decode_tok_s",
    "torch_peak_mem_mb",
    "gpu_mem_peak_mb",
    "rss_peak_mb",
    "j_per_token",
)


class ContextTooLong(Skip, ValueError):
    """The prompt plus the tokens to generate exceed the model's context; never truncated."""


def context_limit(
    model: ModelSpec, params: dict[str, Any], adapter: Adapter | None = None, opts: dict[str, Any] | None = None
) -> tuple[int | None, str]:
    """(tokens the model allows, where that number came from); (None, why) when nothing says."""
    if params.get("context_len"):
        return int(params["context_len"]), "context_len in the suite"
    limits: list[tuple[int, str]] = []
    own = getattr(adapter, "max_context", None) if adapter is not None else None
    if callable(own):
        own = own()
    if isinstance(own, int) and own > 0:
        limits.append((own, f"{getattr(adapter, 'name', 'adapter')} reports max_context"))
    if model.synthetic:
        try:
            from engine.presets import PRESETS

            cfg = PRESETS[model.synthetic]
            limits.append((cfg.max_position_embeddings, f"max_position_embeddings of preset {model.synthetic}"))
        except (ImportError, KeyError):
            pass
    elif model.path and (Path(model.path) / "config.json").is_file():
        cfg = json.loads((Path(model.path) / "config.json").read_text())
        if cfg.get("max_position_embeddings"):
            limits.append((int(cfg["max_position_embeddings"]), f"max_position_embeddings in {model.path}/config.json"))
    for key in ("max_seq_len", "n_ctx"):  # engine-side caps smaller than the model's own limit
        if opts and opts.get(key):
            limits.append((int(opts[key]), f"engine option {key}"))
    if not limits:
        return None, "context limit unknown (no config.json, preset, or context_len)"
    return min(limits)


def vocab_size(model: ModelSpec) -> int:
    if model.synthetic:
        try:
            from engine.presets import PRESETS

            return PRESETS[model.synthetic].vocab_size
        except (ImportError, KeyError):
            return 32000
    if model.path and (Path(model.path) / "config.json").is_file():
        return int(json.loads((Path(model.path) / "config.json").read_text()).get("vocab_size", 32000))
    return 32000


def check_fits(prompt_len: int, decode_tokens: int, limit: int | None, source: str) -> None:
    if limit is not None and prompt_len + decode_tokens > limit:
        raise ContextTooLong(
            f"prompt of {prompt_len} tokens + {decode_tokens} new tokens = {prompt_len + decode_tokens} exceeds the "
            f"model's context of {limit} tokens ({source}); refused, not truncated"
        )


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    """Deterministic synthetic prompt ids that avoid the low (special) ids."""
    rng = random.Random(seed)
    lo = min(10, vocab - 1)
    return [rng.randrange(lo, vocab) for _ in range(n)]


def _cuda_peak(model: ModelSpec, reset: bool) -> float | None:
    if model.device != "cuda":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        if reset:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # a CUDA engine outside torch (llama.cpp): NVML telemetry covers it
        return None


def run_long_context(
    adapter: Adapter,
    model: ModelSpec,
    params: dict[str, Any],
    opts: dict[str, Any] | None = None,
    vocab: int | None = None,
) -> dict[str, Any]:
    """One (engine, length) cell -> {"status", "reason", "metrics", "samples", "telemetry"}; never raises for a
    prompt that does not fit or a failed generation: those are the cell's status."""
    unknown = set(params) - KNOWN
    if unknown:
        raise ValueError(f"long_context: unknown params {sorted(unknown)}; known: {', '.join(sorted(KNOWN))}")
    if "prompt_len" not in params:
        raise ValueError("long_context: prompt_len is required")
    plen, ndec = int(params["prompt_len"]), int(params.get("decode_tokens", 32))
    repeats = int(params.get("repeats", 1))
    if plen < 1 or ndec < 2 or repeats < 1:
        raise ValueError(
            f"long_context: need prompt_len >= 1, decode_tokens >= 2, repeats >= 1; got {plen}, {ndec}, {repeats}"
        )
    limit, source = context_limit(model, params, adapter, opts)
    base = {"prompt_len": plen, "decode_tokens": ndec, "context_limit": limit, "context_limit_source": source}
    try:
        check_fits(plen, ndec, limit, source)
    except ContextTooLong as exc:
        return {"status": "skipped", "reason": str(exc), "metrics": {}, "samples": [], "info": base}
    # every run has its own prompt (a server's prefix cache cannot serve a repeat); a warm-up has the measured
    # length by default, so a per-shape first-call cost (cuDNN's plan build, a JIT) is paid before the timed runs
    v, seed = vocab or vocab_size(model), int(params.get("seed", 0)) * 1_000_003
    wlen = min(int(params.get("warmup_len", 0)) or plen, plen)
    samples: list[dict[str, Any]] = []
    try:
        for w in range(int(params.get("warmup", 1))):
            adapter.generate([GenRequest(prompt_ids=prompt_ids(wlen, v, seed + 10_000 + w), max_new_tokens=2)])
        _cuda_peak(model, reset=True)
        with Telemetry(interval_s=float(params.get("telemetry_interval_s", 0.1))) as tel:
            for r in range(repeats):
                ids = prompt_ids(plen, v, seed + r)
                (res,) = adapter.generate([GenRequest(prompt_ids=ids, max_new_tokens=ndec)])
                if res.finish_reason == "error":
                    raise RuntimeError(res.error or "generation failed")
                samples.append(_sample(r, plen, res))
        cuda_peak = _cuda_peak(model, reset=False)
    except ContextTooLong as exc:
        return {"status": "skipped", "reason": str(exc), "metrics": {}, "samples": samples, "info": base}
    except Exception as exc:  # OOM at 32k, an engine that refuses the length: the cell fails, the run goes on
        reason = f"{type(exc).__name__}: {exc}"
        return {"status": "failed", "reason": reason[:1000], "metrics": {}, "samples": samples, "info": base}
    gen_tokens = sum(s["output_tokens"] for s in samples)
    tsum = tel.summary(generated_tokens=gen_tokens)
    metrics = _metrics(samples)
    if cuda_peak is not None:
        metrics["torch_peak_mem_mb"] = cuda_peak
    metrics |= flat_metrics(tsum)
    return {"status": "ok", "reason": None, "metrics": metrics, "samples": samples, "telemetry": tsum, "info": base}


def _sample(r: int, plen: int, res) -> dict[str, Any]:
    t = res.token_times
    return {
        "repeat": r,
        "prompt_tokens": res.prompt_tokens or plen,
        "output_tokens": len(res.output_ids),
        "ttft_s": res.ttft,
        "decode_s": (t[-1] - t[0]) if len(t) > 1 else None,
        "decode_steps": max(len(t) - 1, 0),
        "finish_reason": res.finish_reason,
    }


def _metrics(samples: list[dict[str, Any]]) -> dict[str, float]:
    ttft = [s["ttft_s"] for s in samples if s["ttft_s"]]
    dec = [s["decode_steps"] / s["decode_s"] for s in samples if s["decode_s"]]
    plen = samples[0]["prompt_tokens"]
    m: dict[str, float] = {"prompt_tokens": float(plen)}
    if ttft:
        med = statistics.median(ttft)
        m["ttft_ms"] = med * 1000.0
        m["prefill_tok_s"] = plen / med
    if dec:
        m["decode_tok_s"] = statistics.median(dec)
        m["decode_ms_per_token"] = 1000.0 / m["decode_tok_s"]
    return m


def run(adapter, params: dict, ctx) -> tuple[dict, dict]:
    """Registry entry point. A prompt past the context raises ContextTooLong (a Skip: the cell is recorded as
    skipped with the reason); an engine failure raises with the engine's message (the cell fails)."""
    model = getattr(ctx, "model", None) or getattr(adapter, "model_spec", None) or ModelSpec("unknown", None)
    out = run_long_context(adapter, model, params, getattr(ctx, "opts", None), getattr(ctx, "vocab_size", None))
    if out["status"] == "skipped":
        raise ContextTooLong(out["reason"])
    if out["status"] == "failed":
        raise RuntimeError(out["reason"])
    return M.clean(out["metrics"]), {"runs": out["samples"], "telemetry": out["telemetry"], "info": out["info"]}
