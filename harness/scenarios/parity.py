"""Parity: an engine's logits and greedy tokens against a reference engine's (default hf) on the same prompt.

The reference engine's cell runs first (the runner orders it so) and saves its greedy continuation and its logits
for prompt + continuation[:-1] under <run>/artifacts/parity/. Every other engine then
  - generates n_tokens greedily from the prompt: greedy_match_tokens = tokens equal before the first mismatch,
    first_mismatch = that index (None when all match);
  - computes logits teacher-forced on the reference's sequence (so positions line up even after a mismatch):
    per position max |logit - ref logit| over the vocabulary -> max_logit_diff, mean_logit_diff,
    prompt_max_logit_diff (prompt positions only), argmax_match_frac.
Status is ok with the numbers; thresholds belong to gates. Engines without logits report token metrics only.

With layers = true the reference also saves adapter.hidden_states(prompt + continuation[:-1]) (per decoder layer,
after its residual add, before the final norm) and every other engine compares its own, layer by layer over every
position and hidden unit: samples["layers"] holds each layer's max and mean |difference|; metrics hold
layer_max_diff (over all layers), first_bad_layer (the first layer index, from 0, whose max |difference| exceeds
layer_tol; None when none does) and layer_tol itself. An engine without hidden_states records
layers_note = "layers not supported by <engine>" and keeps its logit metrics.
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
    "layers": Param(bool, False, help="also compare every decoder layer's hidden states with the reference's"),
    "layer_tol": Param(float, 1e-3, min=0, help="max |hidden-state difference| a layer may have (layers = true)"),
}
KEY_METRICS = ("max_logit_diff", "argmax_match_frac", "greedy_match_tokens", "first_mismatch", "first_bad_layer",
               "layer_max_diff")


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


def _hidden(adapter, ids: list[int]):
    """The adapter's per-layer hidden states as float32 CPU tensors [T, hidden], or the reason there are none."""
    try:
        layers = adapter.hidden_states(ids)
    except NotImplementedError as exc:
        return None, str(exc) or f"layers not supported by {getattr(adapter, 'name', 'this engine')}"
    out = [h.float().cpu() for h in layers]
    for i, h in enumerate(out):
        if h.dim() != 2 or h.shape[0] != len(ids):
            raise RuntimeError(f"adapter.hidden_states layer {i} has shape {tuple(h.shape)} for {len(ids)} ids")
    return out, None


def compare_layers(mine: list, ref: list, tol: float) -> tuple[dict, list[dict]]:
    """(metrics, per-layer rows) of |mine - ref| per layer over every position and hidden unit."""
    if len(mine) != len(ref):
        raise RuntimeError(f"{len(mine)} layers of hidden states vs the reference's {len(ref)}")
    rows = []
    for i, (a, b) in enumerate(zip(mine, ref, strict=True)):
        if a.shape != b.shape:
            raise RuntimeError(f"layer {i} hidden states {tuple(a.shape)} vs the reference's {tuple(b.shape)}")
        d = (a - b).abs()
        rows.append({"layer": i, "max_diff": float(d.max()), "mean_diff": float(d.mean()),
                     "max_diff_per_position": [float(f"{x:.4g}") for x in d.amax(dim=-1).tolist()]})
    bad = next((r["layer"] for r in rows if r["max_diff"] > tol), None)
    metrics = {"layer_max_diff": max(r["max_diff"] for r in rows), "first_bad_layer": bad, "layer_tol": tol,
               "n_layers": len(rows)}
    return metrics, rows


def run(adapter, params: dict, ctx: Context) -> tuple[dict, dict]:
    import torch

    n = params["n_tokens"]
    layers = bool(params.get("layers", False))
    tol = float(params.get("layer_tol", PARAMS["layer_tol"].default))
    prompt = random_prompts(ctx.vocab_size, 1, params["prompt_len"], params["seed"])[0]
    art = ctx.artifact("parity", ".pt")
    tokens = _greedy(adapter, prompt, n)
    if ctx.engine == params["reference"]:
        logits = _logits(adapter, prompt + tokens[:-1])
        if logits is None:
            raise RuntimeError(f"reference engine {ctx.engine!r} does not expose logits")
        saved = {"prompt": prompt, "tokens": tokens, "logits": logits}
        metrics = {"is_reference": True, "max_logit_diff": 0.0, "mean_logit_diff": 0.0, "prompt_max_logit_diff": 0.0,
                   "argmax_match_frac": 1.0, "greedy_match_tokens": len(tokens), "first_mismatch": None,
                   "n_tokens": n}
        if layers:
            hidden, why = _hidden(adapter, prompt + tokens[:-1])
            if hidden is None:
                metrics["layers_note"] = saved["layers_note"] = why
            else:
                saved["hidden"] = hidden
                metrics.update(layer_max_diff=0.0, first_bad_layer=None, layer_tol=tol,
                               n_layers=len(hidden))
        torch.save(saved, art)
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
    if layers:
        hidden, why = _hidden(adapter, prompt + ref_tokens[:-1])
        if hidden is None:
            metrics["layers_note"] = why
        elif "hidden" not in ref:
            metrics["layers_note"] = (f"reference engine {params['reference']!r} saved no hidden states: "
                                      f"{ref.get('layers_note', 'its cell ran without layers')}")
        else:
            layer_metrics, samples["layers"] = compare_layers(hidden, list(ref["hidden"]), tol)
            metrics.update(layer_metrics)
    return metrics, samples
