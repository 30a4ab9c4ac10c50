"""HF transformers adapter: AutoModelForCausalLM from the local model folder (never downloaded), timed per token.

Per-token times come from a generate() streamer: transformers hands each step's tokens to streamer.put() after
copying them to the host (a device sync), and the adapter stamps perf_counter() there. EOS handling: with
ignore_eos the generation config has no EOS at all (so logits are never masked and exactly max_new_tokens come
out); otherwise EOS and the request's stop ids stop a sequence, which then ends with that id.
Synthetic models ('synthetic:<preset>') are built from the preset's HF config with transformers' own random
initialisation, directly on the device: for speed runs only, their weights differ from anvil's.
"""

from __future__ import annotations

from typing import Any

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec, now, package_version


class _TimingStreamer:
    """transformers BaseStreamer protocol: put() is called first with the prompt, then once per generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now())  # value is already on the host: the device work of this step is done

    def end(self) -> None:
        pass


class HFAdapter(Adapter):
    name = "hf"
    install_hint = 'pip install -e ".[hf]" (transformers)'

    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.device = "cpu"
        self.eos_ids: set[int] = set()
        self.spec: ModelSpec | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, version = package_version("transformers")
        if not ok:
            return False, f"{version}: {cls.install_hint}"
        return True, f"transformers {version}"

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the harness draws its own progress
        opts = dict(opts or {})
        dtype = getattr(torch, model.dtype)
        attn = opts.pop("attn_implementation", "sdpa")
        if model.synthetic:
            from engine.presets import PRESETS

            hf = dict(PRESETS[model.synthetic].to_hf())
            hf.pop("torch_dtype", None)
            cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
            torch.manual_seed(opts.pop("seed", 0))
            with torch.device(model.device):
                self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model.path, dtype=dtype, local_files_only=True, attn_implementation=attn
            ).to(model.device)
            self.tokenizer = self._tokenizer(model.path)
        if opts:
            raise ValueError(f"unknown hf options: {', '.join(sorted(opts))} (known: attn_implementation, seed)")
        self.model.eval()
        self.device = model.device
        self.spec = model
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @staticmethod
    def _tokenizer(path: str | None):
        if not path:
            return None
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # a folder without tokenizer files: ids only
            return None

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def info(self) -> dict[str, Any]:
        return {"attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        import torch
        from transformers import GenerationConfig

        if self.model is None:
            raise RuntimeError("hf adapter: load() first")
        s = requests[0].sampling
        max_new = max(r.max_new_tokens for r in requests)
        stop = set(requests[0].stop_ids) | (set() if requests[0].ignore_eos else self.eos_ids)
        lens = [len(r.prompt_ids) for r in requests]
        width = max(lens)
        pad = 0
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every prompt ends at the last column
            ids[i, width - lens[i]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - lens[i]:] = 1
        kw: dict[str, Any] = {"max_new_tokens": max_new, "min_new_tokens": 0, "pad_token_id": pad,
                              "eos_token_id": sorted(stop) or None, "num_beams": 1}
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
            if s.seed is not None:
                torch.manual_seed(s.seed)
        else:
            kw.update(do_sample=False)
        gen_cfg = GenerationConfig(**kw)
        streamer = _TimingStreamer()
        ids, mask = ids.to(self.device), mask.to(self.device)
        self._sync()
        submit = now()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                      streamer=streamer)
        self._sync()
        gen = out[:, width:].tolist()
        results = []
        for i, r in enumerate(requests):
            toks = gen[i][: r.max_new_tokens]
            reason = "length"
            for j, t in enumerate(toks):
                if t in stop:
                    toks, reason = toks[: j + 1], "stop"
                    break
            times = streamer.times[: len(toks)]
            text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
            results.append(GenResult(output_ids=toks, text=text, submit_time=submit,
                                     first_token_time=times[0] if times else None, token_times=times,
                                     finish_reason=reason, prompt_tokens=lens[i]))
        return results

    def logits(self, prompt_ids: list[int]):
        import torch

        with torch.inference_mode():
            x = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            return self.model(input_ids=x).logits[0].float().cpu()

    def _decoder_layers(self):
        """The model's decoder layer modules, in order (model.model.layers for the Llama family)."""
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise NotImplementedError(f"layers not supported by hf for {type(self.model).__name__}")
        return list(layers)

    def hidden_states(self, prompt_ids: list[int]):
        """Each decoder layer's output (after its residual add) at every position, captured by forward hooks: HF's
        output_hidden_states would give the embeddings first and the *final-normed* last layer instead."""
        import torch

        captured: list = []

        def keep(_module, _inputs, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(out[0].detach().float().cpu())  # [T, hidden] of batch row 0

        handles = [layer.register_forward_hook(keep) for layer in self._decoder_layers()]
        try:
            with torch.inference_mode():
                x = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
                self.model(input_ids=x, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return [h.clone() for h in captured]  # outside inference mode: ordinary tensors the caller may change

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
