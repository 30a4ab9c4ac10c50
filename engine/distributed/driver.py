"""Driver mode: the caller's process is rank 0 of the tensor-parallel group, the other ranks are spawned workers.

`start(model, dtype, device, config)` spawns ranks 1..W-1 (each loads its own shard), joins the group as rank 0
and returns a TPLLM: the engine.LLM API (add_request / abort / step / has_unfinished / generate / logits /
hidden_states / info). Every call that changes the engine's state is sent to the workers over a pipe, and they
repeat it on their LLM (SPMD: the same scheduler on every rank, fed the same calls in the same order, with request
ids fixed by rank 0), so every rank runs the same forwards and meets in the same collectives; rank 0 returns the
results. add_request / abort are sent with the next step (one message per step per worker); generate / logits /
hidden_states are sent whole. `core` is rank 0's EngineCore with add_request / abort mirrored too, for callers that
drive the core directly (engine/async_llm.py, which the server runs). Commands go over pipes, not collectives, so an idle driver never hits the group's
timeout; a worker that dies makes rank 0's next collective fail (TPError) and rank 0 reports the worker's error.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import traceback

from engine.distributed import state
from engine.distributed.launch import build_llm, free_port, rank_env


def _worker(rank: int, world: int, port: int, conn, spec: dict) -> None:
    os.environ.update(rank_env(rank, world, port, spec["device"]))
    state.multicast_off()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        state.init(world, rank, master_port=port, timeout_s=spec["timeout_s"], device=spec["device"])
        llm = build_llm(spec["model"], spec["dtype"], spec["device"], spec["config"], synthetic=spec["synthetic"])
        conn.send(("ready", rank))
        while True:
            try:
                calls = conn.recv()
            except EOFError:  # the driver is gone
                break
            if calls is None:
                break
            for name, args, kw in calls:
                obj = llm
                for part in name.split(".")[:-1]:  # "core.add_request"
                    obj = getattr(obj, part)
                getattr(obj, name.rsplit(".", 1)[-1])(*args, **kw)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)  # at once: the driver's pending collective fails instead of waiting for this rank
    try:
        state.destroy()
    except Exception:
        pass


class TPLLM:
    """Rank 0's engine.LLM, mirrored on the workers. `lm` is rank 0's LoadedModel (its shard; the full config)."""

    def __init__(self, llm, procs, conns) -> None:
        self.llm, self.lm, self.procs, self.conns = llm, llm.lm, procs, conns
        self.config = llm.config
        self._pending: list[tuple[str, tuple, dict]] = []
        self._ids = 0

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def model(self):
        return self.llm.model

    @property
    def core(self) -> _MirroredCore:
        return _MirroredCore(self)

    # ---- state-changing calls: run here, then on every worker
    def _send(self, calls: list) -> None:
        for c in self.conns:
            try:
                c.send(calls)
            except (BrokenPipeError, OSError) as e:
                raise state.TPError(f"tensor-parallel worker gone: {self._worker_errors() or e}") from e

    def _run(self, name: str, *args, **kw):
        self._send(self._pending + [(name, args, kw)])
        self._pending = []
        try:
            return getattr(self.llm, name)(*args, **kw)
        except state.TPError as e:
            why = self._worker_errors()
            raise state.TPError(f"{e}\nworker report: {why}" if why else str(e)) from e

    def add_request(self, prompt_ids, sampling=None, max_tokens=16, stop_ids=(), ignore_eos=True, request_id=None):
        if request_id is None:
            self._ids += 1
            request_id = f"tp-{self._ids}"
        kw = dict(sampling=sampling, max_tokens=max_tokens, stop_ids=tuple(stop_ids), ignore_eos=ignore_eos,
                  request_id=request_id)  # fmt: skip
        rid = self.llm.add_request(list(prompt_ids), **kw)  # raises here (nothing sent) for a refused request
        self._pending.append(("add_request", (list(prompt_ids),), kw))
        return rid

    def abort(self, request_id: str):
        out = self.llm.abort(request_id)
        self._pending.append(("abort", (request_id,), {}))
        return out

    def step(self):
        return self._run("step")

    def has_unfinished(self) -> bool:
        return self.llm.has_unfinished()

    def generate(self, prompts, sampling=None, max_tokens=16, stop_ids=(), on_output=None):
        self._send(self._pending + [("generate", (prompts, sampling, max_tokens, stop_ids), {})])
        self._pending = []
        try:
            return self.llm.generate(prompts, sampling, max_tokens, stop_ids, on_output)
        except state.TPError as e:
            raise state.TPError(f"{e}\nworker report: {self._worker_errors()}") from e

    def logits(self, prompt_ids):
        return self._run("logits", list(prompt_ids))

    def hidden_states(self, prompt_ids):
        return self._run("hidden_states", list(prompt_ids))

    def info(self) -> dict:
        return {**self.llm.info(), "tensor_parallel_size": len(self.procs) + 1}

    # ---- lifetime
    def _worker_errors(self) -> str:
        out = []
        for r, (c, p) in enumerate(zip(self.conns, self.procs, strict=True), start=1):
            try:
                while c.poll(0.5):
                    kind, msg = c.recv()
                    if kind == "error":
                        out.append(f"rank {r}: {msg.strip().splitlines()[-1]}")
            except (EOFError, OSError):
                pass
            if p.exitcode not in (None, 0) and not any(s.startswith(f"rank {r}:") for s in out):
                out.append(f"rank {r}: exited with code {p.exitcode}")
        return "; ".join(out)

    def shutdown(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        self.llm = None
        state.destroy()


class _MirroredCore:
    """Rank 0's EngineCore for callers that drive it directly (AsyncLLM): add_request / abort also go to the
    workers with the next step; everything else reads rank 0's core."""

    def __init__(self, tp: TPLLM) -> None:
        self._tp = tp

    def __getattr__(self, name: str):
        return getattr(self._tp.llm.core, name)

    def add_request(self, req) -> None:
        fresh = copy.deepcopy(req)  # as it is before the scheduler touches it
        self._tp.llm.core.add_request(req)  # raises here (nothing sent) for a refused request
        self._tp._pending.append(("core.add_request", (fresh,), {}))

    def abort(self, request_id: str):
        out = self._tp.llm.core.abort(request_id)
        self._tp._pending.append(("core.abort", (request_id,), {}))
        return out


def start(model, dtype: str, device: str, config, *, synthetic: bool = False,
          timeout_s: float = state.DEFAULT_TIMEOUT_S, threads: int | None = None,
          ready_timeout_s: float = 1800.0) -> TPLLM:  # fmt: skip
    """Spawn ranks 1..W-1, join as rank 0, load every shard; W = config.tensor_parallel_size."""
    world = config.tensor_parallel_size
    if state.is_parallel():
        raise RuntimeError("this process is already in a tensor-parallel group")
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    spec = dict(model=str(model), dtype=dtype, device=device, config=config, synthetic=synthetic,
                timeout_s=timeout_s, threads=threads if not str(device).startswith("cuda") else None)  # fmt: skip
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for r in range(1, world):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(r, world, port, child, spec), name=f"tp-rank{r}", daemon=False)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    try:
        os.environ.update({k: v for k, v in rank_env(0, world, port, device).items()
                           if k.startswith(("NCCL_", "TORCH_", "NVSHMEM_"))})  # fmt: skip
        os.environ["LOCAL_RANK"] = "0"
        if spec["threads"]:
            import torch

            torch.set_num_threads(spec["threads"])
        state.init(world, 0, master_port=port, timeout_s=timeout_s, device=device)
        llm = build_llm(model, dtype, device, config, synthetic=synthetic)
        for r, (c, p) in enumerate(zip(conns, procs, strict=True), start=1):
            if not c.poll(ready_timeout_s):
                raise state.TPError(f"tensor-parallel rank {r} not ready after {ready_timeout_s:g} s")
            try:
                kind, msg = c.recv()
            except EOFError:  # it died before reporting
                p.join(timeout=5)
                kind, msg = "error", f"died while loading (exit code {p.exitcode})"
            if kind != "ready":
                raise state.TPError(f"tensor-parallel rank {r} failed to start: {msg}")
    except BaseException:
        for p in procs:
            p.kill()
            p.join()
        state.destroy()
        raise
    return TPLLM(llm, procs, conns)

