"""Load the C++ extension once, at import, without ever compiling it here.

If it is missing (a source checkout that was not installed) or stale (built against
another torch), fastcaps still imports and the pure-PyTorch backends work; one warning
says why and how to rebuild, and ``problem()`` returns that reason for error messages.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, List, Optional

import torch

REBUILD = "pip install --no-build-isolation -e .  (in the fastcaps source tree)"


def _load() -> Optional[str]:
    """Import fastcaps._C; return None if it works, else what is wrong with it."""
    from . import dynamic_routing

    try:
        from ... import _C  # noqa: F401  (registers the C++ kernels)
    except ImportError as error:
        # An undefined symbol here almost always means the build is for another torch.
        return f"the C++ extension fastcaps._C could not be loaded ({error})"
    built = torch.ops.fastcaps._built_with_torch()
    running = torch.__version__.split("+")[0]
    if built != running:
        return f"the C++ extension fastcaps._C was built against torch {built}, but torch {running} is running"
    try:
        dynamic_routing.define_schemas()
    except RuntimeError as error:
        # torch's message names the operator and the difference on lines of their own.
        lines = [line.strip() for line in str(error).splitlines()]
        reason = "; ".join(line for line in lines if line.startswith(("operator:", "reason:"))) or lines[0]
        return f"the C++ extension fastcaps._C is stale: its kernels do not match this fastcaps's schemas ({reason})"
    for op in _CPU_KERNELS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
            # An extension built from older fastcaps sources loads but lacks this kernel.
            return f"the C++ extension fastcaps._C is stale: it does not implement {op}"
    for name in _CPU_QUERIES:
        if not hasattr(torch.ops.fastcaps, name):
            return f"the C++ extension fastcaps._C is stale: it does not define fastcaps::{name}"
    try:
        isa = torch.ops.fastcaps._routing_cpu_isa()  # chooses the instruction-set build, once
    except RuntimeError as error:  # FASTCAPS_CPU_ISA names a build this CPU cannot run
        return str(error).splitlines()[0]
    dynamic_routing.read_kept_layout()
    global _isa
    _isa = isa
    return None


def isa() -> Optional[str]:
    """The instruction-set build of the C++ kernels that runs ("avx512", "avx2" or "baseline";
    FASTCAPS_CPU_ISA forces one), or None without the extension."""
    return _isa


def runnable_isas() -> List[str]:
    """The builds this CPU can run, widest first (empty without the extension)."""
    return list(torch.ops.fastcaps._routing_cpu_isas()) if _problem is None else []


# The flags of /proc/cpuinfo each wide build needs, widest first.
_BUILD_FLAGS = (("avx512", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}), ("avx2", {"avx2", "fma"}))


@functools.lru_cache(maxsize=None)
def cpu_fields() -> Dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags" on x86-64,
    "Features" on aarch64, ...); empty where there is no such file."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if ":" not in line:
                    if fields:
                        break  # the first processor is enough
                    continue
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        pass
    return fields


def _missing_wide_build() -> Optional[str]:
    """The widest build this CPU could run that the extension lacks (one compiled by clang
    has the baseline only), or None; None too when FASTCAPS_CPU_ISA picks the build."""
    if os.environ.get("FASTCAPS_CPU_ISA"):
        return None
    flags = set(cpu_fields().get("flags", "").split())  # x86-64 only: aarch64 has one build
    built = runnable_isas()
    for build, needs in _BUILD_FLAGS:
        if needs <= flags:
            return None if build in built else build
    return None


def problem() -> Optional[str]:
    """None if the C++ extension is loaded and current, else why it is not usable."""
    return _problem


_CPU_KERNELS = ("fastcaps::routing_cpu_forward", "fastcaps::routing_cpu_backward", "fastcaps::votes_cpu_forward",
                "fastcaps::votes_cpu_backward", "fastcaps::em_cpu_forward", "fastcaps::em_cpu_backward")
_isa: Optional[str] = None
# Operators the extension defines in C++ (no dispatch key): a build from older sources lacks them.
_CPU_QUERIES = ("_routing_cpu_kept_layout", "_routing_cpu_isa", "_routing_cpu_isas")
_problem = _load()
if _problem is not None:
    warnings.warn(
        f"fastcaps: {_problem}. The C++ kernels are unavailable; the 'reference' and "
        f"'torch' backends still work. Rebuild with: {REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )
elif (_missing := _missing_wide_build()) is not None:
    warnings.warn(
        f"fastcaps: this CPU can run the {_missing} build of the C++ kernels, but the extension "
        f"was compiled without it (the wide x86 builds need GCC's target pragmas); the slower {_isa} build "
        f"runs. Rebuild with GCC: CXX=g++ {REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )
