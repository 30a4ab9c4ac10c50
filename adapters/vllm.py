"""vLLM adapter: vllm.LLM in process, token-id prompts, per-token times from the engine's step loop.

Written against vLLM's documented Python API (vllm.LLM, vllm.SamplingParams, vllm.inputs.TokensPrompt, LLM.llm_engine
.add_request / .step / .has_unfinished_requests, RequestOutput.outputs[0].token_ids). vLLM cannot be installed on
the CI machine (it needs a GPU), so tests run it against a stand-in `vllm` module; on the lent GPU it runs for real
(../shared/GPU.md, "Running vLLM on the lent GPU").

Synthetic models ('synthetic:<preset>', real shapes, random weights): vLLM needs a model folder, so one is written
under a cache dir (opts cache_dir, default ~/.cache/anvil/vllm-synthetic/<preset>-<dtype>): the preset's HF
config.json (engine.presets -> ModelConfig.to_hf()) and a word-level tokenizer.json with exactly the preset's
vocabulary size (built with `tokenizers`, nothing downloaded), and vllm.LLM gets load_format="dummy" (random weights).
load() sets VLLM_ENABLE_V1_MULTIPROCESSING=0 unless it is set, defensively: in a daemonic process (the harness's
workers were until they were made non-daemonic) vLLM's engine-core subprocess fails ("daemonic processes are not
allowed to have children"), and in process the step loop's timestamps need no IPC hop.

Conventions: all requests of a generate() call are added before the first step (one continuous batch) and share
its submit_time; a token's time is when the step that produced it returned (outputs are on the host then). When a
step yields several tokens for a request (multi-step / speculative decoding), they share that step's time.
logits() is not offered: vLLM returns top-k logprobs, not full logits.

Options (opts): gpu_memory_utilization (0.9), max_model_len, enforce_eager (False), tensor_parallel_size (1),
seed (0), max_num_seqs, enable_prefix_caching (False: every request pays its own prefill), cache_dir (synthetic model
folders), extra (dict of further vllm.LLM keyword arguments).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapters.base import GenRequest, GenResult, LLMClassAdapter, ModelSpec, now

INSTALL_HINT = "pip install vllm  (needs a CUDA GPU)"
DEFAULT_CACHE = Path("~/.cache/anvil/vllm-synthetic")
UNK = "<unk>"  # token 0 of a synthetic vocabulary


def _token_names(cfg) -> dict[int, str]:
    """Names of the special ids of a synthetic vocabulary (every other id i is the word 'w<i>')."""
    names = {0: UNK}
    if cfg.bos_token_id is not None:
        names[int(cfg.bos_token_id)] = "<bos>"
    for k, e in enumerate(cfg.eos_token_ids):
        names[int(e)] = "<eos>" if k == 0 else f"<eos{k}>"
    return names


def synthetic_tokenizer(cfg):
    """A tokenizers.Tokenizer with cfg.vocab_size word-level tokens ('w<i>' -> i, whitespace-split; the preset's
    BOS/EOS ids are special tokens '<bos>' / '<eos>'), so a vLLM engine can load it and decode ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    names = _token_names(cfg)
    vocab = {names.get(i, f"w{i}"): i for i in range(int(cfg.vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for i, n in sorted(names.items()) if i])
    return tok


def synthetic_model_dir(preset: str, dtype: str, cache_dir: str | Path | None = None) -> Path:
    """The folder vLLM loads for 'synthetic:<preset>': config.json (the preset's HF config at `dtype`),
    tokenizer.json, tokenizer_config.json. Written once per (preset, dtype); rewritten when the config changed."""
    from engine.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"vllm: unknown synthetic preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[preset]
    out = Path(cache_dir or DEFAULT_CACHE).expanduser() / f"{preset}-{dtype}"
    hf = dict(cfg.to_hf(), torch_dtype=dtype)
    config_text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    if (out / "tokenizer.json").is_file() and (out / "config.json").is_file():
        if (out / "config.json").read_text() == config_text:
            return out
    out.mkdir(parents=True, exist_ok=True)
    names = _token_names(cfg)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "model_max_length":
               int(cfg.max_position_embeddings), "clean_up_tokenization_spaces": False}
    if cfg.bos_token_id is not None:
        tok_cfg["bos_token"] = names[int(cfg.bos_token_id)]
    if cfg.eos_token_ids:
        tok_cfg["eos_token"] = names[int(cfg.eos_token_ids[0])]
    synthetic_tokenizer(cfg).save(str(out / "tokenizer.json.tmp"))
    os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "config.json").write_text(config_text)  # last: its presence + content marks a complete folder
    return out


def sampling_kwargs(req: GenRequest) -> dict[str, Any]:
    """GenRequest -> vllm.SamplingParams keyword arguments."""
    s = req.sampling
    kw: dict[str, Any] = dict(n=1, max_tokens=req.max_new_tokens, temperature=float(s.temperature), top_p=float(s.top_p),
                              top_k=int(s.top_k) if s.top_k > 0 else -1,  # -1 = off in every vLLM release
                              min_p=0.0, repetition_penalty=1.0, ignore_eos=bool(req.ignore_eos), detokenize=True,
                              skip_special_tokens=True)
    if s.seed is not None:
        kw["seed"] = int(s.seed)
    if req.stop_ids:
        kw["stop_token_ids"] = [int(i) for i in req.stop_ids]
    return kw


def llm_kwargs(model: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec + opts -> vllm.LLM keyword arguments (for a synthetic model this writes its folder first)."""
    kw: dict[str, Any] = {}
    if model.synthetic:
        folder = str(synthetic_model_dir(model.synthetic, model.dtype, opts.get("cache_dir")))
        kw.update(model=folder, tokenizer=folder, load_format="dummy")
    elif not model.path:
        raise ValueError(f"vllm: {model.name!r} has no local folder")
    else:
        kw["model"] = str(model.path)
    kw.update(dtype=model.dtype, seed=int(opts.get("seed", 0)),
              gpu_memory_utilization=float(opts.get("gpu_memory_utilization", 0.9)),
              enforce_eager=bool(opts.get("enforce_eager", False)),
              tensor_parallel_size=int(opts.get("tensor_parallel_size", 1)),
              enable_prefix_caching=bool(opts.get("enable_prefix_caching", False)))
    for key in ("max_model_len", "max_num_seqs"):
        if opts.get(key) is not None:
            kw[key] = int(opts[key])
    kw.update(opts.get("extra") or {})
    return kw


class VLLMAdapter(LLMClassAdapter):
    name = "vllm"
    package = "vllm"
    install_hint = INSTALL_HINT
    llm_kwargs = staticmethod(llm_kwargs)

    def __init__(self) -> None:
        super().__init__()
        self._next_id = 0

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported (module docstring)
        super().load(model, opts)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if self.llm is None:
            raise RuntimeError("vllm: load() first")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        ids: list[str] = []
        results: dict[str, GenResult] = {}
        submit = now()
        for req in requests:
            rid = f"anvil-{self._next_id}"
            self._next_id += 1
            ids.append(rid)
            try:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(req.prompt_ids)),
                                   SamplingParams(**sampling_kwargs(req)))
            except Exception as exc:  # e.g. prompt longer than max_model_len: that request fails, the rest run
                results[rid] = GenResult([], None, submit, None, [], "error", len(req.prompt_ids),
                                         error=f"{type(exc).__name__}: {exc}")
        times: dict[str, list[float]] = {rid: [] for rid in ids}
        final: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            outs = engine.step()
            t = now()
            for out in outs:
                comp = out.outputs[0]
                n_new = len(comp.token_ids) - len(times[out.request_id])
                times[out.request_id] += [t] * n_new
                if out.finished:
                    final[out.request_id] = out
        for rid, req in zip(ids, requests, strict=True):
            if rid in results:
                continue
            out = final.get(rid)
            if out is None:
                results[rid] = GenResult([], None, submit, None, [], "error", len(req.prompt_ids),
                                         error="request did not finish")
                continue
            comp, tt = out.outputs[0], times[rid]
            finish = "length" if comp.finish_reason == "length" else "stop"
            results[rid] = GenResult(list(comp.token_ids), comp.text, submit, tt[0] if tt else None, tt, finish,
                                     len(req.prompt_ids))
        return [results[rid] for rid in ids]

    def close(self) -> None:
        self.llm = None  # vLLM frees its workers when the LLM object is collected
