"""Start tensor-parallel ranks and build each rank's engine.

- SPMD under torchrun: every rank runs the same program, `state.init()` from torchrun's environment, then
  `build_llm(...)`: each rank loads its own shard and runs the same requests through the same deterministic
  scheduler; all-gathered logits and one seed give every rank the same tokens, so the ranks stay in lockstep.
      torchrun --nproc-per-node 2 benchmarks/tp_bench.py ...
- `spawn(fn, world_size, args)`: the same from one Python process (tests, benchmarks): one fresh process per rank
  (multiprocessing spawn), the group initialised, fn(*args) run on every rank; returns every rank's result, or
  raises TPLaunchError naming each rank that failed or died (a rank that dies makes the others' collectives fail
  within the group's timeout; the launcher kills what is left after that plus a grace period).
- Driver mode (engine/distributed/driver.py): the caller's process is rank 0 and gets an LLM-like object; the
  other ranks are spawned workers that repeat its calls. The anvil adapter uses it for tensor_parallel_size > 1.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.distributed import state


class TPLaunchError(RuntimeError):
    """One or more ranks failed; `failures` maps rank -> its error (traceback text or how it died)."""

    def __init__(self, failures: dict[int, str], results: dict[int, Any]) -> None:
        self.failures, self.results = failures, results
        lines = [f"rank {r}: {msg.strip().splitlines()[-1] if msg.strip() else msg}" for r, msg in sorted(failures.items())]
        super().__init__(f"{len(failures)} of the tensor-parallel ranks failed:\n  " + "\n  ".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, device: str) -> dict[str, str]:
    """torchrun's variables for one rank on this host, with NVLink multicast off."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    if str(device).startswith("cuda"):
        state.multicast_off(env)
    return env


def _entry(rank, world, port, fn, args, q, device, timeout_s, threads) -> None:
    os.environ.update(rank_env(rank, world, port, device))
    state.multicast_off()
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        state.init(world, rank, master_port=port, timeout_s=timeout_s, device=device)
        out = fn(*args)
        q.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            state.destroy()
        except Exception:
            pass


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    device: str = "cpu",
    timeout_s: float = state.DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    grace_s: float = 15.0,
    deadline_s: float | None = None,
) -> list[Any]:
    """Run fn(*args) on `world_size` new processes (rank r on cuda:r when device is CUDA), each in the group.
    Returns [rank 0's result, rank 1's, ...] (results are pickled). fn must be importable (a module-level function).
    `threads`: torch intra-op threads per rank (CPU; default cores / world). `deadline_s`: kill every rank still
    running after this long (a bound for what no timeout sees, e.g. a CUDA-graph replay waiting on a dead peer)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, q, device, timeout_s, threads),
                         name=f"tp-rank{r}", daemon=False) for r in range(world_size)]  # fmt: skip
    for p in procs:
        p.start()
    done: dict[int, tuple[str, Any]] = {}
    first_done: float | None = None
    started = time.monotonic()
    try:
        while len(done) < world_size:
            try:
                r, status, payload = q.get(timeout=0.2)
                done[r] = (status, payload)
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in done and p.exitcode is not None:
                    try:  # its message may still be in the queue
                        while True:
                            r2, status, payload = q.get(timeout=0.5)
                            done[r2] = (status, payload)
                    except queue_mod.Empty:
                        pass
                    if r not in done:
                        code = p.exitcode
                        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                        done[r] = ("error", f"rank {r} died ({how}) without a result")
            if first_done is None and done:  # SPMD ranks finish together: one still running long after is hung
                first_done = time.monotonic()
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                for r, p in enumerate(procs):
                    if r not in done:
                        p.kill()
                        done[r] = ("error", f"rank {r} still running after the deadline of {deadline_s:g} s: killed")
            if first_done is not None and time.monotonic() - first_done > timeout_s + grace_s:
                for r, p in enumerate(procs):
                    if r not in done:
                        p.kill()
                        done[r] = ("error", f"rank {r} was still running {timeout_s + grace_s:g} s after rank "
                                            f"{min(done)} had finished: killed as hung")  # fmt: skip
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: msg for r, (s, msg) in done.items() if s != "ok"}
    results = {r: pickle.loads(b) for r, (s, b) in done.items() if s == "ok"}
    if failures:
        raise TPLaunchError(failures, results)
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------- one rank's engine
def rank_device(device: str) -> str:
    """This rank's device: cuda -> cuda:LOCAL_RANK under tensor parallelism; cpu stays cpu."""
    if str(device) == "cuda" and state.is_parallel():
        return f"cuda:{state.local_rank()}"
    return str(device)


def load_shard(model: str | Path, dtype: str = "float32", device: str = "cpu", *, synthetic: bool = False,
               seed: int = 0, n_layers: int | None = None):  # fmt: skip
    """This rank's LoadedModel (model = its shard; config = the full model's): a checkpoint folder or a name
    engine.hub resolves (each rank reads only its slices), or a synthetic preset (each rank makes its shard).
    n_layers: a synthetic preset with fewer layers (benchmarks)."""
    from engine.config import ModelConfig
    from engine.model.layers.parallel import TPShard
    from engine.model.llama import LoadedModel

    dev = rank_device(device)
    rank, world = state.rank(), state.world_size()
    if synthetic:
        from engine.presets import PRESETS
        from engine.presets import synthetic as make

        if str(model) not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; known: {', '.join(PRESETS)}")
        config = PRESETS[str(model)]
        if n_layers is not None:
            config = dataclasses.replace(config, n_layers=n_layers)
        return make(config, dtype, dev, seed=seed, tp=TPShard(rank, world, config) if world > 1 else None)
    import engine
    from engine.hub import resolve
    from engine.weights import load_model

    p = Path(model)
    if not (p / "config.json").is_file():
        p = resolve(str(model))
    config = ModelConfig.from_dir(p)
    tp = TPShard(rank, world, config) if world > 1 else None
    return LoadedModel(model=load_model(p, config, dtype, dev, tp), config=config, tokenizer=engine._tokenizer(p))


def build_llm(model: str | Path, dtype: str, device: str, config, *, synthetic: bool = False,
              n_layers: int | None = None):  # fmt: skip
    """This rank's engine.LLM over its shard (config.tensor_parallel_size must equal the group's size)."""
    from engine.llm import LLM

    if config.tensor_parallel_size != state.world_size():
        raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size}, but the process group has "
                         f"{state.world_size()} ranks")  # fmt: skip
    lm = load_shard(model, dtype, device, synthetic=synthetic, seed=config.seed, n_layers=n_layers)
    return LLM(lm, config)


def agree_kv_blocks(llm) -> None:
    """Every rank must schedule over the same number of KV blocks (SPMD). The CPU pool's size is the same on every
    rank; a GPU pool sized from free memory may differ: then every rank (together: the rebuild's warm-up and graph
    capture run collectives) rebuilds its core with the least count as num_kv_blocks."""
    from engine.core.engine_core import EngineCore

    mine = llm.core.blocks.num_blocks
    least, most = state.all_reduce_min(mine), -state.all_reduce_min(-mine)
    if least == most:
        return
    config = dataclasses.replace(llm.config, num_kv_blocks=least)
    llm.core = None
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm.core = EngineCore(llm.model, config)
    llm.config = config
