"""llama.cpp vs HF transformers parity on the embedded tiny model, written to a committed JSON result.

The model goes through Anvil's own GGUF export (engine/gguf_export.py, F32) into llama-cpp-python (via
adapters/llamacpp.py, as tests/adapters/test_llamacpp.py does: f32 KV cache, CPU, explicit threads) and is compared
with HF transformers in float32 on the same prompt: greedy tokens for --n-new steps, then the logits at every
position of prompt + generated tokens (max |logit difference|). Anvil's reference generator's greedy tokens are
recorded beside them.

    python scripts/llamacpp_parity.py                      # -> results/cpu/llamacpp-parity-tiny.json
    python scripts/llamacpp_parity.py --model models/tiny --n-new 40 --threads 2 --out PATH

Needs llama-cpp-python (CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python>=0.3"), gguf, transformers.
Set ANVIL_COMMIT to name the commit when running from a copy without .git (recorded in env.commit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT_TEXT = "def split(text, width=70):\n    return"  # the prompt of tests/adapters/test_llamacpp.py


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hf(model_dir: Path, prompt: list[int], n_new: int):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()

    def logits(ids: list[int]):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()

    return tokens, logits, model.config._attn_implementation


def _anvil(model_dir: Path, prompt: list[int], n_new: int) -> dict:
    """Anvil's reference Generator, greedy, float32 on the CPU (recorded; an import error is recorded instead)."""
    try:
        import engine
        from engine.generator import Generator, SamplingParams

        gen = Generator(engine.load(model_dir, dtype="float32"), 1, len(prompt) + n_new + 1)
        (out,) = gen.generate([prompt], n_new, SamplingParams())
        return {"tokens": list(out.tokens)}
    except Exception as exc:  # the engine core may be mid-change; the llama.cpp/HF figures do not depend on it
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "tiny")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "cpu" / "llamacpp-parity-tiny.json")
    ap.add_argument("--n-new", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp
    import sentencepiece as spm
    import torch

    from adapters.base import GenRequest, ModelSpec
    from adapters.llamacpp import LlamaCppAdapter
    from harness import envinfo

    torch.set_num_threads(args.threads)
    model_dir = args.model.resolve()
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    prompt = [1] + sp.encode(PROMPT_TEXT)

    with tempfile.TemporaryDirectory(prefix="anvil-gguf-") as cache:
        ad = LlamaCppAdapter()
        ad.load(ModelSpec(model_dir.name, str(model_dir)), {"gguf_cache": cache, "n_threads": args.threads,
                                                            "n_ctx": 256})
        try:
            (res,) = ad.generate([GenRequest(prompt, args.n_new)])
            if res.error is not None:
                raise SystemExit(f"llama.cpp generate failed: {res.error}")
            full = prompt + res.output_ids[:-1]
            ours = ad.logits(full)
            info = ad.info()
        finally:
            ad.close()

    hf_tokens, hf_logits, attn = _hf(model_dir, prompt, args.n_new)
    ref = hf_logits(full)
    diff = (ours - ref).abs()
    anvil = _anvil(model_dir, prompt, args.n_new)
    result = {
        "what": "llama.cpp (Anvil's F32 GGUF export, llama-cpp-python, f32 KV cache, CPU) vs HF transformers float32 "
                f"on {model_dir.name}: greedy tokens and the logits at every position of prompt + generated tokens",
        "command": " ".join(["python scripts/llamacpp_parity.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
        "prompt_text": PROMPT_TEXT,
        "prompt_ids": prompt,
        "n_new": args.n_new,
        "llamacpp": {"tokens": res.output_ids, "outtype": info["outtype"], "kv_type": "f32",
                     "n_threads": info["n_threads"], "n_gpu_layers": info["n_gpu_layers"], "n_ctx": info["n_ctx"]},
        "hf": {"tokens": hf_tokens, "dtype": "float32", "attn_implementation": attn},
        "anvil": anvil,
        "greedy_llamacpp_equals_hf": res.output_ids == hf_tokens,
        "greedy_anvil_equals_hf": anvil.get("tokens") == hf_tokens if "tokens" in anvil else None,
        "positions": len(full),
        "vocab_size": int(ref.shape[1]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(ref.abs().max()),
        "argmax_equal_positions": int((ours.argmax(-1) == ref.argmax(-1)).sum()),
        "env": {**{k: v for k, v in envinfo.snapshot().items() if k in (
                    "python", "platform", "cpu", "cpu_count", "torch", "transformers", "commit", "dirty",
                    "commit_source")},
                "llama_cpp": getattr(llama_cpp, "__version__", _version("llama-cpp-python")),
                "llama_cpp_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                "gguf": _version("gguf"), "sentencepiece": _version("sentencepiece"),
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: greedy llama.cpp == HF: {result['greedy_llamacpp_equals_hf']}, anvil == HF: "
          f"{result['greedy_anvil_equals_hf']}, max |logit diff| = {result['max_abs_logit_diff']:.3g} "
          f"(max |logit| {result['max_abs_logit']:.3g}, {result['positions']} positions)")
    return 0 if result["greedy_llamacpp_equals_hf"] else 1


if __name__ == "__main__":
    sys.exit(main())
