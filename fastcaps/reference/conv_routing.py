"""Convolutional capsules and routing from given votes, in plain PyTorch: the oracles.

A convolutional capsule layer routes independently at every output position (b, y, x), from
the Kh x Kw x I capsules of its window (DESIGN.md section 7):

    u_hat[b, y, x, (i, kh, kw), j] = W[j, i, kh, kw] @ u[b, i, :, y*sh + kh*dh - ph, x*sw + kw*dw - pw]

then Procedure 1 over those children. Padding contributes zero capsules, which vote 0. This
module is naive on purpose, as ``dynamic_routing.py`` is: it gathers every window of the batch
(``F.unfold``), materializes every vote, and lets autograd differentiate through every
iteration; ``tests/test_conv_routing.py`` proves it against an explicit loop over positions.

Layouts: u (B, I, Din, H, W), the output of a convolution with I * Din channels viewed
without a copy (``PrimaryCaps(grid=True)``); weight (J, I, Kh, Kw, D, Din); bias (J, D);
v (B, J, D, H', W'), the next layer's u. Children are ordered (i, kh, kw), as F.unfold orders
them and as PrimaryCaps flattens its grid, so a window that covers the whole grid
(Kh = H, Kw = W, padding 0) is DigitCaps with ``weight.reshape(J, I * H * W, D, Din)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_conv_routing_args, check_votes_args, compute_dtype, conv_output_size, pair
from .dynamic_routing import route_predictions

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
    *,
    upcast: bool = False,
) -> Tensor:
    """Dynamic routing at every output position from the capsules of its window.

    Args:
        u: (B, I, Din, H, W) input capsules on a grid.
        weight: (J, I, Kh, Kw, D, Din); W[j, i, kh, kw] is the D x Din transform of child
            (i, kh, kw) of every window, shared across positions.
        bias: optional (J, D), added to s_j before squash in every iteration.
        stride, padding, dilation: ints or pairs, as nn.Conv2d takes them.
        detach_routing, leaky: as ``fastcaps.reference.dynamic_routing``.
        upcast: compute float16/bfloat16 inputs in float32 and return their dtype.

    Returns:
        v: (B, J, D, H', W').
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    check_conv_routing_args(u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky)
    return route_conv(u, weight, bias, iterations, stride, padding, dilation, detach_routing, leaky, upcast)


def route_conv(u, weight, bias, iterations, stride, padding, dilation, detach_routing=False, leaky=False,
               upcast=False):
    """``conv_dynamic_routing`` without the argument checks (pairs already), for callers that made them."""
    dtype = compute_dtype(u.dtype)
    if upcast and dtype != u.dtype:
        return route_conv(u.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), iterations,
                          stride, padding, dilation, detach_routing, leaky).to(u.dtype)
    batch, in_caps, in_dim, height, width = u.shape
    out_caps, _, kh, kw, out_dim, _ = weight.shape
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    # Every window of the batch: (B, I * Din * Kh * Kw, H' * W'), channels (i, e, kh, kw).
    columns = F.unfold(u.reshape(batch, in_caps * in_dim, height, width), (kh, kw), dilation, padding, stride)
    windows = columns.view(batch, in_caps, in_dim, kh, kw, out_h * out_w)
    # Every vote: u_hat[b, position, (i, kh, kw), j, d].
    u_hat = torch.einsum("jiklde,biekln->bnikljd", weight, windows)
    u_hat = u_hat.reshape(batch * out_h * out_w, in_caps * kh * kw, out_caps, out_dim)
    v = route_predictions(u_hat, bias, iterations, detach_routing, leaky=leaky)
    return v.view(batch, out_h, out_w, out_caps, out_dim).permute(0, 3, 4, 1, 2)


def route_votes(
    votes: Tensor,
    bias: Optional[Tensor] = None,
    iterations: int = 3,
    detach_routing: bool = False,
    leaky: bool = False,
    *,
    upcast: bool = False,
) -> Tensor:
    """Procedure 1 from votes a layer computed itself: votes (..., I, J, D), any leading
    dimensions (batch, positions), each routed independently; returns v (..., J, D)."""
    check_votes_args(votes, bias, iterations, detach_routing, leaky)
    return route_given_votes(votes, bias, iterations, detach_routing, leaky, upcast)


def route_given_votes(votes, bias=None, iterations=3, detach_routing=False, leaky=False, upcast=False):
    """``route_votes`` without the argument checks."""
    dtype = compute_dtype(votes.dtype)
    if upcast and dtype != votes.dtype:
        wide = route_given_votes(votes.to(dtype), None if bias is None else bias.to(dtype), iterations,
                                 detach_routing, leaky)
        return wide.to(votes.dtype)
    *leading, in_caps, out_caps, out_dim = votes.shape
    v = route_predictions(votes.reshape(-1, in_caps, out_caps, out_dim), bias, iterations, detach_routing,
                          leaky=leaky)
    return v.view(*leading, out_caps, out_dim)
