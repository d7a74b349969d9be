"""squash and its backward in PyTorch, written to stay finite for every finite input: the
"torch" kernel's squash, and the autograd of ``fastcaps.functional.squash``.

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
