"""``fastcaps.functional.conv_dynamic_routing`` and ``route_votes``: validation, backend
choice, then the op (or the reference for backend="reference")."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import ops, reference
from ..backends import resolve_backend
from ..validation import check_conv_routing_args, check_votes_args, pair

__all__ = ["conv_dynamic_routing", "route_votes"]


def conv_dynamic_routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    iterations: int = 3,
    stride=1,
    padding=0,
    dilation=1,
    detach_routing: bool = False,
    leaky: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Dynamic routing at every output position of a grid, from the capsules of its window.

    Each output position (b, y, x) runs Procedure 1 over the Kh x Kw x I capsules of its
    window, child (i, kh, kw) voting W[j, i, kh, kw] @ u[b, i, :, y*sh + kh*dh - ph,
    x*sw + kw*dw - pw]; padding contributes zero capsules (they vote 0). A window that
    covers the whole grid with no padding is ``dynamic_routing`` on the flattened grid.

    Args:
        u: (B, I, Din, H, W): the output of a convolution with I * Din channels, viewed
            without a copy (``PrimaryCaps(..., grid=True)`` returns this layout).
        weight: (J, I, Kh, Kw, D, Din).
        bias: optional (J, D), added to s_j before squash in every iteration.
        iterations: routing iterations r >= 1.
        stride, padding, dilation: ints or pairs, as nn.Conv2d takes them.
        detach_routing, leaky: as ``fastcaps.dynamic_routing``.
        backend: "auto" or one of ``fastcaps.BACKENDS``.

    Returns:
        v: (B, J, D, H', W') in u's dtype, H' and W' as nn.Conv2d computes them; the next
        convolutional capsule layer's u.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_conv_routing_args(u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky)
    backend = resolve_backend(backend, u.device)
    if backend == "reference":
        return reference.route_conv(u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky,
                                    upcast=True)
    v, _ = ops.conv_routing(u, weight, bias, iterations, list(stride), list(padding), list(dilation),
                            detach_routing, leaky, backend)
    return v


def route_votes(
    votes: Tensor,
    bias: Optional[Tensor] = None,
    iterations: int = 3,
    detach_routing: bool = False,
    leaky: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Procedure 1 from votes a layer computed itself (e.g. by a convolution).

    Args:
        votes: (..., I, J, D): child i's vote for parent j, any leading dimensions (batch,
            positions), each routed independently.
        bias, iterations, detach_routing, leaky: as ``fastcaps.dynamic_routing``.
        backend: "auto" (the C++ kernels on CPU, the Triton kernels on CUDA), "cpu",
            "triton", "torch" or "reference".

    Returns:
        v: (..., J, D) in votes' dtype.
    """
    check_votes_args(votes, bias, iterations, detach_routing, leaky)
    backend = resolve_backend(backend, votes.device, "route_votes", "route_votes")
    if backend == "reference":
        return reference.route_given_votes(votes, bias, iterations, detach_routing, leaky, upcast=True)
    v, _ = ops.route_votes(votes, bias, iterations, detach_routing, leaky, backend)
    return v
