"""benchmarks/profile_core.py's kernel table and TTFT timeline over a fake profile (no GPU): the GPU-side copy of a
record_function range (`anvil.ttft.i`, a user annotation spanning its run) is neither a kernel nor busy time, so a
gap between kernels stays a gap, and under overlapping kernels (PDL) each is charged its critical path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

CUDA = torch.autograd.DeviceType.CUDA
ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("profile_core", ROOT / "benchmarks" / "profile_core.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ev(name, start, end, device=CUDA, annotation=False):
    return SimpleNamespace(name=name, device_type=device, device_resource_id=7, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))  # fmt: skip


class _Prof:
    def __init__(self, events):
        self._events = events

    def events(self):
        return self._events


def test_annotation_ranges_are_not_kernels_and_gaps_stay_gaps():
    pc = _module()
    events = [
        _ev("anvil.ttft.0", 1000, 2000, annotation=True),  # the range on the GPU timeline: spans everything
        _ev("anvil.ttft.0", 1000, 2000, device=torch.autograd.DeviceType.CPU),  # its host side
        _ev("gemm", 1100, 1400),
        _ev("norm", 1350, 1500),  # overlaps gemm (PDL): charged 1400 -> 1500 only
        _ev("attn", 1700, 1900),  # after a 200 us gap
    ]
    t = pc.kernel_table(_Prof(events), steps=1)
    names = [r["name"] for r in t["top"]]
    assert "anvil.ttft.0" not in names and sorted(names) == ["attn", "gemm", "norm"]
    crit = {r["name"]: r["critical_us_per_step"] for r in t["top"]}
    assert crit == {"gemm": 300, "norm": 100, "attn": 200} and t["busy_us"] == 600
    # timeline: the range opened at perf_counter 10.0 s, the token arrived 1.0 ms later (profiler clock: 1000..2000)
    (row,) = pc.timeline(_Prof(events), [(10.0, 10.001, [])])
    assert row["kernels"] == 3 and row["lead_ms"] == 0.1 and row["busy_ms"] == 0.6 and row["idle_ms"] == 0.2
    assert abs(row["tail_ms"] - 0.1) < 1e-9 and row["gaps_over_20us"] == 1
    assert row["largest_gaps"][0] == {"us": 200, "after": "norm", "before": "attn"}
