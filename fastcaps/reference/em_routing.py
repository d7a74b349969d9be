"""EM routing between matrix capsules (Hinton, Sabour & Frosst 2018), in plain PyTorch: the oracle.

Each child i has a P x P pose M_i and an activation a_i; its vote for parent j is
V_ij = M_i W_ij. Procedure 1 of the paper, with R_ij = 1/J to start and, per iteration:

    M-step   r_ij = R_ij a_i
             mu_j^h = sum_i r_ij V_ij^h / sum_i r_ij
             (sigma_j^h)^2 = sum_i r_ij (V_ij^h - mu_j^h)^2 / sum_i r_ij
             cost_j^h = (beta_u_j + log sigma_j^h) sum_i r_ij
             a_j = logistic(lambda_t (beta_a_j - sum_h cost_j^h))
    E-step   log p_ij = sum_h -(V_ij^h - mu_j^h)^2 / (2 (sigma_j^h)^2) - log(2 pi (sigma_j^h)^2) / 2
             R_ij = a_j p_ij / sum_k a_k p_ik          (skipped after the last iteration)

The outputs are the parents' poses mu_j (P x P) and activations a_j. Everything is computed in
log space (log a_j = logsigmoid(.), R_ij = softmax of log a_j + log p_ij), so nothing
overflows; the two guards are arguments with defaults, not hidden constants:

    eps             sum_i r_ij is clamped to at least eps before it divides (a parent that
                    receives nothing: mu = 0, sigma^2 = variance_floor, cost 0)
    variance_floor  added to every sigma^2 (all-equal votes: sigma = 0)

``inverse_temperature`` (lambda) is one number or one per iteration. ``detach_routing``:
every iteration but the last runs on detached votes, activations and betas, so the gradient
flows only through the last M-step, with its R held constant.

Convolutional layers route at every output position from the Kh x Kw x I capsules of its
window, W per kernel offset, input and output type, shared across positions. R is normalised

    "per_window"  over the J parents of each window: each output position routes its own
                  children independently (what most public implementations do);
    "per_child"   over every parent the child votes for, in every window that holds it (the
                  paper's description: parents at different positions compete for a child);
                  R starts at 1/(J w_i), w_i the number of windows holding child i, and the
                  E-step's denominator is summed over those windows.

At stride = K (windows do not overlap) the two coincide. Padding contributes capsules with
activation 0, which add nothing to any parent.

Layouts: poses (B, I, P, P, H, W) and activations (B, I, H, W) on a grid, (B, I, P, P) and
(B, I) dense; conv weight (J, I, Kh, Kw, P, P); dense or class weight (J, I, P, P); beta_u and
beta_a (J,). Children are ordered (i, kh, kw) in a window, as F.unfold orders them, and
(i, y, x) in the class layer. This module is naive on purpose: it materializes every vote and
lets autograd differentiate through every iteration. tests/test_em_reference.py proves it
against a scalar loop written from the paper and against what the mathematics guarantees.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import (check_em_args, check_em_votes_args, checked_conv_em_call, compute_dtype, conv_output_size,
                          inverse_temperatures)

__all__ = ["em_routing", "conv_em_routing", "em_route_votes", "em_iterations", "coordinate_offsets",
           "window_children"]

Lambda = Union[float, Sequence[float]]
NORMALIZATIONS = ("per_window", "per_child")


def em_routing(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
               iterations: int = 3, inverse_temperature: Lambda = 0.01, detach_routing: bool = False,
               coordinate_addition: bool = False, *, eps: float = 1e-8, variance_floor: float = 1e-6,
               upcast: bool = False):
    """EM routing from every child to every parent (a fully connected or class capsule layer).

    Args:
        poses: (B, I, P, P), or (B, I, P, P, H, W) for capsules on a grid, whose I types
            each share one W across the H x W positions (the paper's class capsules).
        activations: (B, I) or (B, I, H, W), in [0, 1].
        weight: (J, I, P, P).
        beta_u, beta_a: (J,), per output capsule type.
        iterations, inverse_temperature, detach_routing, eps, variance_floor: see the module.
        coordinate_addition: on a grid, add the scaled coordinates ((y + 0.5) / H,
            (x + 0.5) / W) of each child's position to the first two entries of the last
            column of its votes (the paper's coordinate addition).
        upcast: compute float16/bfloat16 in float32 and return their dtype.

    Returns:
        (poses, activations) of the parents: (B, J, P, P) and (B, J).
    """
    lambdas = inverse_temperatures(inverse_temperature, iterations, "em_routing")
    check_em_args(poses, activations, weight, beta_u, beta_a, iterations, detach_routing, coordinate_addition, eps,
                  variance_floor)
    return route_em(poses, activations, weight, beta_u, beta_a, lambdas, detach_routing, coordinate_addition, eps,
                    variance_floor, upcast)


def route_em(poses, activations, weight, beta_u, beta_a, lambdas, detach_routing=False, coordinate_addition=False,
             eps=1e-8, variance_floor=1e-6, upcast=False):
    """``em_routing`` without the argument checks (``lambdas`` one per iteration)."""
    if upcast and compute_dtype(poses.dtype) != poses.dtype:
        wide = [t.to(torch.float32) for t in (poses, activations, weight, beta_u, beta_a)]
        out_poses, out_activations = route_em(*wide, lambdas, detach_routing, coordinate_addition, eps,
                                              variance_floor)
        return out_poses.to(poses.dtype), out_activations.to(poses.dtype)
    batch, in_caps, side = poses.shape[:3]
    out_caps = weight.shape[0]
    grid = poses.shape[4:]
    positions = math.prod(grid)
    # Children (i, y, x): V[b, (i, y, x), j] = M[b, i, y, x] @ W[j, i].
    pose_rows = poses.reshape(batch, in_caps, side, side, positions)
    votes = torch.einsum("biacn,jicd->binjad", pose_rows, weight)
    if coordinate_addition:
        votes = votes + coordinate_offsets(grid, side, votes.dtype, votes.device)[:, None]
    votes = votes.reshape(batch, in_caps * positions, out_caps, side * side)
    mu, a = em_iterations(votes, activations.reshape(batch, in_caps * positions), beta_u, beta_a, lambdas,
                          detach_routing, eps, variance_floor)
    return mu.view(batch, out_caps, side, side), a


def coordinate_offsets(grid, side: int, dtype, device) -> Tensor:
    """(H * W, P, P): what coordinate addition adds to the votes of a child at (y, x): the
    row (y + 0.5) / H at [0, P - 1] and the column (x + 0.5) / W at [1, P - 1], zero
    elsewhere."""
    height, width = grid
    rows = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    cols = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    offsets = torch.zeros(height, width, side, side, dtype=dtype, device=device)
    offsets[:, :, 0, side - 1] = rows[:, None]
    offsets[:, :, 1, side - 1] = cols[None, :]
    return offsets.view(height * width, side, side)


def conv_em_routing(poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor,
                    iterations: int = 3, stride=1, padding=0, dilation=1, inverse_temperature: Lambda = 0.01,
                    normalization: str = "per_child", detach_routing: bool = False, *, eps: float = 1e-8,
                    variance_floor: float = 1e-6, upcast: bool = False):
    """EM routing at every output position of a grid, from the capsules of its window.

    Args:
        poses: (B, I, P, P, H, W); activations: (B, I, H, W).
        weight: (J, I, Kh, Kw, P, P): V[child (i, kh, kw) of the window at (y, x), j] =
            M[b, i, y*sh + kh*dh - ph, x*sw + kw*dw - pw] @ W[j, i, kh, kw].
        beta_u, beta_a: (J,).
        stride, padding, dilation: ints or pairs, as nn.Conv2d takes them.
        normalization: "per_child" (the paper) or "per_window"; see the module.
        iterations, inverse_temperature, detach_routing, eps, variance_floor, upcast: as
            ``em_routing``.

    Returns:
        (poses, activations): (B, J, P, P, H', W') and (B, J, H', W').
    """
    stride, padding, dilation, lambdas = checked_conv_em_call(
        poses, activations, weight, beta_u, beta_a, iterations, stride, padding, dilation, inverse_temperature,
        normalization, detach_routing, eps, variance_floor)
    return route_conv_em(poses, activations, weight, beta_u, beta_a, lambdas, stride, padding, dilation,
                         normalization, detach_routing, eps, variance_floor, upcast)


def route_conv_em(poses, activations, weight, beta_u, beta_a, lambdas, stride, padding, dilation,
                  normalization="per_child", detach_routing=False, eps=1e-8, variance_floor=1e-6, upcast=False):
    """``conv_em_routing`` without the argument checks (pairs and ``lambdas`` already)."""
    if upcast and compute_dtype(poses.dtype) != poses.dtype:
        wide = [t.to(torch.float32) for t in (poses, activations, weight, beta_u, beta_a)]
        out = route_conv_em(*wide, lambdas, stride, padding, dilation, normalization, detach_routing, eps,
                            variance_floor)
        return out[0].to(poses.dtype), out[1].to(poses.dtype)
    batch, in_caps, side, _, height, width = poses.shape
    out_caps, _, kh, kw = weight.shape[:4]
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    positions = out_h * out_w
    unfold = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    # Every window of the batch: poses (B, I, P, P, Kh, Kw, L), activations (B, I, Kh, Kw, L).
    pose_windows = F.unfold(poses.reshape(batch, in_caps * side * side, height, width), **unfold)
    pose_windows = pose_windows.view(batch, in_caps, side, side, kh, kw, positions)
    a_windows = F.unfold(activations, **unfold).view(batch, in_caps, kh, kw, positions)
    # Every vote: V[b, L, (i, kh, kw), j, (P, P)] = M @ W[j, i, kh, kw].
    votes = torch.einsum("biackln,jiklcd->bnikljad", pose_windows, weight)
    children = in_caps * kh * kw
    votes = votes.reshape(batch, positions, children, out_caps, side * side)
    a_in = a_windows.permute(0, 4, 1, 2, 3).reshape(batch, positions, children)
    if normalization == "per_window":
        mu, a = em_iterations(votes.reshape(batch * positions, children, out_caps, side * side),
                              a_in.reshape(batch * positions, children), beta_u, beta_a, lambdas, detach_routing,
                              eps, variance_floor)
    else:
        index = window_children(in_caps, (height, width), (kh, kw), stride, padding, dilation, poses.device)
        mu, a = em_iterations(votes, a_in, beta_u, beta_a, lambdas, detach_routing, eps, variance_floor,
                              child_index=index, child_count=in_caps * height * width)
    mu = mu.view(batch, out_h, out_w, out_caps, side, side).permute(0, 3, 4, 5, 1, 2)
    return mu, a.view(batch, out_h, out_w, out_caps).permute(0, 3, 1, 2)


def window_children(in_caps: int, grid, kernel, stride, padding, dilation, device) -> Tensor:
    """(L, I * Kh * Kw) int64: which input capsule (i, y, x) -> (i * H + y) * W + x fills each
    child slot of each window; a padding slot holds I * H * W (one spare index)."""
    height, width = grid
    locations = torch.arange(1, height * width + 1, dtype=torch.float64, device=device).view(1, 1, height, width)
    slots = F.unfold(locations, kernel, dilation=dilation, padding=padding, stride=stride)[0].long() - 1
    slots = slots.t()                                                     # (L, Kh * Kw), -1 for padding
    per_type = torch.arange(in_caps, device=device).view(1, in_caps, 1) * (height * width)
    index = (slots[:, None, :] + per_type).reshape(slots.shape[0], -1)    # (L, (i, kh, kw))
    padded = (slots < 0)[:, None, :].expand(-1, in_caps, -1).reshape(index.shape)
    return index.masked_fill(padded, in_caps * height * width)


def em_route_votes(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int = 3,
                   inverse_temperature: Lambda = 0.01, detach_routing: bool = False, *, eps: float = 1e-8,
                   variance_floor: float = 1e-6, upcast: bool = False):
    """EM routing from votes a layer computed itself: votes (..., I, J, H) (H pose entries,
    e.g. 16 for 4x4), activations (..., I); any leading dimensions, each routed
    independently (R normalised per window). Returns (mu (..., J, H), a (..., J))."""
    lambdas = inverse_temperatures(inverse_temperature, iterations, "em_route_votes")
    check_em_votes_args(votes, activations, beta_u, beta_a, iterations, detach_routing, eps, variance_floor)
    if upcast and compute_dtype(votes.dtype) != votes.dtype:
        mu, a = em_route_votes(votes.float(), activations.float(), beta_u.float(), beta_a.float(), iterations,
                               lambdas, detach_routing, eps=eps, variance_floor=variance_floor)
        return mu.to(votes.dtype), a.to(votes.dtype)
    *leading, in_caps, out_caps, entries = votes.shape
    mu, a = em_iterations(votes.reshape(-1, in_caps, out_caps, entries), activations.reshape(-1, in_caps), beta_u,
                          beta_a, lambdas, detach_routing, eps, variance_floor)
    return mu.view(*leading, out_caps, entries), a.view(*leading, out_caps)


def em_iterations(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, lambdas: Sequence[float],
                  detach_routing: bool = False, eps: float = 1e-8, variance_floor: float = 1e-6,
                  child_index: Optional[Tensor] = None, child_count: int = 0):
    """Procedure 1 on votes (..., C, J, H) from children with activations (..., C).

    Without ``child_index``, R is a softmax over J per child slot. With it (per-child
    normalisation; votes (B, L, C, J, H)), ``child_index`` (L, C) names the input capsule
    in each slot (``window_children``), and R is normalised over every (window, parent)
    the capsule votes for. Returns mu (..., J, H) and a (..., J)."""
    if child_index is None:
        log_r = torch.full(votes.shape[:-1], -math.log(votes.shape[-2]), dtype=votes.dtype, device=votes.device)
    else:
        slots = child_index.flatten()
        windows = votes.new_zeros(child_count + 1).index_add_(0, slots, votes.new_ones(slots.shape))
        per_slot = windows[child_index].clamp_min(1)                      # padding slots: any positive count
        log_r = (-torch.log(per_slot * votes.shape[-2]))[..., None].expand(votes.shape[:-1])
    for t, lam in enumerate(lambdas):
        last = t == len(lambdas) - 1
        live = last or not detach_routing
        v, a, bu, ba = (votes, a_in, beta_u, beta_a) if live else (votes.detach(), a_in.detach(), beta_u.detach(),
                                                                   beta_a.detach())
        mu, variance, log_a = m_step(log_r.exp(), v, a, bu, ba, lam, eps, variance_floor)
        if last:
            return mu, log_a.exp()
        logits = log_a[..., None, :] + log_gaussian(v, mu, variance)      # (..., C, J)
        log_r = logits - child_logsumexp(logits, child_index, child_count)


def m_step(responsibility: Tensor, votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, lam: float,
           eps: float, variance_floor: float):
    """The parents' mu (..., J, H), sigma^2 (..., J, H) and log a (..., J) from R (..., C, J)."""
    r = responsibility * a_in[..., None]                                 # r_ij = R_ij a_i
    r_sum = r.sum(-2)                                                    # (..., J)
    weights = (r / r_sum.clamp_min(eps)[..., None, :])[..., None]        # (..., C, J, 1)
    mu = (weights * votes).sum(-3)
    variance = (weights * (votes - mu[..., None, :, :]) ** 2).sum(-3) + variance_floor
    cost = (beta_u[:, None] + 0.5 * torch.log(variance)) * r_sum[..., None]
    log_a = F.logsigmoid(lam * (beta_a - cost.sum(-1)))
    return mu, variance, log_a


def log_gaussian(votes: Tensor, mu: Tensor, variance: Tensor) -> Tensor:
    """log N(V_ij; mu_j, diag sigma_j^2) summed over the pose entries: (..., C, J)."""
    mu, variance = mu[..., None, :, :], variance[..., None, :, :]
    return -0.5 * ((votes - mu) ** 2 / variance + torch.log(2 * math.pi * variance)).sum(-1)


def child_logsumexp(logits: Tensor, child_index: Optional[Tensor], child_count: int) -> Tensor:
    """The E-step's log denominator per child slot, (..., C, 1): the logsumexp over J, and
    with ``child_index`` over every window that holds the same input capsule too."""
    per_slot = torch.logsumexp(logits, dim=-1, keepdim=True)
    if child_index is None:
        return per_slot
    batch = logits.shape[0]
    flat = per_slot.reshape(batch, -1)                                   # (B, L * C)
    index = child_index.flatten().expand(batch, -1)
    # A shift per input capsule (its largest slot) keeps exp() in range; it cancels exactly.
    shift = flat.new_full((batch, child_count + 1), -math.inf).scatter_reduce(1, index, flat.detach(), "amax")
    shift = shift.gather(1, index)
    total = flat.new_zeros(batch, child_count + 1).scatter_add(1, index, torch.exp(flat - shift))
    return (torch.log(total.gather(1, index)) + shift).view(per_slot.shape)
