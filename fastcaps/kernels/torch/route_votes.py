"""The "torch" backend's kernels for routing from given votes (``fastcaps::route_votes``).

The votes are the predictions u_hat themselves, so this is the dense kernels'
iterations and hand-written backward (dynamic_routing.py: ``route_chunk``,
``prediction_gradients``) without the prediction step: the forward keeps s per
iteration and nothing per iteration of the couplings or logits; the backward recomputes
them from the votes and s. Votes are taken in chunks, each permuted to the kernels'
(b, J, I, D) layout, so the memory beyond the votes and their gradient stays bounded.

Layouts: votes (N, I, J, D) (the op flattens the leading dimensions), bias (J, D),
v (N, J, D), s (N, r, J, D).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import compute_dtype, row_chunks
from .dynamic_routing import _CHUNK_ELEMENTS, prediction_gradients, route_chunk


class VotesKernels(NamedTuple):
    forward: object  # (votes, bias, iterations, leaky) -> (v, s)
    backward: object  # (grad_v, votes, s, iterations, detach_routing, leaky) -> (grad_votes, grad_bias)


def _chunks(votes: Tensor) -> Iterator[slice]:
    return row_chunks(votes.shape[0], votes[0].numel() if votes.shape[0] else 1, _CHUNK_ELEMENTS)


def _predictions(votes: Tensor) -> Tensor:
    """(b, I, J, D) -> the kernels' (b, J, I, D), contiguous."""
    return votes.permute(0, 2, 1, 3).contiguous()


def votes_forward(votes: Tensor, bias: Optional[Tensor], iterations: int, leaky: bool) -> Tuple[Tensor, Tensor]:
    dtype = compute_dtype(votes.dtype)
    rows, _, out_caps, out_dim = votes.shape
    bias_c = None if bias is None else bias.to(dtype)
    s = votes.new_empty(rows, iterations, out_caps, out_dim, dtype=dtype)
    v = votes.new_empty(rows, out_caps, out_dim, dtype=dtype)
    for chunk in _chunks(votes):
        v[chunk] = route_chunk(_predictions(votes[chunk].to(dtype)), bias_c, iterations, leaky, s[chunk])
    return v.to(votes.dtype), s


def votes_backward(grad_v: Tensor, votes: Tensor, s: Tensor, iterations: int, detach_routing: bool,
                   leaky: bool) -> Tuple[Tensor, Tensor]:
    """(grad_votes in votes' dtype, grad_bias (J, D) in the compute dtype)."""
    dtype = s.dtype
    grad_votes = torch.empty_like(votes)
    grad_bias = s.new_zeros(s.shape[2:])
    grad_v_c = grad_v.to(dtype)
    for chunk in _chunks(votes):
        grad_u_hat = prediction_gradients(_predictions(votes[chunk].to(dtype)), s[chunk], grad_v_c[chunk],
                                          iterations, detach_routing, leaky, grad_bias)
        grad_votes[chunk] = grad_u_hat.permute(0, 2, 1, 3)
    return grad_votes, grad_bias


KERNELS = VotesKernels(votes_forward, votes_backward)
