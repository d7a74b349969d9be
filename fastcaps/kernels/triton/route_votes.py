"""Launchers of the Triton kernels for routing from given votes, the "triton" backend of
``fastcaps::route_votes``.

The votes are u_hat, so the dense launchers' passes and reductions run on them with
``votes`` set (routing_jit.py: the pass reads u_hat instead of predicting it): the same
launches as dense routing (dynamic_routing.py), with the votes' rows as the batch. Phase B
is one launch of _votes_gradient_kernel on the passes' grid (blocks of rows x chunks of
input capsules), which writes grad votes = dL/du_hat; there is no W, so nothing is summed
across rows and nothing needs splitting. Nothing per iteration is kept: the backward
recomputes the couplings from the votes, V and sigma. No host sync (CUDA-graph safe).

Layouts: votes (N, I, J, D), bias (J, D), v (N, J, D), s (N, r, J, D).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...cases import RoutingShape
from ..torch.route_votes import VotesKernels
from . import configs
from .dynamic_routing import _on_device, _prepare, _run, backward_state, forward_iterations


def _shape(votes: Tensor) -> RoutingShape:
    rows, in_caps, out_caps, out_dim = votes.shape
    return RoutingShape(rows, in_caps, 1, out_caps, out_dim)  # in_dim: nothing predicts


def votes_forward(votes: Tensor, bias: Optional[Tensor], iterations: int, leaky: bool) -> Tuple[Tensor, Tensor]:
    return forward_iterations(_shape(votes), votes, votes.new_empty(0), bias, iterations, leaky, votes=True)


def votes_backward(grad_v: Tensor, votes: Tensor, s: Tensor, iterations: int, detach_routing: bool,
                   leaky: bool) -> Tuple[Tensor, Tensor]:
    """(grad_votes in votes' dtype, grad_bias (J, D) in the compute dtype)."""
    whole = _shape(votes)
    if whole.batch == 0:
        return torch.empty_like(votes), s.new_zeros(s.shape[2:])
    with _on_device(votes):
        votes_k, no_weight = _prepare(votes, votes.new_empty(0))
        v_sum, sigma, first_differentiable = backward_state(whole, grad_v, votes_k, no_weight, s, iterations,
                                                            detach_routing, leaky, votes=True)
        plan = configs.pass_plan(whole, votes_k.dtype, configs.processors(votes.device), votes=True)
        gradient = configs.votes_gradient_launch(whole, detach_routing, plan.config)
        grad_votes = torch.empty_like(votes_k)
        for start, stop in configs.launch_ranges(whole.batch, plan.config.block_b):
            rows = stop - start
            _run(gradient, plan.grid(rows), votes_k[start:stop], v_sum[start:stop], sigma[start:stop],
                 grad_votes[start:stop], rows, whole.in_caps, whole.out_caps, whole.out_dim, iterations,
                 first_differentiable, plan.per_chunk, int(leaky))
        grad_bias = sigma[:, first_differentiable:].sum(dim=(0, 1))
    return grad_votes.to(votes.dtype), grad_bias


KERNELS = VotesKernels(votes_forward, votes_backward)
