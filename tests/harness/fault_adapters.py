"""Test-only adapters for runner tests: a fake engine, and ones that raise, hang, die or are not installed.

They are registered in adapters.base.REGISTRY by the tests as "fault_adapters:<Class>" (the runner hands the
registry entry to its worker process). A request's max_new_tokens selects the fault, so one suite can hold good
and bad cells: 13 raises (RaisingAdapter), SIGKILLs the worker (KillingAdapter) or hangs (HangingAdapter).
MarkingAdapter leaves files in opts["marker_dir"] (its pid; 'hang' when it reaches the 13 cell, where it hangs with
a child process of its own) so tests can watch a worker from outside; SpawningAdapter's generate() runs a
multiprocessing child, as vLLM does; OptionCheckingAdapter has a validate_options().
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

from adapters.base import Adapter, GenRequest, GenResult, ModelSpec, now

TRIGGER = 13


class FakeAdapter(Adapter):
    name = "fake"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "fake 1.0"

    def load(self, model: ModelSpec, opts=None) -> None:
        self.model = model

    def fault(self, request: GenRequest) -> None:
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        for r in requests:
            self.fault(r)
        submit = now()
        times = []
        for _ in range(max(r.max_new_tokens for r in requests)):
            time.sleep(0.0005)
            times.append(now())
        return [GenResult(output_ids=[(sum(r.prompt_ids) + i) % 7 for i in range(r.max_new_tokens)], text=None,
                          submit_time=submit, first_token_time=times[0], token_times=times[: r.max_new_tokens],
                          finish_reason="length", prompt_tokens=len(r.prompt_ids)) for r in requests]


class RaisingAdapter(FakeAdapter):
    def fault(self, request: GenRequest) -> None:
        if request.max_new_tokens == TRIGGER:
            raise ValueError("planted failure")


class KillingAdapter(FakeAdapter):
    def fault(self, request: GenRequest) -> None:
        if request.max_new_tokens == TRIGGER:
            os.kill(os.getpid(), signal.SIGKILL)


class HangingAdapter(FakeAdapter):
    def fault(self, request: GenRequest) -> None:
        if request.max_new_tokens == TRIGGER:
            time.sleep(3600)


class LoadFailingAdapter(FakeAdapter):
    def load(self, model: ModelSpec, opts=None) -> None:
        raise RuntimeError("weights are corrupt")


class MissingAdapter(FakeAdapter):
    @classmethod
    def available(cls) -> tuple[bool, str]:
        return False, "not installed: pip install missing-engine"


class OptionCheckingAdapter(FakeAdapter):
    @classmethod
    def validate_options(cls, opts: dict) -> None:
        if opts.get("depth", 1) < 1:
            raise ValueError("depth", f"must be >= 1, got {opts['depth']}")
        if "colour" in opts:
            raise ValueError(f"colour: not an option of this engine (got {opts['colour']!r})")


def _sleep_forever() -> None:
    time.sleep(3600)


def _put_pid(q) -> None:
    q.put(os.getpid())


class MarkingAdapter(FakeAdapter):
    def load(self, model: ModelSpec, opts=None) -> None:
        super().load(model, opts)
        self.dir = opts["marker_dir"]
        with open(os.path.join(self.dir, "pid"), "w") as f:
            f.write(str(os.getpid()))

    def fault(self, request: GenRequest) -> None:
        if request.max_new_tokens == TRIGGER:
            child = mp.get_context("spawn").Process(target=_sleep_forever)
            child.start()
            with open(os.path.join(self.dir, "child"), "w") as f:
                f.write(str(child.pid))
            with open(os.path.join(self.dir, "hang"), "w") as f:
                f.write("")
            time.sleep(3600)


class SpawningAdapter(FakeAdapter):
    def fault(self, request: GenRequest) -> None:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=_put_pid, args=(q,))
        child.start()  # raises in a daemonic worker: "daemonic processes are not allowed to have children"
        pid = q.get(timeout=60)
        child.join(60)
        if pid == os.getpid() or child.exitcode != 0:
            raise RuntimeError(f"child process failed: exit code {child.exitcode}")
