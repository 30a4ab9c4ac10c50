"""Tensor parallelism on the CPU (gloo): 2 and 4 processes vs the single-process model.

Per model and world size: the float32 logits of every position of three prompts equal the single-process ones
(|dlogit| < 1e-5), and a mixed-length batch (two greedy requests, one seeded top-p sample) gives identical tokens
for 64 new tokens, on every rank. Models: the trained tiny model (6 heads / 2 KV heads: world 2 -> 3 / 1 per rank)
and random llama / mistral / qwen2 configs whose sizes split unevenly (ffn rows, a vocabulary padded per rank) and
whose KV heads are replicated where n_kv_heads < world (MQA under world 2 and 4, GQA 8/2 under world 4). A rank
that is killed or hangs makes the other fail with a TPError within the group's timeout.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

import engine
from engine.config import EngineConfig
from engine.distributed import launch, state
from engine.distributed.launch import TPLaunchError, build_llm
from engine.model.layers.parallel import TPShard
from engine.request import SamplingParams
from engine.testing import LLAMA3_SCALING_SMALL, tiny_config, write_random_checkpoint

N_NEW = 64
PROMPTS = [[1, 17, 93, 250, 8, 44, 310, 5, 77, 120, 61, 19, 402, 33, 250, 7, 91, 64, 13, 29, 88, 230, 150, 3, 48,
            310, 72, 11, 200, 9, 55, 101, 17, 260, 40, 6],
           [1, 300, 12, 45, 99, 140, 7],
           [1, 64, 128, 256, 32, 16, 8, 4, 2, 222, 111, 55, 66, 77, 88, 99, 121]]  # fmt: skip
SAMPLING = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.8, top_p=0.9, seed=3)]  # fmt: skip

RANDOM = {  # uneven splits: ffn 102 -> 51/51, 26/26/25/25; vocab 509 -> 255+255(pad 1), 128x4 (pad 3)
    "llama": tiny_config("llama", n_heads=8, n_kv_heads=2, ffn_dim=102, vocab_size=509, rope_scaling=LLAMA3_SCALING_SMALL),
    "mistral": tiny_config("mistral", n_heads=4, n_kv_heads=1, ffn_dim=96, vocab_size=500, sliding_window=16),
    "qwen2": tiny_config("qwen2", n_heads=4, n_kv_heads=4, ffn_dim=80, vocab_size=510, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    out = {"tiny": str(engine.hub.resolve("tiny"))}
    for name, cfg in RANDOM.items():
        out[name] = str(write_random_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=7, std=0.05, norm_std=0.1))
    return out


def _run(cases: list[tuple[str, str]]) -> dict:
    """On every rank (or in this process when no group is set up): logits + 64 tokens of each model."""
    torch.manual_seed(0)
    out = {}
    for name, path in cases:
        cfg = EngineConfig(max_num_seqs=4, max_model_len=256, tensor_parallel_size=state.world_size())
        llm = build_llm(path, "float32", "cpu", cfg)
        logits = [llm.logits(p) for p in PROMPTS]
        toks = [c.tokens for c in llm.generate(PROMPTS, SAMPLING, max_tokens=N_NEW)]
        out[name] = {"logits": logits, "tokens": toks, "kv_heads": llm.core.runner.pool.k.shape[2],
                     "local_heads": llm.model.config.n_heads}  # fmt: skip
    return out


def _spawn(world: int, cases):
    return launch.spawn(_run, world, (cases,), timeout_s=60)


@pytest.fixture(scope="module")
def reference(models):
    return _run(list(models.items()))


@pytest.fixture(scope="module")
def world2(models):
    return _spawn(2, list(models.items()))


@pytest.fixture(scope="module")
def world4(models):
    return _spawn(4, [(k, v) for k, v in models.items() if k != "tiny"])  # tiny's 6 heads do not split 4 ways


def _check(ranks: list[dict], ref: dict, name: str, world: int) -> None:
    want = ref[name]
    for r, got in enumerate(ranks):
        g = got[name]
        for i, (a, b) in enumerate(zip(g["logits"], want["logits"], strict=True)):
            assert a.shape == b.shape
            d = (a - b).abs().max().item()
            # float32 partial sums over split heads / columns: 1.3e-5 seen on an AVX-512 CPU (|logits| ~ 20, 8 ulp)
            assert d < 5e-5, f"{name} world {world} rank {r} prompt {i}: max |dlogit| {d:.3g}"
        assert g["tokens"] == want["tokens"], f"{name} world {world} rank {r}: tokens differ"
        assert all(len(t) == N_NEW for t in g["tokens"])
    cfg = RANDOM.get(name) or engine.ModelConfig.from_dir(engine.hub.resolve("tiny"))
    shard = TPShard(0, world, cfg)
    assert ranks[0][name]["kv_heads"] == shard.kv_heads[1] - shard.kv_heads[0]  # the KV pool holds the rank's heads
    assert ranks[0][name]["local_heads"] == cfg.n_heads // world


@pytest.mark.parametrize("name", ["tiny", "llama", "mistral", "qwen2"])
def test_world2_equals_single_process(world2, reference, name):
    _check(world2, reference, name, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_world4_equals_single_process(world4, reference, name):
    _check(world4, reference, name, 4)


# ---------------------------------------------------------------- a rank that dies or hangs
def _die(path: str, mode: str):
    llm = build_llm(path, "float32", "cpu", EngineConfig(max_num_seqs=2, max_model_len=128, tensor_parallel_size=2))
    if state.rank() == 1:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # hang
    t = time.monotonic()
    try:
        llm.generate([[1, 2, 3]], max_tokens=N_NEW)
    except state.TPError as e:
        return "TPError", str(e), time.monotonic() - t
    return "finished", "", time.monotonic() - t


@pytest.mark.parametrize("mode,timeout", [("kill", 20.0), ("hang", 4.0)])
def test_a_dead_or_hung_rank_fails_the_other_within_the_timeout(models, mode, timeout):
    t = time.monotonic()
    with pytest.raises(TPLaunchError) as ei:
        launch.spawn(_die, 2, (models["qwen2"], mode), timeout_s=timeout, grace_s=2.0)
    wall = time.monotonic() - t
    err = ei.value
    assert set(err.failures) == {1}
    assert ("SIGKILL" if mode == "kill" else "killed as hung") in err.failures[1]
    kind, msg, waited = err.results[0]
    assert kind == "TPError", "rank 0 finished although rank 1 was gone"
    assert "rank 0 of 2" in msg and "another rank died, hangs or diverged" in msg
    assert waited < timeout + 5, f"rank 0 waited {waited:.1f} s (timeout {timeout} s)"
    assert wall < 60 + timeout, wall


# ---------------------------------------------------------------- the driver (adapter) path
def _serve_like(llm) -> list[int]:
    """Requests added and aborted between steps, one through the core as engine/async_llm.py adds them."""
    from engine.request import Request

    toks: dict[str, list[int]] = {}

    def step():
        for o in llm.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)

    first = llm.add_request(PROMPTS[1], max_tokens=20)
    step()
    req = Request(list(PROMPTS[2]), max_tokens=9)
    llm.core.add_request(req)
    step()
    step()
    llm.abort(first)
    while llm.has_unfinished():
        step()
    return toks[req.request_id]


def test_adapter_tensor_parallel_2_matches_1(models):
    from adapters.anvil import AnvilAdapter
    from adapters.base import GenRequest, ModelSpec

    spec = ModelSpec(name="tiny", path=models["tiny"])
    reqs = [GenRequest(prompt_ids=PROMPTS[1], max_new_tokens=12), GenRequest(prompt_ids=PROMPTS[2], max_new_tokens=7)]
    got = {}
    for tp in (1, 2):
        a = AnvilAdapter()
        a.load(spec, {"tensor_parallel_size": tp, "max_model_len": 128, "max_num_seqs": 4})
        try:
            gen = [r.output_ids for r in a.generate(reqs)]
            served = _serve_like(a.llm)
            again = [r.output_ids for r in a.generate(reqs)]  # still in lockstep after the abort
            got[tp] = (gen, a.logits(PROMPTS[0]), a.llm.info(), served, again)
            if tp == 2:
                procs = a.llm.procs
        finally:
            a.close()
    assert got[1][0] == got[2][0] and [len(t) for t in got[2][0]] == [12, 7]
    assert (got[1][1] - got[2][1]).abs().max().item() < 5e-5  # as _check: float32 rounding of split matmuls
    assert got[2][2]["tensor_parallel_size"] == 2
    assert got[1][3] == got[2][3] and len(got[2][3]) == 9
    assert got[2][4] == got[2][0]
    assert all(p.exitcode == 0 for p in procs)  # close() stopped the other rank


def test_async_llm_over_the_tp_driver(models):
    """The server's AsyncLLM drives a TP=2 driver (core.add_request / step from its engine thread): same streams."""
    import asyncio

    from engine.async_llm import AsyncLLM
    from engine.distributed import driver
    from engine.llm import LLM

    async def run(llm):
        a = AsyncLLM(llm)
        a.start()
        try:
            streams = [a.submit(PROMPTS[1], SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True),
                       a.submit(PROMPTS[2], SamplingParams(temperature=0.7, seed=5), max_tokens=9, ignore_eos=True)]

            async def collect(s):
                return [t async for o in s for t in o.token_ids]

            return await asyncio.gather(*map(collect, streams))
        finally:
            a.shutdown()

    cfg = dict(max_model_len=128, max_num_seqs=4)
    one = asyncio.run(run(LLM(launch.load_shard(models["tiny"]), EngineConfig(**cfg))))
    tp = driver.start(models["tiny"], "float32", "cpu", EngineConfig(tensor_parallel_size=2, **cfg))
    try:
        two = asyncio.run(run(tp))
    finally:
        tp.shutdown()
    assert one == two and [len(t) for t in two] == [12, 9]


def test_driver_reports_a_dead_worker(models):
    from engine.distributed import driver

    llm = driver.start(models["qwen2"], "float32", "cpu", EngineConfig(max_model_len=128, tensor_parallel_size=2),
                       timeout_s=10)  # fmt: skip
    try:
        assert llm.generate([[1, 2, 3]], max_tokens=4)[0].tokens
        os.kill(llm.procs[0].pid, signal.SIGKILL)
        llm.procs[0].join(10)
        t = time.monotonic()
        with pytest.raises(state.TPError, match=r"rank 1: exited with code -9"):
            llm.generate([[1, 2, 3]], max_tokens=8)
        assert time.monotonic() - t < 15
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- torchrun
TORCHRUN_SCRIPT = """
import torch
from engine import EngineConfig, SamplingParams
from engine.distributed import launch, state

torch.set_num_threads(1)
state.init()  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from torchrun
llm = launch.build_llm({path!r}, "float32", "cpu", EngineConfig(max_model_len=128, tensor_parallel_size=state.world_size()))
(out,) = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0), max_tokens=12)
print(f"rank {{state.rank()}}/{{state.world_size()}} tokens {{out.tokens}}", flush=True)
state.destroy()
"""


def test_torchrun_spmd(models, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "spmd.py"
    script.write_text(TORCHRUN_SCRIPT.format(path=models["qwen2"]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(launch.free_port()), str(script)], capture_output=True, text=True, timeout=180, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = EngineConfig(max_model_len=128)
    from engine.llm import LLM

    (want,) = LLM(launch.load_shard(models["qwen2"]), cfg).generate([[1, 2, 3]], SamplingParams(temperature=0.0),
                                                                    max_tokens=12)  # fmt: skip
    import re

    # the ranks print concurrently: their lines may run together, so find each report in the whole output
    lines = sorted(re.findall(r"rank \d/2 tokens \[[0-9, ]*\]", p.stdout))
    assert lines == [f"rank {r}/2 tokens {want.tokens}" for r in range(2)]


# ---------------------------------------------------------------- sharding rule (no processes)
def test_kv_heads_are_replicated_when_fewer_than_ranks():
    cfg = tiny_config("llama", n_heads=8, n_kv_heads=2)
    shards = [TPShard(r, 4, cfg) for r in range(4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(s.kv_replicas == 2 for s in shards)
    for s in shards:  # each rank's query heads read exactly its KV head (GQA: head h reads KV head h // n_rep)
        assert {h // cfg.n_rep for h in range(*s.heads)} == {s.kv_heads[0]}
        local = s.local_config()
        assert (local.n_heads, local.n_kv_heads, local.head_dim, local.dim) == (2, 1, cfg.head_dim, cfg.dim)
    assert [TPShard(r, 2, cfg).kv_heads for r in range(2)] == [(0, 1), (1, 2)]


def test_uneven_sizes_and_refused_splits():
    cfg = tiny_config("llama", ffn_dim=102, vocab_size=509)
    assert [TPShard(r, 4, cfg).ffn for r in range(4)] == [(0, 26), (26, 52), (52, 77), (77, 102)]
    assert [TPShard(r, 4, cfg).vocab for r in range(4)] == [(0, 128), (128, 256), (256, 384), (384, 509)]
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible"):
        TPShard(0, 3, cfg)
    with pytest.raises(ValueError, match="num_key_value_heads 3"):
        TPShard(0, 2, tiny_config("llama", n_heads=6, n_kv_heads=3, dim=96))


def test_each_rank_reads_its_slices_and_they_reassemble(tmp_path):
    from engine.weights import load_state_dict

    cfg = RANDOM["llama"]
    path = write_random_checkpoint(tmp_path, cfg, shards=2)
    full = load_state_dict(path, cfg)
    parts = [load_state_dict(path, cfg, tp=TPShard(r, 2, cfg)) for r in range(2)]
    q, kv = cfg.q_size // 2, cfg.kv_size // 2  # per rank: 4 of 8 query heads, 1 of 2 KV heads
    for name in ("layers.1.attention.wo.weight", "layers.0.feed_forward.w2.weight"):
        assert torch.equal(torch.cat([p[name] for p in parts], dim=1), full[name])
    f = cfg.ffn_dim // 2
    for r, p in enumerate(parts):
        wqkv, fq = p["layers.0.attention.wqkv.weight"], full["layers.0.attention.wqkv.weight"]
        assert torch.equal(wqkv[:q], fq[r * q : (r + 1) * q])
        assert torch.equal(wqkv[q : q + kv], fq[cfg.q_size + r * kv : cfg.q_size + (r + 1) * kv])
        w13, f13 = p["layers.0.feed_forward.w13.weight"], full["layers.0.feed_forward.w13.weight"]
        assert torch.equal(w13, torch.cat([f13[r * f : (r + 1) * f], f13[cfg.ffn_dim + r * f : cfg.ffn_dim + (r + 1) * f]]))
        assert torch.equal(p["norm.weight"], full["norm.weight"])  # replicated
    emb = torch.cat([p["tok_embeddings.weight"] for p in parts])
    assert emb.shape[0] == 510 and torch.equal(emb[:509], full["tok_embeddings.weight"]) and not emb[509:].any()


def test_synthetic_shards_and_config():
    from engine.presets import PRESETS, synthetic

    cfg = PRESETS["tiny-test"]
    lm = synthetic("tiny-test", tp=TPShard(1, 2, cfg))
    assert lm.config == cfg and lm.model.config.n_heads == cfg.n_heads // 2
    assert lm.model.layers[0].attention.wqkv.weight.shape[0] == (cfg.n_heads // 2 + 2 * 1) * cfg.head_dim
    p70 = PRESETS["llama-3-70b"]
    assert (p70.dim, p70.n_layers, p70.n_heads, p70.n_kv_heads, p70.ffn_dim) == (8192, 80, 64, 8, 28672)
    assert 70.0e9 < p70.num_params < 71.0e9
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    assert EngineConfig.from_options({"tensor_parallel_size": 2}).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="not sharded"):
        engine.LLM(engine.presets.synthetic("tiny-test"), EngineConfig(tensor_parallel_size=2))
