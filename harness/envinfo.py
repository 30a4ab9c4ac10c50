"""Hardware / software snapshot recorded with every result: GPUs, driver, CUDA, torch, Python, CPU, commit."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nvml() -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
        pynvml.nvmlInit()
    except Exception as exc:  # not installed, or no driver
        return {"nvml": f"unavailable ({type(exc).__name__})"}
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_gib": round(mem.total / 2**30, 1)})
        return {"driver": drv.decode() if isinstance(drv, bytes) else drv, "nvml_gpus": gpus}
    except Exception as exc:
        return {"nvml": f"error ({type(exc).__name__}: {exc})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def snapshot() -> dict[str, Any]:
    """A JSON-able dict describing this machine and checkout. Never raises. ANVIL_COMMIT, when set, names the
    commit instead of git (for a copy of a checkout whose .git is stale or absent, as on the lent GPU)."""
    given = os.environ.get("ANVIL_COMMIT")
    if given:
        return {**_static(), "commit": given, "dirty": None, "commit_source": "ANVIL_COMMIT"}
    return {**_static(), "commit": commit(), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def gpu_record() -> dict[str, Any]:
    """What a committed GPU result names: gpu, driver, torch, cuda, commit (nvidia-smi gives the driver where NVML
    is not installed). Never raises."""
    import torch

    drv = _nvml().get("driver")
    if drv is None:
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0] or None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            drv = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "driver": drv, "torch": torch.__version__, "cuda": torch.version.cuda,
            "commit": commit(short=True)}  # fmt: skip


def commit(short: bool = False) -> str | None:
    """The checkout's commit: ANVIL_COMMIT when set, else git's HEAD (None outside a git checkout)."""
    return os.environ.get("ANVIL_COMMIT") or _git("rev-parse", *(["--short"] if short else []), "HEAD")


@functools.cache
def _static() -> dict[str, Any]:
    """The parts that cannot change while this process lives (imports torch once)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = str(torch.__version__)  # plain str: TorchVersion would drag torch into unpicklers
        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        env["gpus"] = [
            {"index": i, "name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())
        ] if env["cuda_available"] else []
    except Exception as exc:
        env["torch"] = f"unavailable ({type(exc).__name__}: {exc})"
    if env.get("cuda_available"):
        env.update(_nvml())
    else:
        env["driver"] = None
    try:
        env["transformers"] = importlib.metadata.version("transformers")  # metadata only: no 3 s import
    except importlib.metadata.PackageNotFoundError:
        env["transformers"] = None
    return env


def copy_bandwidth_gb_s(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """GPU 0's device-to-device copy bandwidth in GB/s, counting bytes read + written (the convention of
    shared/GPU.md's 3.0 TB/s H100 anchor): torch copy_ of a 1 GiB buffer, timed with CUDA events, best of 3."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    best = 0.0
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            b.copy_(a)
        end.record()
        end.synchronize()
        best = max(best, 2 * nbytes * iters / (start.elapsed_time(end) * 1e-3) / 1e9)
    return best


def measure_copy_bandwidth(timeout_s: float = 120.0) -> dict[str, Any]:
    """copy_bandwidth_gb_s() in a child process (this one keeps no CUDA context): {"gpu_copy_gb_s": GB/s} or
    {"gpu_copy_note": why not}. Never raises."""
    code = "from harness.envinfo import copy_bandwidth_gb_s as f; print(f())"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             timeout=timeout_s)
        if out.returncode == 0:
            return {"gpu_copy_gb_s": round(float(out.stdout.strip().splitlines()[-1]), 1)}
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"gpu_copy_note": f"copy bandwidth not measured: exit {out.returncode}: {tail}"}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"gpu_copy_note": f"copy bandwidth not measured: {type(exc).__name__}: {exc}"}
