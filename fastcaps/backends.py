"""Which routing backend runs where, and how ``backend="auto"`` chooses.

- "reference": ``fastcaps.reference``, the paper's loop with autograd; any device, any dtype.
- "torch": the routing op's vectorized PyTorch kernel (DESIGN.md sections 2-3); any device.
- "cpu": the fused C++ kernels (csrc/routing_cpu.cpp); CPU tensors, when the extension is
  built. Opt-in for now: correct and deterministic, not yet tuned.

``"auto"`` takes the FASTCAPS_BACKEND environment variable if it is set, else the fastest
kernel for the tensor's device. Forcing a backend that cannot run raises; nothing falls
back silently.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

import torch

from . import _extension

__all__ = ["BACKENDS", "AUTO_ORDER", "available_backends", "resolve_backend"]

BACKENDS = ("reference", "torch", "cpu")

# Fastest first; "auto" takes the first one that can run on the device: the fused C++
# kernels on CPU tensors when the extension is built, else the vectorized PyTorch kernel.
AUTO_ORDER = ("cpu", "torch")


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
                name for name in AUTO_ORDER if _unavailable_reason(name, device) is None
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
