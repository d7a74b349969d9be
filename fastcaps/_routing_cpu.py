"""Launcher for the fused C++ CPU kernels (csrc/routing_cpu.cpp), the "cpu" backend.

The kernels' schemas are defined here and implemented in C++ for the CPU dispatch key.
The launcher lays weight out as (I, Din, J*D), so that one input capsule's predictions
are Din contiguous multiply-adds over J*D values; computes half inputs in float32; and
returns tensors in the layouts of the "torch" kernel (fastcaps/_routing_torch.py), whose
contract it shares.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import compute_dtype

_LIBRARY = torch.library.Library("fastcaps", "FRAGMENT")
_LIBRARY.define(
    "routing_cpu_forward(Tensor u, Tensor weight_t, Tensor bias, int out_caps, int iterations) -> (Tensor, Tensor)"
)
_LIBRARY.define(
    "routing_cpu_backward(Tensor grad_v, Tensor u, Tensor weight_t, Tensor s, int out_caps, int iterations, "
    "bool detach) -> (Tensor, Tensor, Tensor)"
)


def _weight_t(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """(J, I, D, Din) -> (I, Din, J*D), contiguous."""
    out_caps, in_caps, out_dim, in_dim = weight.shape
    return weight.to(dtype).permute(1, 3, 0, 2).reshape(in_caps, in_dim, out_caps * out_dim).contiguous()


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach: bool
) -> Tuple[Tensor, Tensor]:
    dtype = compute_dtype(u.dtype)
    bias_flat = u.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).reshape(-1).contiguous()
    v, s = torch.ops.fastcaps.routing_cpu_forward(
        u.to(dtype).contiguous(), _weight_t(weight, dtype), bias_flat, weight.shape[0], iterations
    )
    return v.to(u.dtype), s


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, iterations: int, detach: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = s.dtype
    out_caps, in_caps, out_dim, in_dim = weight.shape
    grad_u, grad_weight_t, grad_bias = torch.ops.fastcaps.routing_cpu_backward(
        grad_v.to(dtype).contiguous(), u.to(dtype).contiguous(), _weight_t(weight, dtype), s.contiguous(),
        out_caps, iterations, detach,
    )
    grad_weight = grad_weight_t.view(in_caps, in_dim, out_caps, out_dim).permute(2, 0, 3, 1)
    return grad_u.to(u.dtype), grad_weight.to(weight.dtype).contiguous(), grad_bias.to(weight.dtype)
