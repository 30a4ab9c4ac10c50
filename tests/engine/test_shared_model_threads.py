"""Two engines over one model object, stepping in two threads at once (a server's engine thread beside a reference
LLM in the same process, as tests/server does): each gets the tokens it gets alone. The eager forward re-attaches its
own KV pool to the shared model's layers; without the model's lock one thread's forward ran over the other's pool."""

from __future__ import annotations

import threading

import torch

from engine import LLM, EngineConfig
from engine.presets import synthetic


def test_two_engines_over_one_model_in_two_threads_keep_their_own_kv():
    lm = synthetic("tiny-test", seed=5)
    cfg = EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (23, 9, 41, 17)]
    solo = LLM(lm, cfg)
    want = [solo.generate([p], max_tokens=24)[0].tokens for p in prompts]
    engines = [LLM(lm, cfg), LLM(lm, cfg)]
    got: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            got[i] = [[o.tokens for o in engines[i].generate([p], max_tokens=24)][0] for _ in range(3) for p in prompts]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i in range(2):
        assert got[i] == want * 3, i
