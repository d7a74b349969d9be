"""Which routing backend runs where, and how ``backend="auto"`` chooses.

- "reference": ``fastcaps.reference``, the paper's loop with autograd; any device, any dtype.
- "torch": the routing op's vectorized PyTorch kernel (DESIGN.md sections 2-3); any device.
- "cpu": the fused C++ kernels (csrc/routing_cpu.cpp); CPU tensors, when the extension is
  built.
- "triton": the fused Triton kernels (fastcaps/_routing_triton.py); CUDA tensors, or CPU
  tensors when TRITON_INTERPRET=1 was set before triton was imported (the interpreter: slow,
  for validating the kernels on a machine without a GPU; "auto" never picks it).

``"auto"`` takes the FASTCAPS_BACKEND environment variable if it is set, else the fastest
kernel for the tensor's device. Forcing a backend that cannot run raises; nothing falls
back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Dict, List, Optional, Tuple, Union

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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call on ``device``: "auto" resolved, a forced one checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTCAPS_BACKEND", "auto") or "auto"
        if backend == "auto":
            return next(
                name for name in auto_order(device) if _unavailable_reason(name, device) is None
            )
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
