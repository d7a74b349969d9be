"""Each backend's kernels, a folder per backend, and the one contract their launchers meet.

    kernels/torch/    the "torch" backend: the executable spec in vectorized PyTorch
    kernels/cpu/      the "cpu" backend: launchers of the C++ kernels (csrc/), and the
                      loader of the extension
    kernels/triton/   the "triton" backend: Triton kernels and their launchers

A backend's folder holds one module per op, named as the op's module in ``fastcaps/ops/``
(``dynamic_routing.py``), and that module exports ``KERNELS``: a ``RoutingKernels`` for
that op. ``fastcaps.backends`` finds it by that name, so a new op needs no registry edit
and a new backend needs one registry entry (docs/architecture.md).

The contract of a dynamic-routing kernel pair (every backend, forward and backward):

    forward(u, weight, bias, iterations, detach_routing, leaky) -> (v, s, kept_u_hat)
        u (B, I, Din) and weight (J, I, D, Din) in one floating dtype, bias (J, D) or None;
        v (B, J, D) in u's dtype; s (B, r, J, D), each iteration's pre-squash sum, in the
        compute dtype (``compute_dtype``: float32 for half inputs); kept_u_hat, what the
        kernel keeps of u_hat for its own backward, in its own layout: a 1-D tensor of
        ``kept_numel(...)`` elements of the compute dtype, empty for kernels that keep
        nothing. ``detach_routing`` changes only the backward; ``leaky`` adds a zero logit to
        every child's softmax over the parents (DESIGN.md section 7).
    backward(grad_v, u, weight, bias, s, kept_u_hat, iterations, detach_routing, leaky)
        -> (grad_u, grad_weight, grad_bias), in the dtypes of u, weight and weight;
        grad_bias is (J, D) even without a bias.
    kept_numel(batch, in_caps, out_caps, out_dim, dtype) -> int
        the size of kept_u_hat for a call, from shapes alone: the op's fake tensor (for
        torch.compile and meta tensors) is built from it, so it must be the forward's.

Inputs reach a launcher checked (``fastcaps.validation``), on one device, but in any
layout: making them contiguous is the launcher's job.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Tuple

import torch
from torch import Tensor

from ..validation import compute_dtype

__all__ = ["RoutingKernels", "compute_dtype", "keeps_nothing", "row_chunks"]


class RoutingKernels(NamedTuple):
    forward: Callable[..., Tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., Tuple[Tensor, Tensor, Tensor]]
    kept_numel: Callable[[int, int, int, int, torch.dtype], int]


def row_chunks(rows: int, per_row: int, limit: int) -> Iterator[slice]:
    """Consecutive ranges of ``rows`` rows holding at most ``limit`` values of ``per_row`` each
    (at least one row per range): how the launchers bound what they hold at once. The ranges
    depend on the shapes alone, never on the thread count."""
    step = max(1, limit // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def keeps_nothing(batch: int, in_caps: int, out_caps: int, out_dim: int, dtype: torch.dtype) -> int:
    """``kept_numel`` of kernels whose backward recomputes u_hat from u and W."""
    return 0
