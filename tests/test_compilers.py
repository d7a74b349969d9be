"""The C++ extension's sources compile with clang (macOS users have no GCC) and for aarch64
(NEON is its baseline build), checked here without either machine: each translation unit
is compiled, syntax and template instantiation only, against this torch's headers.

Skipped where the compilers are missing; on Debian: apt-get install clang g++-aarch64-linux-gnu.
A build with clang on x86-64 makes the baseline build only (csrc/common/builds.h), and
fastcaps warns at import on a CPU that could run a wider one (test_cpu_kernels.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*", "*.cpp")))
# The machine's own macros, and the build's (setup.py): a source that uses a GCC-ism fails here.
FLAGS = ["-std=c++17", "-fsyntax-only", "-ffp-contract=fast", "-DTORCH_EXTENSION_NAME=_C",
         "-DTORCH_API_INCLUDE_EXTENSION_H", "-w", "-I" + sysconfig.get_paths()["include"]]
FLAGS += ["-I" + path for path in cpp_extension.include_paths()]


def _compile_all(compiler: str) -> None:
    failures = []
    for source in SOURCES:
        completed = subprocess.run([compiler, *FLAGS, source], capture_output=True, text=True, timeout=600)
        if completed.returncode != 0:
            failures.append(f"{os.path.relpath(source, ROOT)}:\n{completed.stderr[-2000:]}")
    assert not failures, "\n".join(failures)


def test_the_sources_are_all_found():
    names = {os.path.relpath(source, ROOT) for source in SOURCES}
    assert {"csrc/fastcaps.cpp", "csrc/dynamic_routing/routing.cpp", "csrc/dynamic_routing/isa_baseline.cpp"} <= names


@pytest.mark.skipif(shutil.which("clang++") is None, reason="needs clang++ (apt-get install clang)")
def test_the_extension_compiles_with_clang():
    _compile_all("clang++")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs the aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
def test_the_extension_compiles_for_aarch64():
    _compile_all("aarch64-linux-gnu-g++")
