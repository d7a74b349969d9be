"""Which routing backend runs where, and how ``backend="auto"`` chooses.

- "reference": ``fastcaps.reference``, the paper's loop with autograd; any device, any dtype.
- "torch": the routing op's vectorized PyTorch kernel (DESIGN.md sections 2-3); any device.
- "cpu": the fused C++ kernels (csrc/routing_cpu.cpp); CPU tensors, when the extension is
  built.
- "triton": the fused Triton kernels (fastcaps/_routing_triton.py); CUDA tensors, or CPU
  tensors when TRITON_INTERPRET=1 was set before triton was imported (the interpreter: slow,
  for validating the kernels on a machine without a GPU; "auto" never picks it).

``"auto"`` takes the FASTCAPS_BACKEND environment variable if it is set, else the fastest
kernel for the tensor's device. When that is not the device's first choice (the C++
extension is not built, triton is not installed), the first such call warns once per device
type, naming the kernel it runs and why the faster one cannot. Forcing a backend that cannot
run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Dict, List, Optional, Set, Tuple, Union

import torch

from . import _extension

__all__ = ["BACKENDS", "AUTO_ORDER", "auto_order", "available_backends", "resolve_backend"]

BACKENDS = ("reference", "torch", "cpu", "triton")

# Fastest first, per device type; "auto" takes the first one that can run there: the fused
# kernels when they are built or installed, else the vectorized PyTorch kernel.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
_AUTO_ORDER_ELSEWHERE = ("torch",)

TRITON_INSTALL = "pip install triton  (Linux; CUDA tensors need an NVIDIA GPU)"


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """The backends "auto" considers on ``device``, fastest first."""
    return AUTO_ORDER.get(device.type, _AUTO_ORDER_ELSEWHERE)


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """None if the Triton kernels import, else why not. Probed once (importing triton),
    not on every routing call that resolves a backend."""
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed. Install it with: {TRITON_INSTALL}"
    try:
        from . import _routing_triton  # noqa: F401
    except Exception as error:  # a broken or incompatible triton fails in many ways
        return f"the Triton kernels could not be loaded ({type(error).__name__}: {error})"
    return None


def _triton_reason(device: torch.device) -> Optional[str]:
    problem = triton_problem()
    if problem is not None:
        return problem
    from . import _routing_triton

    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _routing_triton.INTERPRETED:
            return None
        return ("the Triton kernels take CUDA tensors; they run on CPU tensors only under the Triton "
                "interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is "
                "imported (slow: for validation)")
    return f"the Triton kernels take CUDA tensors, not {device.type} tensors"


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    if backend in ("reference", "torch"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return "the C++ kernels take CPU tensors; use 'torch' (or a GPU backend) for other devices"
        problem = _extension.problem()
        if problem is not None:
            return f"{problem}. Build it with: {_extension.REBUILD}"
        return None
    if backend == "triton":
        return _triton_reason(device)
    raise AssertionError(f"no availability rule for backend {backend!r}")


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """The backends that can run on ``device`` (default: CPU), in the order of BACKENDS."""
    device = torch.device("cpu" if device is None else device)
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None]


# Device types whose "auto" fallback has been announced (see _announce_fallback).
_announced_fallbacks: Set[str] = set()


def _resolve_auto(device: torch.device) -> str:
    """The first backend of ``auto_order(device)`` that can run, announcing a fallback."""
    passed_over = []
    for name in auto_order(device):
        reason = _unavailable_reason(name, device)
        if reason is None:
            if passed_over:
                _announce_fallback(device, name, passed_over)
            return name
        passed_over.append((name, reason))
    raise AssertionError(f"no backend in auto_order({device}) can run; 'torch' always can")


def _announce_fallback(device: torch.device, chosen: str, passed_over: List[Tuple[str, str]]) -> None:
    """Warn, once per device type, that "auto" runs ``chosen`` instead of a faster kernel.
    Skipped while dynamo traces (it cannot trace warnings.warn, and a warning there would
    break the graph); the first eager call says it."""
    if device.type in _announced_fallbacks or torch.compiler.is_compiling():
        return
    _announced_fallbacks.add(device.type)
    reasons = "; ".join(f"{name!r} is unavailable: {reason}" for name, reason in passed_over)
    warnings.warn(
        f"fastcaps: backend='auto' on {device.type} tensors runs the {chosen!r} kernel, because {reasons}. "
        f"Pass backend={chosen!r} or set FASTCAPS_BACKEND={chosen} to choose it explicitly.",
        RuntimeWarning,
        stacklevel=5,  # the caller of dynamic_routing (here, _resolve_auto, resolve_backend, dynamic_routing)
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call on ``device``: "auto" resolved, a forced one checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTCAPS_BACKEND", "auto") or "auto"
        if backend == "auto":
            return _resolve_auto(device)
        source = "FASTCAPS_BACKEND"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(
            f"{source}={backend!r} is not a fastcaps backend; expected 'auto' or one of "
            f"{', '.join(repr(b) for b in BACKENDS)}"
        )
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{source}={backend!r} cannot run on {device}: {reason}")
    return backend
