"""The paper's routing loop in plain PyTorch: the oracle every kernel is tested against.

Sabour, Frosst & Hinton (2017), "Dynamic Routing Between Capsules", Procedure 1. This
module is naive on purpose: it materializes the predictions u_hat and the logits b_ij,
lets autograd differentiate through every iteration, and runs on any device and dtype.
Read it beside the paper; do not optimise it. The fast paths live in
``fastcaps.kernels`` behind the op in ``fastcaps.ops``, and ``tests/test_reference.py``
proves this file against a second, loop-by-loop float64 computation.

Precision: by default the loop runs in the inputs' dtype, so that float16 and bfloat16 give
the same-dtype baseline of the three-run tolerance rule (|kernel - ref64| <= 2 |ref_same_dtype
- ref64| + atol). ``upcast=True`` computes half inputs in float32 and returns their dtype,
as every kernel does; the ``reference`` backend of ``fastcaps.dynamic_routing`` takes it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..validation import check_routing_args, compute_dtype, renamed_detach

__all__ = ["squash", "dynamic_routing", "route", "route_predictions", "leaky_softmax"]


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """Paper eq. (1): v = |s|^2 / (1 + |s|^2) * s / |s|, written as s * |s| / (1 + |s|^2).

    The second form needs no epsilon and is exactly 0 at s = 0, where the first form is 0/0.
    """
    norm = torch.linalg.vector_norm(s, dim=dim, keepdim=True)
    return s * norm / (1 + norm * norm)


def dynamic_routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    iterations: int = 3,
    detach_routing: bool = False,
    return_couplings: bool = False,
    *,
    upcast: bool = False,
    leaky: bool = False,
    detach: Optional[bool] = None,
) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """Routing-by-agreement, Procedure 1 of the paper.

    Args:
        u: input capsules, (B, I, Din).
        weight: transformation matrices W_ij, (J, I, D, Din).
        bias: optional (J, D), added to s_j in every iteration.
        iterations: r >= 1.
        detach_routing: stop the gradient through the routing: every iteration but the
            last runs on u_hat and bias detached, so the last couplings c are constants.
        return_couplings: also return the couplings c of every iteration, each (B, I, J).
        upcast: compute float16/bfloat16 inputs in float32 and return their dtype.
        leaky: leaky routing (``leaky_softmax``): each child's softmax over the parents has an
            extra all-zero logit, so the first iteration's couplings are 1/(J+1).
        detach: the old name of ``detach_routing`` (deprecated).

    Returns:
        v, (B, J, D); with ``return_couplings`` the pair (v, [c_1, ..., c_r]).
    """
    detach_routing = renamed_detach(detach_routing, detach, "fastcaps.reference.dynamic_routing")
    check_routing_args(u, weight, bias, iterations, detach_routing, leaky)
    return route(u, weight, bias, iterations, detach_routing, return_couplings, upcast, leaky)


def route(u, weight, bias=None, iterations=3, detach_routing=False, return_couplings=False, upcast=False,
          leaky=False):
    """``dynamic_routing`` without the argument checks, for callers that made them."""
    dtype = compute_dtype(u.dtype)
    if upcast and dtype != u.dtype:
        wide = route(u.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), iterations,
                     detach_routing, return_couplings, leaky=leaky)
        if return_couplings:
            return wide[0].to(u.dtype), [c.to(u.dtype) for c in wide[1]]
        return wide.to(u.dtype)
    # u_hat[b, i, j] = W[j, i] @ u[b, i]: every input capsule's prediction of every output.
    u_hat = torch.einsum("jide,bie->bijd", weight, u)
    return route_predictions(u_hat, bias, iterations, detach_routing, return_couplings, leaky)


def route_predictions(u_hat, bias=None, iterations=3, detach_routing=False, return_couplings=False, leaky=False):
    """Procedure 1 from the predictions u_hat, (B, I, J, D): the loop every routing reference
    shares (dense, convolutional per position, and routing from given votes)."""
    batch, in_caps, out_caps, _ = u_hat.shape

    # Logits b_ij start at zero for every sample, on every call.
    logits = u_hat.new_zeros(batch, in_caps, out_caps)
    couplings = []
    v = None
    for iteration in range(iterations):
        last = iteration == iterations - 1
        u_hat_t = u_hat if (last or not detach_routing) else u_hat.detach()
        bias_t = bias if (bias is None or last or not detach_routing) else bias.detach()

        # Each input capsule distributes itself over the OUTPUT capsules j.
        c = leaky_softmax(logits, dim=2) if leaky else torch.softmax(logits, dim=2)
        couplings.append(c)
        s = (c.unsqueeze(-1) * u_hat_t).sum(dim=1)
        if bias_t is not None:
            s = s + bias_t
        v = squash(s)
        if not last:
            # Agreement: b_ij += u_hat_j|i . v_j
            logits = logits + (u_hat_t * v.unsqueeze(1)).sum(dim=-1)

    if return_couplings:
        return v, couplings
    return v


def leaky_softmax(logits: Tensor, dim: int) -> Tensor:
    """The official TensorFlow code's ``_leaky_routing``: softmax over ``dim`` with one more,
    all-zero logit (an "orphan" parent) that is then dropped,
    c_ij = exp(b_ij) / (1 + sum_k exp(b_ik)). The couplings of a child sum to less than 1."""
    orphan = logits.new_zeros(logits.shape[:dim] + (1,) + logits.shape[dim + 1:])
    return torch.softmax(torch.cat([logits, orphan], dim=dim), dim=dim).narrow(dim, 0, logits.shape[dim])
