"""The registry of backends: which ones exist, where each runs, why one cannot, where its
kernels live, and how ``backend="auto"`` chooses. Everything that names backends reads it:
``available_backends``, "auto", the ops, ``fastcaps check`` and ``fastcaps bench``.

- "reference": ``fastcaps.reference``, the paper's loop with autograd; any device, any dtype.
- "torch": the vectorized PyTorch kernels (fastcaps/kernels/torch/, DESIGN.md sections 2-3).
- "cpu": the fused C++ kernels (csrc/, fastcaps/kernels/cpu/); CPU tensors, when the
  extension is built.
- "triton": the fused Triton kernels (fastcaps/kernels/triton/); CUDA tensors, or CPU
  tensors when TRITON_INTERPRET=1 was set before triton was imported (the interpreter: slow,
  for validating the kernels on a machine without a GPU; "auto" never picks it).

``"auto"`` takes the FASTCAPS_BACKEND environment variable if it is set, else the fastest
kernel for the tensor's device. When that is not the device's first choice (the C++
extension is not built, triton is not installed), the first such call warns once per device
type, naming the kernel it runs and why the faster one cannot. Forcing a backend that cannot
run raises; nothing falls back silently.

Words: a *backend* is what a user picks; a *kernel* is a backend's implementation of one op
(a ``fastcaps.kernels.RoutingKernels``: launchers for forward and backward). The reference
is a backend without kernels: it runs the paper's loop under autograd instead of the op.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

import torch

from .kernels import RoutingKernels
from .kernels.cpu import extension as _extension

__all__ = ["Backend", "REGISTRY", "BACKENDS", "auto_order", "available_backends", "resolve_backend", "kernels"]

TRITON_INSTALL = "pip install triton  (Linux; CUDA tensors need an NVIDIA GPU)"


def _runs_anywhere(device: torch.device) -> Optional[str]:
    return None


def _cpu_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return "the C++ kernels take CPU tensors; use 'torch' (or a GPU backend) for other devices"
    problem = _extension.problem()
    if problem is not None:
        return f"{problem}. Build it with: {_extension.REBUILD}"
    return None


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """None if the Triton kernels import, else why not. Probed once (importing triton),
    not on every routing call that resolves a backend."""
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed. Install it with: {TRITON_INSTALL}"
    try:
        from .kernels.triton import routing_jit  # noqa: F401  (an import statement: dynamo traces it)
    except Exception as error:  # a broken or incompatible triton fails in many ways
        return f"the Triton kernels could not be loaded ({type(error).__name__}: {error})"
    return None


@functools.lru_cache(maxsize=None)
def triton_interpreted() -> bool:
    """True when the Triton kernels run under the interpreter (TRITON_INTERPRET=1). Probed
    once, like triton_problem: the Triton kernels import."""
    from .kernels.triton import routing_jit

    return routing_jit.INTERPRETED


def _triton_reason(device: torch.device) -> Optional[str]:
    problem = triton_problem()
    if problem is not None:
        return problem
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreted():
            return None
        return ("the Triton kernels take CUDA tensors; they run on CPU tensors only under the Triton "
                "interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is "
                "imported (slow: for validation)")
    return f"the Triton kernels take CUDA tensors, not {device.type} tensors"


@dataclass(frozen=True)
class Backend:
    name: str
    devices: str  # where it runs, for people
    unavailable: Callable[[torch.device], Optional[str]]  # None if it runs on the device, else why not
    kernel_package: Optional[str]  # its folder under fastcaps/kernels/ (None: no op kernels, the reference)
    color: str  # its line in fastcaps bench's chart
    # Device types on which "auto" takes it, at this priority (higher first).
    auto: Tuple[Tuple[str, int], ...] = ()
    # Device types where it runs only slowly, to validate it: check and bench take it there
    # only when named.
    validation_only_on: Tuple[str, ...] = ()


REGISTRY: Dict[str, Backend] = {backend.name: backend for backend in (
    Backend("reference", "any", _runs_anywhere, None, "#7f7f7f"),
    Backend("torch", "any", _runs_anywhere, "torch", "#ff7f0e", auto=(("*", 0),)),
    Backend("cpu", "CPU, when the C++ extension is built", _cpu_reason, "cpu", "#2ca02c", auto=(("cpu", 10),)),
    Backend("triton", "CUDA; CPU under the Triton interpreter (TRITON_INTERPRET=1)", _triton_reason, "triton",
            "#d62728", auto=(("cuda", 10),), validation_only_on=("cpu",)),
)}
BACKENDS = tuple(REGISTRY)


def _auto_priority(backend: Backend, device_type: str) -> Optional[int]:
    priorities = dict(backend.auto)
    return priorities.get(device_type, priorities.get("*"))


def auto_order(device: torch.device) -> Tuple[str, ...]:
    """The backends "auto" considers on ``device``, fastest first."""
    ranked = []
    for name, backend in REGISTRY.items():
        priority = _auto_priority(backend, device.type)
        if priority is not None:
            ranked.append((-priority, name))
    return tuple(name for _, name in sorted(ranked))


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    return REGISTRY[backend].unavailable(device)


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """The backends that can run on ``device`` (default: CPU), in the order of BACKENDS."""
    device = torch.device("cpu" if device is None else device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def checked_by_default(device: Union[str, torch.device]) -> List[str]:
    """The available backends that check and bench take on ``device`` unless told otherwise:
    all but those that run there only to be validated (Triton's interpreter on CPU)."""
    device = torch.device(device)
    return [name for name in available_backends(device) if device.type not in REGISTRY[name].validation_only_on]


@functools.lru_cache(maxsize=None)
def _kernel_module(folder: str, op: str):
    return importlib.import_module(f"fastcaps.kernels.{folder}.{op}")


def kernels(backend: str, op: str = "dynamic_routing", device: Optional[torch.device] = None) -> RoutingKernels:
    """The kernels of ``backend`` for ``op``: ``KERNELS`` of fastcaps/kernels/<backend>/<op>.py,
    checked to run on ``device`` when one is given (the op's fake, for meta tensors too,
    gives none).

    The module is imported on first use (importing triton takes a while, and CPU users rarely
    need it) and its KERNELS read on every call, so a test can replace them."""
    entry = REGISTRY.get(backend)
    if entry is None or entry.kernel_package is None:
        with_kernels = [name for name, b in REGISTRY.items() if b.kernel_package is not None]
        raise ValueError(f"fastcaps::{op}: backend={backend!r} has no kernel; expected one of "
                         f"{', '.join(repr(name) for name in with_kernels)}")
    reason = None if device is None else entry.unavailable(device)
    if reason is not None:
        raise RuntimeError(f"fastcaps::{op}: backend={backend!r} cannot run on {device}: {reason}")
    return _kernel_module(entry.kernel_package, op).KERNELS


# Device types whose "auto" fallback has been announced (see _announce_fallback).
_announced_fallbacks: Set[str] = set()


def _resolve_auto(device: torch.device, op: str = "dynamic_routing") -> str:
    """The first backend of ``auto_order(device)`` with a kernel for ``op`` that can run,
    announcing a fallback; the reference when no backend has a kernel for ``op``."""
    passed_over = []
    candidates = [name for name in auto_order(device) if has_kernel(name, op)]
    if not candidates:
        return "reference"
    for name in candidates:
        reason = unavailable_reason(name, device)
        if reason is None:
            if passed_over:
                _announce_fallback(device, name, passed_over)
            return name
        passed_over.append((name, reason))
    _announce_fallback(device, "reference", passed_over)
    return "reference"


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


def has_kernel(backend: str, op: str) -> bool:
    """Whether ``backend`` implements ``op``: the reference implements every op; a kernel
    backend, when fastcaps/kernels/<folder>/<op>.py exists."""
    folder = REGISTRY[backend].kernel_package
    return folder is None or (folder, op) in _KERNEL_FILES


# (folder, op) for every fastcaps/kernels/<folder>/<op>.py, listed once at import (not
# imported; a set lookup, so that torch.compile traces has_kernel without a graph break).
_KERNEL_FILES = frozenset((path.parent.name, path.stem)
                          for path in (Path(__file__).resolve().parent / "kernels").glob("*/*.py"))


def resolve_backend(backend: str, device: torch.device, op: str = "dynamic_routing",
                    where: Optional[str] = None) -> str:
    """The concrete backend for a call of ``op`` on ``device``: "auto" resolved, a forced one
    checked. "auto" passes over the backends that have no kernel for ``op`` (the Triton
    kernels have none for em_routing) and takes the reference when none has; naming one of
    them is an error that says so, never a fallback."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTCAPS_BACKEND", "auto") or "auto"
        if backend == "auto":
            return _resolve_auto(device, op)
        source = "FASTCAPS_BACKEND"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(
            f"{source}={backend!r} is not a fastcaps backend; expected 'auto' or one of "
            f"{', '.join(repr(b) for b in BACKENDS)}"
        )
    if not has_kernel(backend, op):
        implemented = [name for name in BACKENDS if has_kernel(name, op)]
        raise ValueError(f"{where or op}: {source}={backend!r} has no kernel for {op} yet; expected one of "
                         f"{', '.join(repr(b) for b in implemented)}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{source}={backend!r} cannot run on {device}: {reason}")
    return backend
