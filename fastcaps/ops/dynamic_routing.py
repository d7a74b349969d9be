"""The dynamic-routing custom ops: ``fastcaps::routing`` and its backward ``fastcaps::routing_backward``.

One schema, one fake implementation (for torch.compile and meta tensors), one autograd
registration; the ``backend`` argument picks the kernels (``fastcaps.backends.kernels``).
Callers resolve "auto" before calling (``fastcaps.functional.dynamic_routing`` does), so the
op always receives a concrete backend, and the backward runs the same backend as the forward.

    routing(u, weight, bias?, iterations, detach_routing, leaky, backend) -> (v, s, kept_u_hat)
    routing_backward(grad_v, u, weight, bias?, s, kept_u_hat, iterations, detach_routing, leaky, backend)
        -> (grad_u, grad_weight, grad_bias)

Shapes, dtypes and what kept_u_hat is: the kernel contract, fastcaps/kernels/__init__.py.
s and kept_u_hat are saved for the backward and are not differentiable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import kernels
from ..validation import compute_dtype


@torch.library.custom_op("fastcaps::routing", mutates_args=())
def routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    iterations: int,
    detach_routing: bool,
    leaky: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, device=u.device).forward(u, weight, bias, iterations, detach_routing, leaky)


@routing.register_fake
def _routing_fake(u, weight, bias, iterations, detach_routing, leaky, backend):
    out_caps, in_caps, out_dim, _ = weight.shape
    batch = u.shape[0]
    dtype = compute_dtype(u.dtype)
    v = u.new_empty(batch, out_caps, out_dim)
    s = u.new_empty(batch, iterations, out_caps, out_dim, dtype=dtype)
    kept_u_hat = u.new_empty(kernels(backend).kept_numel(batch, in_caps, out_caps, out_dim, u.dtype), dtype=dtype)
    return v, s, kept_u_hat


@torch.library.custom_op("fastcaps::routing_backward", mutates_args=())
def routing_backward(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    s: Tensor,
    kept_u_hat: Tensor,
    iterations: int,
    detach_routing: bool,
    leaky: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels(backend, device=u.device).backward(grad_v, u, weight, bias, s, kept_u_hat, iterations,
                                                      detach_routing, leaky)


@routing_backward.register_fake
def _routing_backward_fake(grad_v, u, weight, bias, s, kept_u_hat, iterations, detach_routing, leaky, backend):
    out_caps, _, out_dim, _ = weight.shape
    return torch.empty_like(u), torch.empty_like(weight), weight.new_empty(out_caps, out_dim)


def _setup_context(ctx, inputs, output):
    u, weight, bias, iterations, detach_routing, leaky, backend = inputs
    _, s, kept_u_hat = output
    ctx.mark_non_differentiable(s, kept_u_hat)
    ctx.save_for_backward(u, weight, bias, s, kept_u_hat)
    ctx.iterations, ctx.detach_routing, ctx.leaky, ctx.backend = iterations, detach_routing, leaky, backend


def _backward(ctx, grad_v, _grad_s, _grad_kept_u_hat):
    u, weight, bias, s, kept_u_hat = ctx.saved_tensors
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.routing_backward(
        grad_v, u, weight, bias, s, kept_u_hat, ctx.iterations, ctx.detach_routing, ctx.leaky, ctx.backend
    )
    return grad_u, grad_weight, (None if bias is None else grad_bias), None, None, None, None


routing.register_autograd(_backward, setup_context=_setup_context)
