"""Test-only adapters for runner tests: a fake engine, and ones that raise, hang, die or are not installed.

They are registered in adapters.base.REGISTRY by the tests as "fault_adapters:<Class>" (the runner hands the
registry entry to its worker process). A request's max_new_tokens selects the fault, so one suite can hold good
and bad cells: 13 raises (RaisingAdapter), SIGKILLs the worker (KillingAdapter) or hangs (HangingAdapter).
"""

from __future__ import annotations

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
