"""Optional ahead-of-time build of the anvil CUDA extension: `ANVIL_BUILD_EXT=1 pip install --no-build-isolation -e .`
(metadata lives in pyproject.toml; without ANVIL_BUILD_EXT=1 this is a pure-Python install and ext.py JIT-builds)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ANVIL_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = Path(__file__).resolve().parent
    # load build.py by path: importing the engine package here would pull in the whole engine
    spec = importlib.util.spec_from_file_location("_anvil_build", here / "engine" / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext_modules = [
        CUDAExtension(
            "engine.kernels._C",
            sources=[str(s.relative_to(here)) for s in build.sources()],
            include_dirs=[str(build.CSRC), *build.extra_include_dirs()],
            extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
