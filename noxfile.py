"""nox sessions: tests, lint, smoke (CPU suite + gate), build_ext (compile the CUDA extension without a GPU),
cmake_build (libanvil_kernels.so + anvil_bench without Python or torch, no GPU), report (docs/report.md + .html from
results/).

They reuse the current environment (`nox --no-venv` is implied by venv_backend="none") so CI installs once.
"""

import glob
import os
import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "engine", "adapters", "harness", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session
def smoke(session: nox.Session) -> None:
    out = "results/runs/ci-smoke"
    session.run("bench", "run", "suites/smoke.toml", "--out", out)
    session.run("bench", "gate", out, "--baseline", "results/baselines/smoke.json")


@nox.session
def report(session: nox.Session) -> None:
    """Regenerate the technical report from results/: docs/report.md, docs/report.html, docs/img/*.png."""
    session.run("python", "-m", "harness.report_build", "--out", "docs", *session.posargs)


@nox.session
def build_ext(session: nox.Session) -> None:
    """Compile every .cu for sm_80, sm_89 and sm_90 with nvcc; no GPU needed."""
    env = {"CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    env.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0"))
    inc = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu13", "include"))
    if inc:
        env["CPATH"] = os.pathsep.join(inc + [os.environ.get("CPATH", "")]).rstrip(os.pathsep)
    session.run("python", "-m", "engine.kernels.build", "--check", env=env)


@nox.session
def cmake_build(session: nox.Session) -> None:
    """Configure + build engine/kernels/CMakeLists.txt in build/cmake (sm_80/89/90a, -j2); no GPU needed."""
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    env = {"PATH": os.pathsep.join([os.path.join(cuda, "bin"), os.environ.get("PATH", "")])}
    session.run("cmake", "-S", "engine/kernels", "-B", "build/cmake", *session.posargs, env=env, external=True)
    session.run("cmake", "--build", "build/cmake", "-j2", env=env, external=True)
    session.run("build/cmake/anvil_bench", "--help", external=True, silent=True)
