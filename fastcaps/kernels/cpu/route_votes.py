"""Launchers of the C++ kernels for routing from given votes (csrc/dynamic_routing/votes.h),
the "cpu" backend of ``fastcaps::route_votes``. The dense kernels' passes route them, each
sample's votes transposed into its lane-layout buffer where the dense passes predict u_hat;
the backward recomputes the couplings from the votes and s (nothing per iteration kept).
Votes in float32 or float64 go to the kernels in one call; half votes compute in float32,
converted in chunks of rows (``_CHUNK_ELEMENTS``) so that the converted copy stays bounded.

Layouts: votes (N, I, J, D), bias (J, D), v (N, J, D), s (N, r, J, D).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .. import compute_dtype, row_chunks
from ..torch.route_votes import VotesKernels

# Votes converted at once: 2^22 float32 = 16 MiB (at least one row).
_CHUNK_ELEMENTS = 1 << 22


def _chunks(votes: Tensor) -> Iterator[slice]:
    return row_chunks(votes.shape[0], votes[0].numel() if votes.shape[0] else 1, _CHUNK_ELEMENTS)


def votes_forward(votes: Tensor, bias: Optional[Tensor], iterations: int, leaky: bool) -> Tuple[Tensor, Tensor]:
    dtype = compute_dtype(votes.dtype)
    bias_flat = votes.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    if votes.dtype == dtype:  # nothing to convert: one call, its outputs returned as they are
        return torch.ops.fastcaps.votes_cpu_forward(votes.contiguous(), bias_flat, iterations, leaky)
    rows, _, out_caps, out_dim = votes.shape
    v = votes.new_empty(rows, out_caps, out_dim)
    s = votes.new_empty(rows, iterations, out_caps, out_dim, dtype=dtype)
    for chunk in _chunks(votes):
        v[chunk], s[chunk] = torch.ops.fastcaps.votes_cpu_forward(votes[chunk].to(dtype).contiguous(), bias_flat,
                                                                  iterations, leaky)
    return v, s


def votes_backward(grad_v: Tensor, votes: Tensor, s: Tensor, iterations: int, detach_routing: bool,
                   leaky: bool) -> Tuple[Tensor, Tensor]:
    dtype = s.dtype
    if votes.dtype == dtype:
        return torch.ops.fastcaps.votes_cpu_backward(grad_v.to(dtype).contiguous(), votes.contiguous(),
                                                     s.contiguous(), iterations, detach_routing, leaky)
    grad_votes = torch.empty_like(votes)
    grad_bias = s.new_zeros(s.shape[2:])
    for chunk in _chunks(votes):
        grad_chunk, grad_bias_chunk = torch.ops.fastcaps.votes_cpu_backward(
            grad_v[chunk].to(dtype).contiguous(), votes[chunk].to(dtype).contiguous(), s[chunk].contiguous(),
            iterations, detach_routing, leaky)
        grad_votes[chunk] = grad_chunk
        grad_bias += grad_bias_chunk
    return grad_votes, grad_bias


KERNELS = VotesKernels(votes_forward, votes_backward)
