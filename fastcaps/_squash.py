"""squash and its backward, written to stay finite for every finite input.

With n = |s|:  squash(s) = a * s,  a = n / (1 + n^2) = 1 / (n + 1/n).
The Jacobian is symmetric (DESIGN.md section 1):

    J(s) g = a g + a * (1 - n^2) / (1 + n^2) * s_hat (s_hat . g),   s_hat = s / n

The forms used here avoid the overflows of the textbook ones: 1 / (n + 1/n) is 0 at
n = 0 and at n = inf, and (1 - n^2) / (1 + n^2) = 2 / (1 + n^2) - 1 is finite for every n.
At s = 0 the second term is taken as 0 (it is O(n^2)), so J(0) g = 0.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._validation import describe


def _norm_and_scale(s: Tensor) -> Tuple[Tensor, Tensor]:
    """n = |s| over the last dim and a = n / (1 + n^2), both with a kept last dim."""
    # |s| taken on s / max|s_k|: its squares can neither overflow (|s| ~ 1e30 in float32 would
    # give n = inf and v = 0) nor underflow.
    largest = s.abs().amax(dim=-1, keepdim=True)
    norm = largest * torch.linalg.vector_norm(s / torch.where(largest > 0, largest, 1), dim=-1, keepdim=True)
    # 1/0 = inf and 1/inf = 0 are exact in IEEE arithmetic: a = 0 at n = 0.
    scale = torch.reciprocal(norm + torch.reciprocal(norm))
    return norm, scale


def squash_forward(s: Tensor) -> Tensor:
    """squash over the last dim, without autograd concerns (used inside custom ops)."""
    return s * _norm_and_scale(s)[1]


def squash_backward(s: Tensor, grad: Tensor) -> Tensor:
    """dL/ds given dL/dv for v = squash(s) over the last dim: J(s) grad."""
    norm, scale = _norm_and_scale(s)
    positive = norm > 0
    unit = torch.where(positive, s / torch.where(positive, norm, torch.ones_like(norm)), 0)
    radial = 2 / (1 + norm * norm) - 1
    along = (unit * grad).sum(dim=-1, keepdim=True)
    return scale * (grad + radial * along * unit)


class _Squash(torch.autograd.Function):
    """Autograd for ``fastcaps.functional.squash`` through the closed-form Jacobian, so
    the gradient at s = 0 is exactly 0 instead of autograd's 0 * inf."""

    @staticmethod
    def forward(s: Tensor) -> Tensor:
        return squash_forward(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        return squash_backward(s, grad)


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """squash along ``dim``: v = s * |s| / (1 + |s|^2); 0 at s = 0, finite gradient everywhere."""
    if not isinstance(s, Tensor) or not s.is_floating_point():
        raise TypeError(f"squash: s must be a floating-point tensor, got {describe(s)}")
    if s.dim() == 0:
        raise ValueError("squash: s must have at least one dimension (the capsule's vector)")
    moved = s.movedim(dim, -1)
    return _Squash.apply(moved).movedim(-1, dim)
