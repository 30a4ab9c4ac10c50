"""Parity: an engine's logits and greedy tokens against a reference engine's (default hf) on the same prompt.

The reference engine's cell runs first (the runner orders it so) and saves its greedy continuation and its logits
for prompt + continuation[:-1] under <run>/artifacts/parity/. Every other engine then
  - generates n_tokens greedily from the prompt: greedy_match_tokens = tokens equal before the first mismatch,
    first_mismatch = that index (None when all match);
  - computes logits teacher-forced on the reference's sequence (so positions line up even after a mismatch):
    per position max |logit - ref logit| over the vocabulary -> max_logit_diff, mean_logit_diff,
    prompt_max_logit_diff (prompt positions only), argmax_match_frac.
Status is ok with the numbers; thresholds belong to gates. Engines without logits report token metrics only.
"""

from __future__ import annotations

from adapters.base import GenRequest
from harness.scenarios import Param
from harness.workload import Context, random_prompts

PARAMS = {
    "reference": Param(str, "hf", help="engine whose outputs are the reference"),
    "prompt_len": Param(int, 32, sweep=True, min=1),
    "n_tokens": Param(int, 16, sweep=True, min=1, help="greedy tokens compared"),
    "seed": Param(int, 2, sweep=True),
}
KEY_METRICS = ("max_logit_diff", "argmax_match_frac", "greedy_match_tokens", "first_mismatch")


def validate(params: dict, engines: tuple[str, ...]) -> tuple[str, str] | None:
    if params["reference"] not in engines:
        return "reference", f"reference engine {params['reference']!r} must be one of this scenario's engines ({', '.join(engines)})"
    return None


def _greedy(adapter, prompt: list[int], n: int) -> list[int]:
    (res,) = adapter.generate([GenRequest(prompt_ids=list(prompt), max_new_tokens=n, ignore_eos=True)])
    if res.finish_reason == "error":
        raise RuntimeError(f"request failed in the engine: {res.error}")
    return list(res.output_ids)


def _logits(adapter, ids: list[int]):
    try:
        out = adapter.logits(ids)
    except NotImplementedError:
        return None
    if tuple(out.shape[:1]) != (len(ids),):
        raise RuntimeError(f"adapter.logits returned shape {tuple(out.shape)} for {len(ids)} ids")
    return out.float().cpu()


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    import torch

    n = params["n_tokens"]
    prompt = random_prompts(ctx.vocab_size, 1, params["prompt_len"], params["seed"])[0]
    art = ctx.artifact("parity", ".pt")
    tokens = _greedy(adapter, prompt, n)
    if ctx.engine == params["reference"]:
        logits = _logits(adapter, prompt + tokens[:-1])
        if logits is None:
            raise RuntimeError(f"reference engine {ctx.engine!r} does not expose logits")
        torch.save({"prompt": prompt, "tokens": tokens, "logits": logits}, art)
        metrics = {"is_reference": True, "max_logit_diff": 0.0, "mean_logit_diff": 0.0, "prompt_max_logit_diff": 0.0,
                   "argmax_match_frac": 1.0, "greedy_match_tokens": len(tokens), "first_mismatch": None,
                   "n_tokens": n}
        return metrics, {"prompt": prompt, "tokens": tokens}
    if not art.exists():
        raise RuntimeError(f"no reference outputs from {params['reference']!r} for this case "
                           "(its parity cell failed or was skipped)")
    ref = torch.load(art, weights_only=True)
    if ref["prompt"] != prompt:
        raise RuntimeError("reference prompt differs from this engine's prompt (vocab size mismatch?)")
    ref_tokens = list(ref["tokens"])
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b), None)
    if first is None and len(tokens) != len(ref_tokens):
        first = min(len(tokens), len(ref_tokens))
    metrics = {"is_reference": False, "greedy_match_tokens": len(ref_tokens) if first is None else first,
               "first_mismatch": first, "n_tokens": n}
    samples = {"prompt": prompt, "tokens": tokens, "ref_tokens": ref_tokens}
    logits = _logits(adapter, prompt + ref_tokens[:-1])
    if logits is None:
        samples["note"] = "engine does not expose logits"
    else:
        ref_logits = ref["logits"]
        if logits.shape != ref_logits.shape:
            raise RuntimeError(f"logits shape {tuple(logits.shape)} != reference {tuple(ref_logits.shape)}")
        per_pos = (logits - ref_logits).abs().amax(dim=-1)  # [positions]
        P = len(prompt)
        metrics.update({
            "max_logit_diff": float(per_pos.max()),
            "mean_logit_diff": float(per_pos.mean()),
            "prompt_max_logit_diff": float(per_pos[:P].max()),
            "argmax_match_frac": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        })
        samples["max_abs_diff_per_position"] = [float(f"{x:.4g}") for x in per_pos.tolist()]
    return metrics, samples
