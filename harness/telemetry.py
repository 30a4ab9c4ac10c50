"""Background sampling of GPU (pynvml) and CPU (/proc) state during a cell; energy per generated token.

Usage:
    with Telemetry(interval_s=0.1) as tel:
        ... run the cell ...
    record["telemetry"] = tel.summary(generated_tokens=n)

GPU: memory used, utilisation (SM and memory), power, SM / memory clocks, per visible device. Energy is read
from NVML's total-energy counter where the GPU has one (Volta and later) and otherwise integrated from the power
samples (trapezoids); `energy_source` says which. On a machine without a GPU (or without pynvml) only the CPU
side is recorded and `gpu_note` says why.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

MAX_SERIES_POINTS = 200  # series kept in the record are thinned to this many points


def _read_proc_stat() -> tuple[int, int] | None:
    """(idle, total) jiffies over all CPUs, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return idle, sum(vals[:8])


def _read_meminfo_used_mb() -> float | None:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0])
        return (info["MemTotal"] - info["MemAvailable"]) / 1024.0
    except (OSError, KeyError, ValueError):
        return None


def _read_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the devices this process sees (CUDA_VISIBLE_DEVICES when it lists plain integers)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(count)) if env is None else []
    try:
        return [i for i in (int(x) for x in env.split(",")) if 0 <= i < count]
    except ValueError:  # UUIDs or MIG names: sample every device rather than guess
        return list(range(count))


class _Nvml:
    """pynvml handles and one-shot reads; construction raises when there is no usable GPU."""

    def __init__(self) -> None:
        with warnings.catch_warnings():  # the pynvml shim warns that it is deprecated for nvidia-ml-py (same module)
            warnings.simplefilter("ignore")
            import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        idx = _visible_indices(pynvml.nvmlDeviceGetCount())
        if not idx:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML sees no visible GPU")
        self.indices = idx
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
        self.names = [self._str(pynvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.mem_total_mb = [pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20 for h in self.handles]
        self.driver = self._str(pynvml.nvmlSystemGetDriverVersion())

    @staticmethod
    def _str(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    def _try(self, fn, *args):
        try:
            return fn(*args)
        except Exception:  # a query this GPU or driver does not support
            return None

    def energy_mj(self) -> list[float | None]:
        return [self._try(self.nv.nvmlDeviceGetTotalEnergyConsumption, h) for h in self.handles]

    def read(self) -> list[dict[str, float | None]]:
        nv, out = self.nv, []
        for h in self.handles:
            mem = self._try(nv.nvmlDeviceGetMemoryInfo, h)
            util = self._try(nv.nvmlDeviceGetUtilizationRates, h)
            power = self._try(nv.nvmlDeviceGetPowerUsage, h)
            out.append(
                {
                    "mem_used_mb": mem.used / 2**20 if mem else None,
                    "util": float(util.gpu) if util else None,
                    "mem_util": float(util.memory) if util else None,
                    "power_w": power / 1000.0 if power is not None else None,
                    "sm_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
                    "mem_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM),
                }
            )
        return out

    def close(self) -> None:
        self._try(self.nv.nvmlShutdown)


@dataclass
class _Series:
    t: list[float] = field(default_factory=list)  # seconds since start
    cpu_util: list[float | None] = field(default_factory=list)  # percent, all CPUs
    rss_mb: list[float | None] = field(default_factory=list)  # this process
    sys_mem_mb: list[float | None] = field(default_factory=list)  # whole machine, used
    gpu: list[list[dict]] = field(default_factory=list)  # per sample: per device readings


class Telemetry:
    """A context manager that samples every `interval_s` on a daemon thread until it exits."""

    def __init__(self, interval_s: float = 0.1, gpu: bool = True):
        self.interval_s = interval_s
        self.series = _Series()
        self._nvml: _Nvml | None = None
        self.gpu_note = "GPU sampling off"
        if gpu:
            try:
                self._nvml = _Nvml()
                self.gpu_note = f"pynvml, driver {self._nvml.driver}"
            except Exception as exc:  # no pynvml, no driver, no device: CPU only, and say so
                self.gpu_note = f"no GPU telemetry (CPU only): {type(exc).__name__}: {exc}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0
        self._e0: list[float | None] = []
        self._e1: list[float | None] = []
        self._prev_cpu: tuple[int, int] | None = None

    @property
    def has_gpu(self) -> bool:
        return self._nvml is not None

    def __enter__(self) -> Telemetry:
        self._t0 = time.perf_counter()
        self._prev_cpu = _read_proc_stat()
        if self._nvml:
            self._e0 = self._nvml.energy_mj()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="anvil-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5 * self.interval_s + 1)
        self._sample()
        self._t1 = time.perf_counter()
        if self._nvml:
            self._e1 = self._nvml.energy_mj()
            self._nvml.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        s = self.series
        cur = _read_proc_stat()
        util = None
        if cur and self._prev_cpu and cur[1] > self._prev_cpu[1]:
            util = 100.0 * (1.0 - (cur[0] - self._prev_cpu[0]) / (cur[1] - self._prev_cpu[1]))
        self._prev_cpu = cur
        s.t.append(time.perf_counter() - self._t0)
        s.cpu_util.append(util)
        s.rss_mb.append(_read_rss_mb())
        s.sys_mem_mb.append(_read_meminfo_used_mb())
        if self._nvml:
            try:
                s.gpu.append(self._nvml.read())
            except Exception:  # NVML can fail mid-run (driver reset): keep the CPU side going
                s.gpu.append([{} for _ in self._nvml.handles])

    def summary(self, generated_tokens: int | None = None) -> dict[str, Any]:
        """What goes into the record: per-device aggregates, energy, J/token, CPU, and thinned series."""
        s = self.series
        dur = (self._t1 or time.perf_counter()) - self._t0
        out: dict[str, Any] = {
            "interval_s": self.interval_s,
            "duration_s": dur,
            "samples": len(s.t),
            "gpu_present": self.has_gpu,
            "gpu_note": self.gpu_note,
            "cpu_util_mean": _mean(s.cpu_util),
            "cpu_util_max": _max(s.cpu_util),
            "rss_peak_mb": _max(s.rss_mb),
            "sys_mem_used_peak_mb": _max(s.sys_mem_mb),
            "cpu_cores": os.cpu_count(),
        }
        if self._nvml:
            devices, energy_total = [], 0.0
            for d, idx in enumerate(self._nvml.indices):
                col = [row[d] if d < len(row) else {} for row in s.gpu]
                power = [c.get("power_w") for c in col]
                energy, source = _energy(self._e0, self._e1, d, s.t, power)
                energy_total += energy or 0.0
                devices.append(
                    {
                        "index": idx,
                        "name": self._nvml.names[d],
                        "mem_total_mb": self._nvml.mem_total_mb[d],
                        "mem_used_peak_mb": _max([c.get("mem_used_mb") for c in col]),
                        "util_mean": _mean([c.get("util") for c in col]),
                        "util_max": _max([c.get("util") for c in col]),
                        "mem_util_mean": _mean([c.get("mem_util") for c in col]),
                        "power_w_mean": _mean(power),
                        "power_w_max": _max(power),
                        "sm_clock_mhz_mean": _mean([c.get("sm_clock_mhz") for c in col]),
                        "mem_clock_mhz_mean": _mean([c.get("mem_clock_mhz") for c in col]),
                        "energy_j": energy,
                        "energy_source": source,
                    }
                )
            out["gpus"] = devices
            out["energy_j"] = energy_total
            if generated_tokens:
                out["generated_tokens"] = generated_tokens
                out["j_per_token"] = energy_total / generated_tokens
        out["series"] = self._thinned()
        return out

    def _thinned(self) -> dict[str, list]:
        s = self.series
        step = max(1, -(-len(s.t) // MAX_SERIES_POINTS))
        keep = range(0, len(s.t), step)
        ser: dict[str, list] = {
            "t": [round(s.t[i], 4) for i in keep],
            "cpu_util": [s.cpu_util[i] for i in keep],
            "rss_mb": [s.rss_mb[i] for i in keep],
        }
        if s.gpu:
            ser["gpu_mem_used_mb"] = [[c.get("mem_used_mb") for c in s.gpu[i]] for i in keep]
            ser["gpu_util"] = [[c.get("util") for c in s.gpu[i]] for i in keep]
            ser["gpu_power_w"] = [[c.get("power_w") for c in s.gpu[i]] for i in keep]
        return ser


def _energy(e0: list, e1: list, d: int, t: list[float], power: list[float | None]) -> tuple[float | None, str]:
    if d < len(e0) and d < len(e1) and e0[d] is not None and e1[d] is not None and e1[d] >= e0[d]:
        return (e1[d] - e0[d]) / 1000.0, "nvml energy counter"
    pts = [(ti, p) for ti, p in zip(t, power, strict=True) if p is not None]
    if len(pts) < 2:
        return None, "unavailable"
    return sum(
        (b[0] - a[0]) * (a[1] + b[1]) / 2.0 for a, b in zip(pts, pts[1:], strict=False)
    ), "integrated power samples"


def _mean(xs: list) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _max(xs: list) -> float | None:
    v = [x for x in xs if x is not None]
    return max(v) if v else None


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The few telemetry numbers worth comparing and gating on, flat (GPU ones summed/maxed over devices)."""
    m: dict[str, float] = {}
    for k in ("cpu_util_mean", "rss_peak_mb"):
        if summary.get(k) is not None:
            m[k] = float(summary[k])
    gpus = summary.get("gpus") or []
    if gpus:
        peaks = [g["mem_used_peak_mb"] for g in gpus if g.get("mem_used_peak_mb") is not None]
        utils = [g["util_mean"] for g in gpus if g.get("util_mean") is not None]
        powers = [g["power_w_mean"] for g in gpus if g.get("power_w_mean") is not None]
        if peaks:
            m["gpu_mem_peak_mb"] = max(peaks)
        if utils:
            m["gpu_util_mean"] = sum(utils) / len(utils)
        if powers:
            m["gpu_power_w_mean"] = sum(powers)
        if summary.get("energy_j") is not None:
            m["energy_j"] = float(summary["energy_j"])
        if summary.get("j_per_token") is not None:
            m["j_per_token"] = float(summary["j_per_token"])
    return m


class _CountingAdapter:
    """Passes every call to the adapter; counts generated tokens (for J/token) on the way back."""

    def __init__(self, adapter: Any):
        self._adapter = adapter
        self.generated_tokens = 0

    def generate(self, requests):
        results = self._adapter.generate(requests)
        self.generated_tokens += sum(len(r.output_ids) for r in results)
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def _torch_cuda():
    """torch.cuda when this process already imported torch and initialised CUDA (an in-process torch engine), else
    None: telemetry never imports torch or creates a CUDA context itself."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None
    except Exception:
        return None


def measure_cell(run, adapter: Any, params: dict, ctx: Any, interval_s: float = 0.1) -> tuple[dict, dict]:
    """Run a scenario's run(adapter, params, ctx) under a sampler: its samples get "telemetry" (the summary, J/token
    over the tokens the adapter generated) and its metrics the flat telemetry figures it does not set itself."""
    counted = _CountingAdapter(adapter)
    cuda = _torch_cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    with Telemetry(interval_s=interval_s) as tel:
        metrics, samples = run(counted, params, ctx)
    summary = tel.summary(generated_tokens=counted.generated_tokens or None)
    if cuda is not None:  # exact, but sees only this process's torch allocations (NVML's peak sees everything)
        summary["torch_peak_alloc_mb"] = cuda.max_memory_allocated() / 2**20
        metrics.setdefault("torch_peak_alloc_mb", round(summary["torch_peak_alloc_mb"], 1))
    if isinstance(samples, dict):
        samples.setdefault("telemetry", summary)
    for k, v in flat_metrics(summary).items():
        metrics.setdefault(k, round(v, 6))
    return metrics, samples
