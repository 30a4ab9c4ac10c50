"""Telemetry sampler: CPU-only records on this machine, and the GPU path through a fake NVML."""

from __future__ import annotations

import time

import pytest

from engine import nvtx
from harness import telemetry
from harness.telemetry import Telemetry, flat_metrics


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_cpu_only_sampling_says_so(monkeypatch):
    def no_gpu():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(telemetry, "_Nvml", no_gpu)
    with Telemetry(interval_s=0.02) as tel:
        busy(0.2)
    s = tel.summary(generated_tokens=10)
    assert s["gpu_present"] is False and "CPU only" in s["gpu_note"]
    assert s["samples"] >= 3 and 0.2 <= s["duration_s"] < 3.0  # a loaded CI box can starve the sampler
    assert 0 < s["cpu_util_mean"] <= 100 and s["rss_peak_mb"] > 1
    assert "gpus" not in s and "j_per_token" not in s
    assert set(flat_metrics(s)) == {"cpu_util_mean", "rss_peak_mb"}


class FakeNvml:
    """Two samples' worth of GPU readings: 100 W then 300 W, no energy counter."""

    def __init__(self, counter: bool = False):
        self.indices, self.names, self.mem_total_mb, self.driver = [0], ["Fake H100"], [81559.0], "999.1"
        self.power = iter([100.0, 300.0] + [300.0] * 1000)
        self.counter = counter
        self.e = 0.0

    def energy_mj(self):
        self.e += 5000.0
        return [self.e if self.counter else None]

    def read(self):
        return [
            {
                "mem_used_mb": 1000.0,
                "util": 50.0,
                "mem_util": 20.0,
                "power_w": next(self.power),
                "sm_clock_mhz": 1980,
                "mem_clock_mhz": 2619,
            }
        ]

    def close(self):
        pass


def test_gpu_path_energy_integrated_from_power(monkeypatch):
    monkeypatch.setattr(telemetry, "_Nvml", FakeNvml)
    with Telemetry(interval_s=10.0) as tel:  # no thread samples: just the enter and exit ones
        time.sleep(0.1)
    s = tel.summary(generated_tokens=4)
    (g,) = s["gpus"]
    dt = tel.series.t[1] - tel.series.t[0]
    assert g["energy_source"] == "integrated power samples"
    assert g["energy_j"] == pytest.approx(dt * 200.0)  # trapezoid of 100 W -> 300 W
    assert s["j_per_token"] == pytest.approx(dt * 200.0 / 4)
    assert g["power_w_max"] == 300.0 and g["util_mean"] == 50.0 and g["sm_clock_mhz_mean"] == 1980
    fm = flat_metrics(s)
    assert fm["gpu_mem_peak_mb"] == 1000.0 and fm["j_per_token"] == s["j_per_token"]
    assert len(s["series"]["gpu_power_w"]) == len(s["series"]["t"])


def test_gpu_path_prefers_the_energy_counter(monkeypatch):
    monkeypatch.setattr(telemetry, "_Nvml", lambda: FakeNvml(counter=True))
    with Telemetry(interval_s=10.0) as tel:
        pass
    (g,) = tel.summary()["gpus"]
    assert g["energy_source"] == "nvml energy counter" and g["energy_j"] == pytest.approx(5.0)


def test_series_are_thinned(monkeypatch):
    monkeypatch.setattr(telemetry, "MAX_SERIES_POINTS", 10)
    with Telemetry(interval_s=0.005, gpu=False) as tel:
        time.sleep(0.5)
    s = tel.summary()
    assert s["samples"] > 10 and len(s["series"]["t"]) <= 10


def test_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert telemetry._visible_indices(4) == [1, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert telemetry._visible_indices(4) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert telemetry._visible_indices(2) == [0, 1]


def test_nvtx_ranges_are_noops_without_cuda():
    # enable() turns ranges on only where CUDA is: off on a CPU machine, on (real ranges) on a GPU one
    has_cuda = nvtx._cuda_nvtx() is not None
    try:
        assert nvtx.enable(True) is has_cuda and nvtx.enabled() is has_cuda

        @nvtx.annotate()
        def f(x):
            return x + 1

        with nvtx.range("prefill"):
            assert f(1) == 2
        nvtx.mark("done")
    finally:
        nvtx.enable(False)  # other tests time code: leave ranges off


def test_measure_cell_wraps_any_scenario(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(telemetry, "_Nvml", FakeNvml)

    class Adapter:
        name = "x"

        def generate(self, requests):
            busy(0.05)
            return [SimpleNamespace(output_ids=[1, 2, 3]) for _ in requests]

    def scenario_run(adapter, params, ctx):
        assert adapter.name == "x"  # attributes pass through
        adapter.generate([0, 0])
        return {"decode_tok_s": 1.0}, {"raw": [1]}

    metrics, samples = telemetry.measure_cell(scenario_run, Adapter(), {}, None, interval_s=0.01)
    assert samples["raw"] == [1] and samples["telemetry"]["generated_tokens"] == 6
    assert metrics["decode_tok_s"] == 1.0 and metrics["j_per_token"] > 0 and "gpu_mem_peak_mb" in metrics


def test_nvtx_ranges_push_and_pop_when_enabled(monkeypatch):
    calls = []

    class FakeNvtx:
        def range_push(self, name):
            calls.append(("push", name))

        def range_pop(self):
            calls.append(("pop",))

        def mark(self, msg):
            calls.append(("mark", msg))

    monkeypatch.setattr(nvtx, "_cuda_nvtx", FakeNvtx)
    try:
        assert nvtx.enable(True) is True

        @nvtx.annotate("decode_step")
        def step():
            return 7

        with nvtx.range("prefill"):
            assert step() == 7
        with pytest.raises(ZeroDivisionError), nvtx.range("boom"):
            1 / 0  # noqa: B018 - the range must still pop
        nvtx.mark("done")
        assert calls == [
            ("push", "prefill"),
            ("push", "decode_step"),
            ("pop",),
            ("pop",),
            ("push", "boom"),
            ("pop",),
            ("mark", "done"),
        ]
    finally:
        nvtx.enable(False)
