"""The Triton attention backend's dispatch (fresh prompts -> SDPA, chunks over a cached prefix and sliding windows ->
the paged Triton kernel, decode -> split-KV, all in one step) runs on the CPU
under the Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before the kernels are defined), and
gives the reference loop's greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the Triton interpreter needs the triton package")

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine import LLM, EngineConfig
    from engine.generator import Generator
    from engine.presets import synthetic

    torch.manual_seed(0)
    for preset in ("tiny-test", "tiny-test-mistral"):
        lm = synthetic(preset, seed=3)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (45, 5, 17)]
        ref = [Generator(lm, 1, 96).generate([p], 6)[0].tokens for p in prompts]
        llm = LLM(lm, EngineConfig(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=40, prefill_chunk=20,
                                   attention_backend="triton"))
        assert llm.info()["attention_backend"] == "triton"
        got = [o.tokens for o in llm.generate(prompts, max_tokens=6)]
        assert got == ref, (preset, got, ref)
    print("OK")
    """
)


def test_triton_backend_dispatch_equals_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
