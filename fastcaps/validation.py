"""Argument checks shared by every routing entry point (the reference and the functional API):
errors name the argument and what was expected, so no backend ever sees input it would turn
into garbage. Also the one rule for the compute dtype of half inputs."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def check_routing_args(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool
) -> None:
    """Raise TypeError/ValueError unless (u, weight, bias, iterations, detach_routing) is a routing call."""
    for name, value in (("u", u), ("weight", weight)):
        if not isinstance(value, Tensor):
            raise TypeError(f"dynamic_routing: {name} must be a tensor, got {describe(value)}")
        if not value.is_floating_point():
            raise TypeError(
                f"dynamic_routing: {name} must be a floating-point tensor "
                f"(float16, bfloat16, float32 or float64), got {describe(value)}"
            )
    if u.dim() != 3:
        raise ValueError(
            f"dynamic_routing: u must have shape (batch, in_caps, in_dim), got {describe(u)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "dynamic_routing: weight must have shape (out_caps, in_caps, out_dim, in_dim), "
            f"got {describe(weight)}"
        )
    _, in_caps, in_dim = u.shape
    out_caps, w_in_caps, out_dim, w_in_dim = weight.shape
    if (w_in_caps, w_in_dim) != (in_caps, in_dim):
        raise ValueError(
            f"dynamic_routing: weight of shape {tuple(weight.shape)} expects u of shape "
            f"(batch, {w_in_caps}, {w_in_dim}), got u of shape {tuple(u.shape)}"
        )
    if out_caps < 1 or out_dim < 1 or in_dim < 1:
        raise ValueError(
            "dynamic_routing: out_caps, out_dim and in_dim must be at least 1, got weight of "
            f"shape {tuple(weight.shape)}"
        )
    _check_same(u, weight, "weight")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"dynamic_routing: bias must be a tensor or None, got {describe(bias)}")
        if tuple(bias.shape) != (out_caps, out_dim):
            raise ValueError(
                f"dynamic_routing: bias must have shape (out_caps, out_dim) = "
                f"({out_caps}, {out_dim}), got {describe(bias)}"
            )
        _check_same(u, bias, "bias")
    # bool is an int subclass; iterations=True is a bug, not 1.
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"dynamic_routing: iterations must be an int >= 1, got {describe(iterations)}")
    if iterations < 1:
        raise ValueError(f"dynamic_routing: iterations must be >= 1, got {iterations}")
    if not isinstance(detach_routing, bool):
        raise TypeError(f"dynamic_routing: detach_routing must be a bool, got {describe(detach_routing)}")


def _check_same(u: Tensor, other: Tensor, name: str) -> None:
    if other.device != u.device:
        raise ValueError(
            f"dynamic_routing: {name} is on {other.device} but u is on {u.device}; "
            "move both to one device"
        )
    if other.dtype != u.dtype:
        raise TypeError(
            f"dynamic_routing: {name} has dtype {other.dtype} but u has dtype {u.dtype}; "
            "cast both to one dtype (as torch.nn.Linear requires)"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in: float32 for half types, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def renamed_detach(detach_routing: bool, detach: Optional[bool], where: str) -> bool:
    """``detach_routing``, or the value of its old keyword ``detach`` with a warning.

    Not said while dynamo traces (it cannot trace warnings.warn); the eager call says it."""
    if detach is None:
        return detach_routing
    if not torch.compiler.is_compiling():
        warnings.warn(f"{where}: the keyword 'detach' is deprecated; use 'detach_routing' (same meaning)",
                      FutureWarning, stacklevel=3)
    return detach
