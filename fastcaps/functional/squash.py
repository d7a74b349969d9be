"""``fastcaps.functional.squash``: the paper's nonlinearity with a closed-form Jacobian, so its
gradient is exactly 0 at s = 0 instead of autograd's 0 * inf."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.torch.squash import squash_backward, squash_forward
from ..validation import describe

__all__ = ["squash"]


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
