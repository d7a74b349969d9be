"""The convolutional-routing custom ops: ``fastcaps::conv_routing`` and ``fastcaps::conv_routing_backward``.

    conv_routing(u, weight, bias?, iterations, stride, padding, dilation, detach_routing, leaky, backend)
        -> (v, s)
    conv_routing_backward(grad_v, u, weight, bias?, s, iterations, stride, padding, dilation,
                          detach_routing, leaky, backend) -> (grad_u, grad_weight, grad_bias)

Every backend serves them with its dynamic-routing kernels on gathered windows
(fastcaps/kernels/windows.py): u (B, I, Din, H, W), weight (J, I, Kh, Kw, D, Din), bias
(J, D); v (B, J, D, H', W'); s (B * H' * W', r, J, D), saved for the backward and not
differentiable. stride, padding and dilation are pairs. Callers resolve "auto" first
(``fastcaps.functional.conv_dynamic_routing`` does).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import kernels
from ..kernels.windows import Geometry, conv_backward, conv_forward
from ..validation import compute_dtype


@torch.library.custom_op("fastcaps::conv_routing", mutates_args=())
def conv_routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    iterations: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    detach_routing: bool,
    leaky: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    return conv_forward(kernels(backend, "dynamic_routing", u.device), u, weight, bias, iterations, stride,
                        padding, dilation, leaky)


@conv_routing.register_fake
def _conv_routing_fake(u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky, backend):
    geometry = Geometry(u.shape, weight.shape, stride, padding, dilation)
    batch = u.shape[0]
    v = u.new_empty(batch, geometry.out_caps, geometry.out_dim, geometry.out_h, geometry.out_w)
    s = u.new_empty(batch * geometry.positions, iterations, geometry.out_caps, geometry.out_dim,
                    dtype=compute_dtype(u.dtype))
    return v, s


@torch.library.custom_op("fastcaps::conv_routing_backward", mutates_args=())
def conv_routing_backward(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    s: Tensor,
    iterations: int,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    detach_routing: bool,
    leaky: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return conv_backward(kernels(backend, "dynamic_routing", u.device), grad_v, u, weight, bias, s, iterations,
                         stride, padding, dilation, detach_routing, leaky)


@conv_routing_backward.register_fake
def _conv_routing_backward_fake(grad_v, u, weight, bias, s, iterations, stride, padding, dilation, detach_routing,
                                leaky, backend):
    out_caps, out_dim = weight.shape[0], weight.shape[4]
    return torch.empty_like(u), torch.empty_like(weight), weight.new_empty(out_caps, out_dim)


def _setup_context(ctx, inputs, output):
    u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(u, weight, bias, s)
    ctx.options = (iterations, stride, padding, dilation, detach_routing, leaky, backend)


def _backward(ctx, grad_v, _grad_s):
    u, weight, bias, s = ctx.saved_tensors
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.conv_routing_backward(
        grad_v.contiguous(), u, weight, bias, s, *ctx.options)
    return grad_u, grad_weight, (None if bias is None else grad_bias), None, None, None, None, None, None, None


conv_routing.register_autograd(_backward, setup_context=_setup_context)
