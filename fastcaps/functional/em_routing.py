"""``fastcaps.functional.em_routing``, ``conv_em_routing`` and ``em_route_votes``: EM routing
between matrix capsules (Hinton, Sabour & Frosst 2018). Validation and backend choice, then
the op (``fastcaps::em_routing``), or the reference for backend="reference".

The ``torch`` backend has EM kernels (the executable spec, with a hand-written backward);
the fused C++ and Triton kernels are the next step, so ``backend="auto"`` takes ``torch`` on
every device, and naming ``cpu`` or ``triton`` is an error that says so. ``em_route_votes``
runs the reference. The algorithm, its options and their defaults: docs/em.md.
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor

from .. import ops, reference
from ..backends import resolve_backend
from ..validation import check_em_args, check_em_votes_args, checked_conv_em_call, inverse_temperatures

__all__ = ["em_routing", "conv_em_routing", "em_route_votes"]

Lambda = Union[float, Sequence[float]]


def em_routing(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
               iterations: int = 3, inverse_temperature: Lambda = 0.01, detach_routing: bool = False,
               coordinate_addition: bool = False, *, eps: float = 1e-8, variance_floor: float = 1e-6,
               backend: str = "auto"):
    """EM routing from every child to every parent: a fully connected or class capsule layer.

    Args:
        poses: (B, I, P, P) child poses, or (B, I, P, P, H, W) on a grid, whose I types each
            share one weight across the H x W positions (the paper's class capsules).
        activations: (B, I) or (B, I, H, W), in [0, 1].
        weight: (J, I, P, P); child i votes V_ij = M_i @ weight[j, i].
        beta_u, beta_a: (J,): the cost of describing a parent's poses, and its activation's
            offset, per output capsule type (learned).
        iterations: EM iterations >= 1.
        inverse_temperature: lambda, one number or one per iteration (a schedule).
        detach_routing: every iteration but the last runs on detached votes, activations
            and betas (the responsibilities get no gradient).
        coordinate_addition: on a grid, add each child's scaled position ((y + 0.5) / H,
            (x + 0.5) / W) to the first two entries of the last column of its votes.
        eps: sum_i r_ij is clamped to at least eps before it divides.
        variance_floor: added to every sigma^2, so sigma > 0 when votes agree exactly.
        backend: "auto" (``torch``: no fused EM kernel yet), "torch" or "reference".

    Returns:
        (poses, activations) of the parents, (B, J, P, P) and (B, J), in poses' dtype
        (float16/bfloat16 computed in float32).
    """
    lambdas = inverse_temperatures(inverse_temperature, iterations, "em_routing")
    check_em_args(poses, activations, weight, beta_u, beta_a, iterations, detach_routing, coordinate_addition, eps,
                  variance_floor)
    backend = resolve_backend(backend, poses.device, "em_routing", "em_routing")
    if backend == "reference":
        return reference.route_em(poses, activations, weight, beta_u, beta_a, lambdas, detach_routing,
                                  coordinate_addition, eps, variance_floor, upcast=True)
    out_poses, out_activations, _ = ops.em_routing(poses, activations, weight, beta_u, beta_a, lambdas, [1, 1],
                                                   [0, 0], [1, 1], "per_window", coordinate_addition,
                                                   detach_routing, float(eps), float(variance_floor), backend)
    return out_poses, out_activations


def conv_em_routing(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
                    iterations: int = 3, stride=1, padding=0, dilation=1, inverse_temperature: Lambda = 0.01,
                    normalization: str = "per_child", detach_routing: bool = False, *, eps: float = 1e-8,
                    variance_floor: float = 1e-6, backend: str = "auto"):
    """EM routing at every output position of a grid, from the capsules of its window.

    Args:
        poses: (B, I, P, P, H, W); activations: (B, I, H, W).
        weight: (J, I, Kh, Kw, P, P), one transform per kernel offset, input and output
            type, shared across positions.
        beta_u, beta_a: (J,).
        stride, padding, dilation: ints or pairs, as nn.Conv2d takes them; padding
            contributes capsules of activation 0.
        normalization: "per_child" (default, the paper: a child's responsibilities sum to 1
            over every parent of every window that holds it, so parents at different
            positions compete for it) or "per_window" (each position routes its own
            children; what most public implementations do).
        iterations, inverse_temperature, detach_routing, eps, variance_floor, backend: as
            ``em_routing``.

    Returns:
        (poses, activations): (B, J, P, P, H', W') and (B, J, H', W').
    """
    stride, padding, dilation, lambdas = checked_conv_em_call(
        poses, activations, weight, beta_u, beta_a, iterations, stride, padding, dilation, inverse_temperature,
        normalization, detach_routing, eps, variance_floor)
    backend = resolve_backend(backend, poses.device, "em_routing", "conv_em_routing")
    if backend == "reference":
        return reference.route_conv_em(poses, activations, weight, beta_u, beta_a, lambdas, stride, padding,
                                       dilation, normalization, detach_routing, eps, variance_floor, upcast=True)
    out_poses, out_activations, _ = ops.em_routing(poses, activations, weight, beta_u, beta_a, lambdas,
                                                   list(stride), list(padding), list(dilation), normalization, False,
                                                   detach_routing, float(eps), float(variance_floor), backend)
    return out_poses, out_activations


def em_route_votes(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int = 3,
                   inverse_temperature: Lambda = 0.01, detach_routing: bool = False, *, eps: float = 1e-8,
                   variance_floor: float = 1e-6, backend: str = "auto"):
    """EM routing from votes a layer computed itself.

    Args:
        votes: (..., I, J, H): child i's vote for parent j, H pose entries (16 for 4x4
            poses); any leading dimensions, each routed independently.
        activations: (..., I).
        beta_u, beta_a: (J,). The rest as ``em_routing``.

    Returns:
        (mu, activations): (..., J, H) and (..., J).
    """
    lambdas = inverse_temperatures(inverse_temperature, iterations, "em_route_votes")
    check_em_votes_args(votes, activations, beta_u, beta_a, iterations, detach_routing, eps, variance_floor)
    # Only the reference routes given votes: no backend has an "em_route_votes" kernel.
    resolve_backend(backend, votes.device, "em_route_votes", "em_route_votes")
    return reference.em_route_votes(votes, activations, beta_u, beta_a, iterations, lambdas, detach_routing,
                                    eps=eps, variance_floor=variance_floor, upcast=True)
