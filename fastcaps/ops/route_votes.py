"""Routing from given votes, the custom ops: ``fastcaps::route_votes`` and ``fastcaps::route_votes_backward``.

    route_votes(votes, bias?, iterations, detach_routing, leaky, backend) -> (v, s)
    route_votes_backward(grad_v, votes, bias?, s, iterations, detach_routing, leaky, backend)
        -> (grad_votes, grad_bias)

votes (..., I, J, D) with any leading dimensions; v (..., J, D); s (N, r, J, D) with N the
product of the leading dimensions, saved for the backward and not differentiable. The
backend's kernels are ``KERNELS`` of fastcaps/kernels/<backend>/route_votes.py (the
``torch`` backend has them).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import kernels
from ..validation import compute_dtype


def _rows(votes: Tensor) -> Tensor:
    return votes.reshape(-1, *votes.shape[-3:])


@torch.library.custom_op("fastcaps::route_votes", mutates_args=())
def route_votes(votes: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool, leaky: bool,
                backend: str) -> Tuple[Tensor, Tensor]:
    v, s = kernels(backend, "route_votes", votes.device).forward(_rows(votes), bias, iterations, leaky)
    return v.view(*votes.shape[:-3], *v.shape[-2:]), s


@route_votes.register_fake
def _route_votes_fake(votes, bias, iterations, detach_routing, leaky, backend):
    *leading, _, out_caps, out_dim = votes.shape
    rows = _rows(votes).shape[0]
    return (votes.new_empty(*leading, out_caps, out_dim),
            votes.new_empty(rows, iterations, out_caps, out_dim, dtype=compute_dtype(votes.dtype)))


@torch.library.custom_op("fastcaps::route_votes_backward", mutates_args=())
def route_votes_backward(grad_v: Tensor, votes: Tensor, bias: Optional[Tensor], s: Tensor, iterations: int,
                         detach_routing: bool, leaky: bool, backend: str) -> Tuple[Tensor, Tensor]:
    grad_votes, grad_bias = kernels(backend, "route_votes", votes.device).backward(
        grad_v.reshape(-1, *grad_v.shape[-2:]), _rows(votes), s, iterations, detach_routing, leaky)
    return grad_votes.view(votes.shape), grad_bias.to(votes.dtype)


@route_votes_backward.register_fake
def _route_votes_backward_fake(grad_v, votes, bias, s, iterations, detach_routing, leaky, backend):
    return torch.empty_like(votes), votes.new_empty(votes.shape[-2:])


def _setup_context(ctx, inputs, output):
    votes, bias, iterations, detach_routing, leaky, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.save_for_backward(votes, bias, s)
    ctx.options = (iterations, detach_routing, leaky, backend)


def _backward(ctx, grad_v, _grad_s):
    votes, bias, s = ctx.saved_tensors
    grad_votes, grad_bias = torch.ops.fastcaps.route_votes_backward(grad_v.contiguous(), votes, bias, s, *ctx.options)
    return grad_votes, (None if bias is None else grad_bias), None, None, None, None


route_votes.register_autograd(_backward, setup_context=_setup_context)
