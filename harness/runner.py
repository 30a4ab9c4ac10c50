"""Runs a suite: each (engine, model) group of cells in its own spawned worker process; records stream back.

A crash or OOM kill of a worker costs only that group's remaining cells (marked failed with the exit code or
signal); an engine that is not installed gives skipped cells; an exception in one cell fails that cell only.
Records are appended and flushed to <out>/records.jsonl as they arrive, so everything received survives.
Groups run one after another (never two engines on the machine at once); engines that serve as a parity
reference run first so their outputs exist when the others compare against them.

Workers are not daemonic (vLLM and others start processes of their own, which a daemonic process may not) and
each leads its own process group, so stopping one (timeout, SIGINT/SIGTERM of the run, a failed write) signals
the group: the worker and everything it started. A worker whose parent dies (SIGKILL) kills its group itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import base
from harness import envinfo
from harness.results import Record, RecordWriter, new_run_id
from harness.suite import Cell, Suite

POLL_S = 0.2
LOAD_TIMEOUT_S = 900.0  # process start + engine load may take this long before the first cell
STOP_GRACE_S = 2.0  # an interrupted worker gets this long after SIGTERM before SIGKILL
DONE_GRACE_S = 30.0  # a worker that said 'done' gets this long to release its engine and exit
PARENT_POLL_S = 0.5  # how often a worker checks that its parent is still there
STALE = ("records.jsonl", "table.md", "table.csv", "report.md", "report.html")  # removed on --overwrite


@dataclass
class RunOutput:
    run_id: str
    out_dir: Path
    records: list[Record]
    interrupted: int | None = None  # the signal that stopped the run, if one did

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status == "failed"]


class OutputError(Exception):
    """The run folder cannot be written. `started`: records were already being written (exit 1), else the run
    never began (exit 2)."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started


class Stop:
    """Set by a signal handler (stop_on_signals); the runner polls it and stops at the next poll."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[Stop]:
    """While inside, SIGINT / SIGTERM only record themselves in the yielded Stop (the first one wins), so the run
    can stop its worker, record the unfinished cells and write its tables instead of dying mid-write."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield stop
        return

    def handler(signum, frame) -> None:
        if stop.signum is None:
            stop.signum = signum

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def default_out_dir(suite: Suite, root: str | Path = "results/runs") -> Path:
    """results/runs/<suite>-<time>-<6 hex>, created here and only here (exclusively): two runs started in the same
    second never share a folder. Raises OSError when root cannot be written."""
    while True:
        p = Path(root) / f"{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            p.mkdir(parents=True, exist_ok=False)
            return p
        except FileExistsError:
            continue


def _groups(suite: Suite, cells: list[Cell]) -> list[tuple[str, int, list[Cell]]]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.engine, cell.model_index), []).append(cell)
    refs = {dict(sc.params).get("reference") for sc in suite.scenarios if sc.type == "parity"}
    order = sorted(groups, key=lambda k: (k[0] not in refs, k[1], suite.engines.index(k[0])))
    return [(e, m, groups[(e, m)]) for e, m in order]


def _base(run_id: str, suite: Suite, env: dict, engine: str, version: str, cell: Cell) -> dict[str, Any]:
    return {
        "run_id": run_id, "suite": suite.name, "cell_id": cell.cell_id, "scenario": cell.scenario,
        "engine": engine, "engine_version": version, "model": cell.model.name, "dtype": cell.model.dtype,
        "device": cell.model.device, "params": cell.param_dict, "env": env,
    }


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "worker did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"worker killed by signal {name}{hint}"
    return f"worker exited with code {code}"


def _availability(engine: str) -> tuple[bool, str]:
    try:
        return base.adapter_class(engine).available()
    except Exception as exc:
        return False, f"adapter failed to import: {type(exc).__name__}: {exc}"


def run_suite(suite: Suite, out_dir: str | Path | None = None,
              on_event: Callable[[str, Any], None] | None = None, cells: list[Cell] | None = None,
              stop: Stop | None = None) -> RunOutput:
    """Run every cell (or only `cells`, a subset of suite.cells); return the records (also in
    out_dir/records.jsonl). on_event(kind, payload) gets ('start', Cell) before a cell runs and ('record', Record)
    after, for progress display. When `stop` is set (a signal), the running worker is stopped and every cell
    not finished is recorded as failed ("interrupted"). Raises OutputError when the run folder cannot be written."""
    cells = suite.cells if cells is None else cells
    out = Path(out_dir) if out_dir else default_out_dir(suite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in STALE:
            (out / stale).unlink(missing_ok=True)
        for folder in ("artifacts", "plots"):
            shutil.rmtree(out / folder, ignore_errors=True)
        (out / "suite.toml").write_text(suite.text, encoding="utf-8")
        writer = RecordWriter(out / "records.jsonl")
    except OSError as exc:
        raise OutputError(f"cannot write the run folder {out}: {exc.strerror or exc}", started=False) from None
    notify = on_event or (lambda kind, payload: None)
    stop = stop or Stop()
    run_id, env = new_run_id(), envinfo.snapshot()
    if env.get("cuda_available") and any(c.model.device == "cuda" for c in cells):
        env.update(envinfo.measure_copy_bandwidth())  # the denominator of weight_pct_copy, once per run
    records: list[Record] = []
    ctx = mp.get_context("spawn")

    def emit(rec: Record) -> None:
        try:
            writer.write(rec)
        except OSError as exc:  # disk full, folder removed: the records cannot be kept, so the run stops
            raise OutputError(f"writing {writer.path} failed: {exc.strerror or exc}", started=True) from None
        records.append(rec)
        notify("record", rec)

    try:
        for engine, _, group in _groups(suite, cells):
            if stop.signum is not None:
                for cell in group:
                    emit(Record(**_base(run_id, suite, env, engine, "not run", cell), status="failed",
                                reason=f"interrupted ({signal_name(stop.signum)}) before the cell ran"))
                continue
            ok, version = _availability(engine)
            if ok and group[0].model.device == "cuda" and not env.get("cuda_available"):
                ok, version = False, "needs a CUDA GPU (device = 'cuda'); torch.cuda.is_available() is False here"
            if not ok:
                for cell in group:
                    emit(Record(**_base(run_id, suite, env, engine, "unavailable", cell), status="skipped",
                                reason=version))
                continue
            _run_group(ctx, suite, engine, version, group, run_id, env, out, emit, notify, stop)
    finally:
        with contextlib.suppress(OSError):  # every record was flushed as it was written
            writer.close()
    return RunOutput(run_id, out, records, stop.signum)


def _run_group(ctx, suite: Suite, engine: str, version: str, cells: list[Cell], run_id: str, env: dict,
               out: Path, emit: Callable[[Record], None], notify: Callable[[str, Any], None], stop: Stop) -> None:
    by_id = {c.cell_id: c for c in cells}
    payload = {
        "engine": engine, "registry_entry": base.REGISTRY[engine], "model": cells[0].model.spec,
        "opts": suite.options.get(engine, {}), "out_dir": str(out), "warmup_s": suite.warmup_s(cells[0].model),
        "copy_gb_s": env.get("gpu_copy_gb_s") if cells[0].model.device == "cuda" else None,
        "parent_pid": os.getpid(),
        "cells": [(c.cell_id, c.case_id, c.scenario, c.param_dict, _base(run_id, suite, env, engine, version, c))
                  for c in cells],
    }
    recv, send = ctx.Pipe(duplex=False)
    # not daemonic: engines such as vLLM start processes of their own, which a daemonic process may not
    proc = ctx.Process(target=worker_main, args=(payload, send), name=f"bench-{engine}", daemon=False)
    proc.start()
    send.close()  # the child holds the only write end: recv() raises EOFError once it is gone
    worker = _Worker(proc)
    pending = dict(by_id)
    last = time.monotonic()
    started = False  # a cell is running (else the worker is still starting / loading the engine)
    limit = suite.cell_timeout_s
    reason = None
    finished = False  # the worker said 'done' or closed its end: it may still be releasing the engine
    try:
        while True:
            if stop.signum is not None:
                reason = f"interrupted ({signal_name(stop.signum)})"
                worker.stop(STOP_GRACE_S)
                break
            if recv.poll(POLL_S):
                try:
                    kind, data = recv.recv()
                except (EOFError, OSError):
                    finished = True
                    break
                last = time.monotonic()
                worker.note_group()
                if kind == "start":
                    started = True
                    notify("start", by_id[data])
                elif kind == "record":
                    rec = Record.from_dict(data)
                    pending.pop(rec.cell_id, None)
                    emit(rec)
                elif kind == "done":
                    finished = True
                    break
            elif not proc.is_alive() and not recv.poll(0):
                finished = True
                break
            elif time.monotonic() - last > (limit if started else max(limit, LOAD_TIMEOUT_S)):
                what = "the cell" if started else "the engine to load"
                reason = f"timed out: waited {time.monotonic() - last:.0f} s for {what}; worker killed"
                worker.stop(0)
                break
    finally:  # also on an exception (a failed write): never leave the worker running
        recv.close()
        if finished:
            deadline = time.monotonic() + DONE_GRACE_S
            while proc.is_alive() and time.monotonic() < deadline and stop.signum is None:
                proc.join(POLL_S)
        worker.stop(STOP_GRACE_S if proc.is_alive() and stop.signum is not None else 0)
    if pending:
        reason = reason or (f"interrupted ({signal_name(stop.signum)})" if stop.signum is not None
                            else _exit_reason(proc.exitcode))
        for cell in pending.values():
            emit(Record(**_base(run_id, suite, env, engine, version, cell), status="failed", reason=reason))


class _Worker:
    """Stops a worker process and what it started. The worker makes itself a process-group leader first thing
    (worker_main); the group is signalled only once it is seen to be the worker's own, never the parent's."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.own_group = False

    def note_group(self) -> None:
        if not self.own_group and self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.own_group = os.getpgid(self.proc.pid) == self.proc.pid

    def _signal(self, sig: int) -> None:
        self.note_group()
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # children left behind after the worker exited are in it too
        elif self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after grace_s (at once when 0); reaps the worker."""
        if grace_s > 0 and self.proc.is_alive():
            self._signal(signal.SIGTERM)
            self.proc.join(grace_s)
        self._signal(signal.SIGKILL)
        self.proc.join(10)


def _info_after(adapter, last: dict | None) -> dict | None:
    """The adapter's info after a cell: what grows while an engine runs (anvil's speculative totals, counted since the
    engine was loaded) is then that of the cells run so far; the previous info when info() fails."""
    try:
        return adapter.info()
    except Exception:
        return last


def _short(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def worker_main(payload: dict, conn) -> None:
    """Entry point of a worker process: load the engine once, run its cells, send each record."""
    from harness import scenarios
    from harness.telemetry import measure_cell
    from harness.workload import Context, vocab_size, weight_bytes_per_step

    with contextlib.suppress(OSError):
        os.setpgrp()  # its own process group: the parent stops it and every process it starts with one signal
    _watch_parent(payload.get("parent_pid"))
    engine = payload["engine"]
    base.REGISTRY[engine] = payload["registry_entry"]  # adapters registered at run time (tests) reach the child

    def send(kind: str, data: Any) -> None:
        conn.send((kind, data))

    adapter = None
    load_error = None
    try:
        adapter = base.get(engine)
        quant = getattr(payload["model"], "quant", None)
        if quant and not adapter.supports_quant:
            raise ValueError(f"{engine} does not apply quant = {quant!r} to a model (anvil does; point {engine} "
                             f"at a checkpoint quantized in its own format instead)")  # fmt: skip
        adapter.load(payload["model"], dict(payload["opts"]))
        try:
            vocab = vocab_size(payload["model"])
        except Exception:  # e.g. an HTTP engine's model name: scenarios that need ids will say so
            vocab = 0
        info = adapter.info()
    except Exception as exc:
        load_error = f"load failed: {_short(exc)}"
        traceback.print_exc()
    if load_error is None:
        try:
            _engine_warmup(adapter, vocab, payload["warmup_s"])
        except Exception as exc:
            load_error = f"engine warm-up failed: {_short(exc)}"
            traceback.print_exc()
    for cell_id, case_id, scenario, params, rec in payload["cells"]:
        send("start", cell_id)
        if load_error:
            send("record", Record(**rec, status="failed", reason=load_error).to_dict())
            continue
        t0 = time.perf_counter()
        try:
            ctx = Context(engine=engine, case_id=case_id, vocab_size=vocab, out_dir=Path(payload["out_dir"]),
                          model=payload["model"], opts=dict(payload["opts"]),
                          weight_bytes=(info or {}).get("weight_bytes_per_step") or weight_bytes_per_step(payload["model"]),
                          copy_gb_s=payload.get("copy_gb_s"))  # fmt: skip
            scen = scenarios.get(scenario)
            if getattr(scen, "OWN_TELEMETRY", False):  # it samples around its measured phase itself
                metrics, samples = scen.run(adapter, dict(params), ctx)
            else:  # GPU/CPU telemetry and J/token around the whole cell
                metrics, samples = measure_cell(scen.run, adapter, dict(params), ctx)
            out = Record(**rec, status="ok", metrics=metrics, samples=samples, engine_info=info)
        except scenarios.Skip as exc:
            out = Record(**rec, status="skipped", reason=str(exc), engine_info=info)
        except Exception as exc:
            traceback.print_exc()
            out = Record(**rec, status="failed", reason=_short(exc), engine_info=info)
            _free_device_memory()
        out.engine_info = info = _info_after(adapter, info)
        out.duration_s = round(time.perf_counter() - t0, 4)
        send("record", out.to_dict())
    if adapter is not None:
        try:
            adapter.close()
        except Exception:
            traceback.print_exc()
    try:
        send("done", None)
        conn.close()
    except OSError:  # the parent stopped listening (it had every record already)
        pass


def _watch_parent(parent_pid: int | None) -> None:
    """A thread that ends this worker (and its process group) when the parent is gone (SIGKILL, crash): a
    non-daemonic worker would otherwise run on as an orphan, holding the GPU."""
    if not parent_pid:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        if os.getpgrp() == os.getpid():  # only a group this worker leads, never the one it came from
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _engine_warmup(adapter, vocab: int, seconds: float) -> None:
    """Small generate calls (at least 2) for `seconds` after load, so the first cell does not pay for clock
    ramp-up, lazy kernel loading or autotuning. Each cell still runs its own warm-up on its own shapes."""
    from harness.workload import random_prompts, run_batch

    if seconds <= 0 or vocab <= 0:
        return
    end, n = time.perf_counter() + seconds, 0
    while n < 2 or time.perf_counter() < end:
        run_batch(adapter, random_prompts(vocab, 1, 32, 990_000 + n), 16)
        n += 1


def _free_device_memory() -> None:
    """After a failed cell (often an OOM) give cached blocks back so the next cell starts clean."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
