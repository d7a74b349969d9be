"""Launcher for the fused C++ CPU kernels (csrc/routing_cpu.cpp), the "cpu" backend.

The kernels' schemas are defined here and implemented in C++ for the CPU dispatch key.
The kernels take weight in the DigitCaps layout (J, I, D, Din) and repack it themselves;
half inputs are computed in float32. The launcher returns tensors in the layouts of the
"torch" kernel (fastcaps/_routing_torch.py), whose contract it shares.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import compute_dtype

_LIBRARY = torch.library.Library("fastcaps", "FRAGMENT")
_LIBRARY.define("routing_cpu_forward(Tensor u, Tensor weight, Tensor bias, int iterations) -> (Tensor, Tensor)")
_LIBRARY.define(
    "routing_cpu_backward(Tensor grad_v, Tensor u, Tensor weight, Tensor s, int iterations, bool detach) "
    "-> (Tensor, Tensor, Tensor)"
)


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach: bool
) -> Tuple[Tensor, Tensor]:
    dtype = compute_dtype(u.dtype)
    bias_flat = u.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    v, s = torch.ops.fastcaps.routing_cpu_forward(
        u.to(dtype).contiguous(), weight.to(dtype).contiguous(), bias_flat, iterations
    )
    return v.to(u.dtype), s


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, iterations: int, detach: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = s.dtype
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.routing_cpu_backward(
        grad_v.to(dtype).contiguous(), u.to(dtype).contiguous(), weight.to(dtype).contiguous(), s.contiguous(),
        iterations, detach,
    )
    return grad_u.to(u.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
