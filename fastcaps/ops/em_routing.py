"""EM routing, the custom ops: ``fastcaps::em_routing`` and ``fastcaps::em_routing_backward``.

    em_routing(poses, activations, weight, beta_u, beta_a, lambdas, stride, padding, dilation,
               normalization, coordinate_addition, detach_routing, eps, variance_floor, backend)
        -> (poses_out, activations_out, state)
    em_routing_backward(grad_poses_out, grad_activations_out, poses, activations, weight, beta_u,
                        beta_a, state, <the same options>) -> (grad_poses, grad_activations,
                        grad_weight, grad_beta_u, grad_beta_a)

The op forms the votes itself from poses and W. A weight of shape (J, I, Kh, Kw, P, P) is a
convolutional layer (poses (B, I, P, P, H, W); out (B, J, P, P, H', W'), (B, J, H', W')); one
of shape (J, I, P, P) routes every capsule of a sample to every parent (poses (B, I, P, P), or
(B, I, P, P, H, W) with W shared across positions; out (B, J, P, P), (B, J)). lambdas has one
inverse temperature per iteration. state (B * windows, r - 1, J, 2 P^2 + 1) is what the
kernel keeps for the backward (the parents' mu, sigma^2 and log a of every iteration but the
last), not differentiable. The backend's kernels are ``KERNELS`` of
fastcaps/kernels/<backend>/em_routing.py. Callers resolve "auto" first.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from ..backends import kernels
from ..kernels.em_layer import EMLayer, Options
from ..validation import compute_dtype


def _options(stride, padding, dilation, normalization, coordinate_addition, detach_routing, eps, variance_floor):
    return Options(tuple(stride), tuple(padding), tuple(dilation), normalization, coordinate_addition, detach_routing,
                   eps, variance_floor)


@torch.library.custom_op("fastcaps::em_routing", mutates_args=())
def em_routing(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
               lambdas: List[float], stride: List[int], padding: List[int], dilation: List[int], normalization: str,
               coordinate_addition: bool, detach_routing: bool, eps: float, variance_floor: float,
               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    options = _options(stride, padding, dilation, normalization, coordinate_addition, detach_routing, eps,
                       variance_floor)
    return kernels(backend, "em_routing", poses.device).forward(poses, activations, weight, beta_u, beta_a, lambdas,
                                                                options)


@em_routing.register_fake
def _em_routing_fake(poses, activations, weight, beta_u, beta_a, lambdas, stride, padding, dilation, normalization,
                     coordinate_addition, detach_routing, eps, variance_floor, backend):
    layer = EMLayer(poses.shape, weight.shape, _options(stride, padding, dilation, normalization,
                                                        coordinate_addition, detach_routing, eps, variance_floor))
    batch, side, out_caps = poses.shape[0], poses.shape[2], weight.shape[0]
    grid = (layer.poses_geometry.out_h, layer.poses_geometry.out_w) if layer.conv else ()
    return (poses.new_empty(batch, out_caps, side, side, *grid), poses.new_empty(batch, out_caps, *grid),
            poses.new_empty(batch * layer.windows, len(lambdas) - 1, out_caps, 2 * side * side + 1,
                            dtype=compute_dtype(poses.dtype)))


@torch.library.custom_op("fastcaps::em_routing_backward", mutates_args=())
def em_routing_backward(grad_poses_out: Tensor, grad_activations_out: Tensor, poses: Tensor, activations: Tensor,
                        weight: Tensor, beta_u: Tensor, beta_a: Tensor, state: Tensor, lambdas: List[float],
                        stride: List[int], padding: List[int], dilation: List[int], normalization: str,
                        coordinate_addition: bool, detach_routing: bool, eps: float, variance_floor: float,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = _options(stride, padding, dilation, normalization, coordinate_addition, detach_routing, eps,
                       variance_floor)
    return kernels(backend, "em_routing", poses.device).backward(
        grad_poses_out, grad_activations_out, poses, activations, weight, beta_u, beta_a, state, lambdas, options)


@em_routing_backward.register_fake
def _em_routing_backward_fake(grad_poses_out, grad_activations_out, poses, activations, weight, beta_u, beta_a,
                              state, *options):
    return tuple(torch.empty_like(t) for t in (poses, activations, weight, beta_u, beta_a))


def _setup_context(ctx, inputs, output):
    poses, activations, weight, beta_u, beta_a, *options = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(poses, activations, weight, beta_u, beta_a, output[2])
    ctx.options = options


def _backward(ctx, grad_poses_out, grad_activations_out, _grad_state):
    poses, activations, weight, beta_u, beta_a, state = ctx.saved_tensors
    grads = torch.ops.fastcaps.em_routing_backward(grad_poses_out.contiguous(), grad_activations_out.contiguous(),
                                                   poses, activations, weight, beta_u, beta_a, state, *ctx.options)
    return (*grads, *([None] * len(ctx.options)))


em_routing.register_autograd(_backward, setup_context=_setup_context)
