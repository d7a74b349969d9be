"""Builds fastcaps' C++ extension (fastcaps._C) with torch's extension machinery and ninja.

Install with `pip install --no-build-isolation -e .` so that the extension is compiled
against the torch already installed; DEBUG=1 builds with -O0 -g.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

DEBUG = os.getenv("DEBUG", "0") == "1"

# No -march=native: the build must run on any x86-64 (or aarch64) machine it is copied to.
CXX_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3", "-DNDEBUG"]
# Fused multiply-adds where the instruction set has them (the AVX2 and AVX-512 clones of the
# kernels, csrc/common/simd.h); ISO C++ mode would otherwise forbid contracting a * b + c.
CXX_FLAGS += ["-ffp-contract=fast"]

setup(
    ext_modules=[
        CppExtension(
            "fastcaps._C",
            # One translation unit per op (csrc/<op>/*.cpp) plus the module (csrc/fastcaps.cpp);
            # the headers they include ship in the sdist through MANIFEST.in.
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp")),
            extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
