"""Builds the anvil CUDA extension (JIT via torch.utils.cpp_extension.load) and, with --check, compiles every source
with nvcc for TORCH_CUDA_ARCH_LIST without a GPU (CI runs `python -m engine.kernels.build --check`)."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
NAME = "anvil_kernels"
DEFAULT_ARCHS = "8.0;8.9;9.0"
# no --use_fast_math: silu/rms_norm must round like torch; the attention kernels call ex2.approx explicitly
# no -std here: torch's builders add the standard their headers need (C++17 for torch 2.11, C++20 for newer)
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3"]
CHECK_STD = "-std=c++17"  # the .cu files include no torch header
CHECK_CXX_STD = "-std=c++20"  # torch >= 2.12 headers need C++20; our code is valid C++17 and C++20


def cu_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def sources() -> list[Path]:
    return [*cu_sources(), CSRC / "bindings.cpp"]


def cuda_home() -> Path:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return Path(env)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    return Path("/usr/local/cuda")


def extra_include_dirs() -> list[str]:
    """CUDA headers shipped as pip wheels (nvidia/cu13/include, nvidia/*/include) next to torch."""
    found: list[str] = []
    roots = {sysconfig.get_paths()["purelib"], *[p for p in sys.path if p.endswith("site-packages")]}
    for root in sorted(roots):
        for pat in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            for d in glob.glob(os.path.join(root, pat)):
                if d not in found:
                    found.append(d)
    return found


def gencode_flags(arch_list: str) -> list[str]:
    """'8.0;8.9;9.0' / '9.0a' / '8.0+PTX' -> nvcc -gencode flags."""
    flags: list[str] = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def build_dir() -> Path:
    import torch

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "anvil" / "ext")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    d = root / f"{NAME}_{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False) -> None:
    """JIT-build (cached; ninja rebuilds only what changed) and load the library; its ops appear as torch.ops.anvil.*."""
    from torch.utils import cpp_extension

    incs = [str(CSRC), *extra_include_dirs()]
    cpp_extension.load(
        name=NAME,
        sources=[str(s) for s in sources()],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=incs,
        build_directory=str(build_dir()),
        is_python_module=False,
        verbose=verbose,
    )


def _run(cmd: list[str]) -> tuple[list[str], int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _torch_includes() -> list[str]:
    from torch.utils import cpp_extension

    try:
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        return cpp_extension.include_paths(cuda=True)


def check(arch_list: str, jobs: int, resources: bool, cpp: bool) -> int:
    """Compile each .cu once per arch (and bindings.cpp with the host compiler); no GPU, no linking."""
    nvcc = cuda_home() / "bin" / "nvcc"
    if not nvcc.exists():
        print(f"nvcc not found at {nvcc} (set CUDA_HOME)", file=sys.stderr)
        return 2
    incs = [f"-I{CSRC}", f"-I{cuda_home() / 'include'}", *[f"-I{d}" for d in extra_include_dirs()]]
    out = Path(tempfile.mkdtemp(prefix="anvil-check-"))
    cmds: list[list[str]] = []
    for src in cu_sources():
        for gc in gencode_flags(arch_list):
            arch = gc.split("code=")[-1]
            obj = out / f"{src.stem}.{arch}.o"
            cmd = [str(nvcc), "-c", str(src), "-o", str(obj), gc, CHECK_STD, *NVCC_FLAGS, *incs]
            if resources:
                cmd.append("-Xptxas=-v")
            cmds.append(cmd)
    if cpp:
        cxx = os.environ.get("CXX", "c++")
        tinc = [f"-I{p}" for p in _torch_includes()]
        cmds.append(
            [
                cxx,
                "-fsyntax-only",
                str(CSRC / "bindings.cpp"),
                CHECK_CXX_STD,
                *CXX_FLAGS,
                *incs,
                *tinc,
                f"-I{sysconfig.get_paths()['include']}",
            ]
        )
    failed = 0
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        for cmd, rc, log, dt in pool.map(_run, cmds):
            src = Path(cmd[2] if cmd[1] == "-c" else cmd[2]).name
            tgt = next((c.split("code=")[-1] for c in cmd if c.startswith("-gencode")), "host")
            status = "ok" if rc == 0 else f"FAILED ({rc})"
            print(f"[{status}] {src} {tgt} {dt:.1f}s", flush=True)
            if rc != 0 or (resources and log.strip()):
                print(log, flush=True)
            failed += rc != 0
    shutil.rmtree(out, ignore_errors=True)
    print(f"{len(cmds) - failed}/{len(cmds)} compiled for {arch_list}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compile every source with nvcc (no GPU) and exit")
    ap.add_argument("--resources", action="store_true", help="with --check: print ptxas register/smem reports")
    ap.add_argument("--no-cpp", action="store_true", help="with --check: skip the torch binding (slow to compile)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 2)))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        return check(archs, args.jobs, args.resources, not args.no_cpp)
    t0 = time.perf_counter()
    load(verbose=args.verbose)
    print(f"built and loaded {NAME} in {time.perf_counter() - t0:.1f}s under {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
