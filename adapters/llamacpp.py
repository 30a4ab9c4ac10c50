"""llama.cpp adapter: llama-cpp-python in process, on a GGUF our exporter makes from the model folder (cached).

Conventions (what a row in a comparison table means for this engine):
- One llama.cpp context, one sequence: a generate() batch runs its requests one after another. Every request's
  submit_time is the start of the generate() call, so TTFT includes the wait behind earlier requests, as it would for
  a server with a single slot.
- The KV cache is reset before every request (llama-cpp-python would otherwise reuse a matching prompt prefix).
- Token ids in, token ids out (no text round trip); greedy = temperature 0 (llama.cpp's greedy sampler); sampling
  uses top_k / top_p / temperature with min_p and penalties off, seeded per request.
- A token's time is taken when llama-cpp-python's generate loop hands it to us: the logits were read back and
  sampled on the host, which synchronises the device.
- logits(): needs llama.cpp's logits_all, which also computes the LM head for every prompt token during prefill;
  the instance that serves generate() is therefore created without it (unless opts logits_all=True) and logits()
  uses a second instance on the same GGUF, made on first use.

synthetic:<preset> models get a GGUF of the preset's shapes with random weights (engine.gguf_export.export_random,
cached like exports; an 8B f16 file is 16 GB): for speed runs only.

Options (opts): gguf (path to use instead of exporting), outtype (f32 | f16 | bf16; default from the spec's dtype),
seed (synthetic weights; 0), gguf_cache (folder), n_ctx (default min(context length, 4096)), n_threads (default: CPUs available to this process),
n_batch (512), n_gpu_layers (default -1 on cuda, 0 on cpu), kv_type (f32 | f16; default f32 when outtype is f32, else
llama.cpp's f16), flash_attn (False), logits_all (False), verbose (False).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapters.base import Adapter, EngineNotAvailable, GenRequest, GenResult, ModelSpec, now, package_version

INSTALL_HINT = ('pip install llama-cpp-python gguf  (CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python; '
                'portable CPU build: CMAKE_ARGS="-DGGML_NATIVE=OFF")')
_OUTTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids (GGML_TYPE_F32, GGML_TYPE_F16)


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCppAdapter(Adapter):
    name = "llamacpp"
    install_hint = INSTALL_HINT

    def __init__(self) -> None:
        self.llm = None
        self._parity_llm = None
        self._kwargs: dict[str, Any] = {}
        self.gguf_path: Path | None = None
        self.outtype = ""
        self.has_tokenizer = False
        self.eos_ids: set[int] = set()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, ver = package_version("llama_cpp")
        if not ok:
            return False, f"not installed: {INSTALL_HINT} [{ver}]"
        ok_gguf, gver = package_version("gguf")
        if not ok_gguf:
            return False, f"gguf not installed (needed to export models): pip install gguf [{gver}]"
        try:
            import llama_cpp

            gpu = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception:  # an old build without the symbol: report the version alone
            gpu = False
        return True, f"llama-cpp-python {ver} ({'gpu offload' if gpu else 'cpu only'})"

    def version(self) -> str:
        ok, why = self.available()
        return why if ok else "unavailable"

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        ok, why = self.available()
        if not ok:
            raise EngineNotAvailable(why)
        import llama_cpp

        from engine import gguf_export

        opts = dict(opts or {})
        outtype = opts.get("outtype") or _OUTTYPE.get(model.dtype)
        if outtype is None:
            raise ValueError(f"llamacpp: dtype {model.dtype!r} has no GGUF type (float32 | float16 | bfloat16)")
        self.outtype = outtype  # with opts gguf, the precision the caller says that file has
        folder = Path(model.path) if model.path else None
        cfg: dict[str, Any] = {}
        if opts.get("gguf"):
            self.gguf_path = Path(opts["gguf"])
        elif model.synthetic:  # the preset's shapes, random weights: speed runs only
            from engine.presets import PRESETS

            if model.synthetic not in PRESETS:
                raise ValueError(f"llamacpp: unknown preset {model.synthetic!r}; known: {', '.join(PRESETS)}")
            cfg = PRESETS[model.synthetic].to_hf()
            self.gguf_path = gguf_export.cached_export_random(model.synthetic, cfg, outtype, opts.get("gguf_cache"),
                                                              seed=int(opts.get("seed", 0)))
        elif folder is not None:
            self.gguf_path = gguf_export.cached_export(folder, outtype, opts.get("gguf_cache"))
        else:
            raise ValueError(f"llamacpp: {model.name!r} has no checkpoint folder to export; pass opts gguf=PATH")
        if folder and (folder / "config.json").is_file():
            cfg = json.loads((folder / "config.json").read_text())
        self.has_tokenizer = bool(folder and (folder / "tokenizer.model").is_file() and not model.synthetic)
        ctx_len = min(int(cfg.get("max_position_embeddings", 4096)), 4096)
        eos = cfg.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        if model.device.startswith("cuda"):
            if not llama_cpp.llama_supports_gpu_offload():
                raise EngineNotAvailable('llama-cpp-python is built without GPU offload: '
                                         'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall llama-cpp-python')
            n_gpu_layers = -1
        else:
            n_gpu_layers = 0
        threads = int(opts.get("n_threads") or cpu_threads())
        # llama.cpp's KV cache defaults to f16; an f32 model gets an f32 cache so parity runs are float32 end to end
        kv_type = opts.get("kv_type") or ("f32" if outtype == "f32" else "f16")
        if kv_type not in _KV_TYPES:
            raise ValueError(f"llamacpp: opts kv_type={kv_type!r}; expected one of {sorted(_KV_TYPES)}")
        self._kwargs = dict(model_path=str(self.gguf_path), n_ctx=int(opts.get("n_ctx", ctx_len)),
                            n_batch=int(opts.get("n_batch", 512)), n_threads=threads, n_threads_batch=threads,
                            n_gpu_layers=int(opts.get("n_gpu_layers", n_gpu_layers)),
                            type_k=_KV_TYPES[kv_type], type_v=_KV_TYPES[kv_type],
                            flash_attn=bool(opts.get("flash_attn", False)), verbose=bool(opts.get("verbose", False)))
        self.llm = llama_cpp.Llama(logits_all=bool(opts.get("logits_all", False)), **self._kwargs)
        self.eos_ids.add(int(self.llm.token_eos()))

    def info(self) -> dict[str, Any]:
        kw = {k: v for k, v in self._kwargs.items() if k not in ("model_path", "verbose")}
        return {"gguf": str(self.gguf_path), "outtype": self.outtype, **kw}

    def _require(self):
        if self.llm is None:
            raise RuntimeError("llamacpp: load() first")
        return self.llm

    # -- generation ------------------------------------------------------------------------------------------------
    def _stops(self, req: GenRequest) -> set[int]:
        return set(req.stop_ids) | (set() if req.ignore_eos else self.eos_ids)

    def stream(self, request: GenRequest) -> Iterator[tuple[int, float]]:
        """Yield (id, time) as llama-cpp-python's generator samples each token; stops after a stop id or max tokens."""
        llm = self._require()
        if len(request.prompt_ids) + request.max_new_tokens > llm.n_ctx():
            raise ValueError(f"prompt {len(request.prompt_ids)} + max_new_tokens {request.max_new_tokens} tokens "
                             f"exceed n_ctx {llm.n_ctx()} (opts n_ctx)")
        if request.max_new_tokens <= 0:
            return
        stops, s = self._stops(request), request.sampling
        if s.seed is not None:
            llm.set_seed(int(s.seed))
        llm.reset()  # no prefix reuse between requests: every request pays its own prefill
        gen = llm.generate(request.prompt_ids, temp=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                           min_p=0.0, typical_p=1.0, repeat_penalty=1.0, reset=True)
        n = 0
        try:
            for tok in gen:
                t = now()
                n += 1
                yield int(tok), t
                if int(tok) in stops or n >= request.max_new_tokens:
                    break
        finally:
            gen.close()

    def _run(self, req: GenRequest, submit: float) -> GenResult:
        out: list[int] = []
        times: list[float] = []
        try:
            for tok, t in self.stream(req):
                out.append(tok)
                times.append(t)
        except Exception as exc:  # one failed request must not end the batch
            return GenResult(out, None, submit, times[0] if times else None, times, "error", len(req.prompt_ids),
                             error=f"{type(exc).__name__}: {exc}")
        finish = "stop" if out and out[-1] in self._stops(req) else "length"
        text = self.llm.detokenize(out).decode("utf-8", errors="replace") if self.has_tokenizer else None
        return GenResult(out, text, submit, times[0] if times else None, times, finish, len(req.prompt_ids))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        self._require()
        submit = now()
        return [self._run(r, submit) for r in requests]

    def logits(self, prompt_ids: list[int]):
        import numpy as np
        import torch

        llm = self._require()
        if not getattr(llm, "_logits_all", False):  # llama-cpp-python has no public accessor
            if self._parity_llm is None:
                import llama_cpp

                self._parity_llm = llama_cpp.Llama(logits_all=True, **self._kwargs)
            llm = self._parity_llm
        if len(prompt_ids) > llm.n_ctx():
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds n_ctx {llm.n_ctx()}")
        llm.reset()
        llm.eval(prompt_ids)
        return torch.from_numpy(np.array(llm.scores[: len(prompt_ids)], dtype=np.float32, copy=True))

    def close(self) -> None:
        for llm in (self._parity_llm, self.llm):
            if llm is not None:
                try:
                    llm.close()
                except Exception:  # closing must not raise during teardown
                    pass
        self.llm = self._parity_llm = None
