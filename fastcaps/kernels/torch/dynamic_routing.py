"""The "torch" backend's dynamic-routing kernels: DESIGN.md sections 2-3 in vectorized PyTorch.

This is the executable spec that the C++ and Triton kernels port:
- forward keeps only V = v_1 + ... + v_t as routing state (logits_t = u_hat . V_{t-1}) and
  returns s_t of every iteration, which is all the backward needs besides u and W;
- backward recomputes u_hat and the couplings from u, W and s, and runs the r-1
  reduction passes and the final pass of section 3 (one pass with ``detach_routing``).
u_hat exists only for a chunk of the batch at a time, so memory stays bounded at any
batch size. Half-precision inputs are computed in float32 and returned in their dtype. It
keeps nothing of u_hat for the backward (the contract in fastcaps/kernels/__init__.py).

Layouts: u (B, I, Din), weight (J, I, D, Din), bias (J, D), s (B, r, J, D), and inside a
chunk u_hat (b, J, I, D), couplings c (b, J, I).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import RoutingKernels, compute_dtype, keeps_nothing, row_chunks
from .squash import squash_backward, squash_forward

# u_hat elements held at once; 2^22 float32 = 16 MiB, about 22 MNIST samples.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(batch: int, weight: Tensor):
    out_caps, in_caps, out_dim, _ = weight.shape
    return row_chunks(batch, out_caps * in_caps * out_dim, _CHUNK_ELEMENTS)


def _predictions(u: Tensor, weight: Tensor) -> Tensor:
    """u_hat[b, j, i] = W[j, i] @ u[b, i], (b, J, I, D), contiguous.

    einsum returns a permuted view of its (I, J*D, b) matmul; the routing passes read
    u_hat several times, and on the strided view they ran about 1.5x slower and varied
    from process to process with buffer addresses (measured at the MNIST shape, B = 32)."""
    return torch.einsum("jide,bie->bjid", weight, u).contiguous()


def _couplings(u_hat: Tensor, v_sum: Optional[Tensor], leaky: bool) -> Tensor:
    """c[b, j, i] = softmax_j(u_hat[b, j, i] . V[b, j]) for V = v_sum, the sum of the outputs
    of the iterations before; uniform 1/J when V = 0 (None: the first pass), 1/(J+1) when leaky."""
    batch, out_caps, in_caps, _ = u_hat.shape
    if v_sum is None:
        return u_hat.new_full((batch, out_caps, in_caps), 1.0 / (out_caps + leaky))
    logits = torch.einsum("bjid,bjd->bji", u_hat, v_sum)
    return _softmax_over_output_capsules(logits, leaky)


# ATen runs an elementwise op on one thread below at::internal::GRAIN_SIZE (32768) elements.
_SERIAL_ELEMENTS = 1 << 14


def _softmax_over_output_capsules(logits: Tensor, leaky: bool) -> Tensor:
    """softmax over dim 1, bitwise the same for any torch.get_num_threads(); with ``leaky`` an
    extra zero logit takes part and is dropped: exp(b_j) / (1 + sum_k exp(b_k)).

    ATen's vector and scalar exp differ in the last bit, and a parallel exp (or
    torch.softmax over an inner dimension) hands elements to the scalar path at the
    threads' split points, which move with the thread count. So exp runs in fixed
    pieces that each stay on one thread; the max, the sums and the division are exact
    or taken in a fixed order."""
    largest = logits.amax(dim=1, keepdim=True)
    if leaky:
        largest = largest.clamp(min=0)
    weights = logits - largest
    for piece in weights.view(-1).split(_SERIAL_ELEMENTS):
        piece.exp_()
    total = weights.sum(dim=1, keepdim=True)
    if leaky:
        orphan = -largest
        for piece in orphan.view(-1).split(_SERIAL_ELEMENTS):
            piece.exp_()
        total = total + orphan
    return weights / total


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool, leaky: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """(v, s, kept_u_hat): v (B, J, D) in u's dtype, s (B, r, J, D) in the compute dtype,
    kept_u_hat empty. ``detach_routing`` changes only the backward."""
    dtype = compute_dtype(u.dtype)
    u_c, weight_c = u.to(dtype), weight.to(dtype)
    bias_c = None if bias is None else bias.to(dtype)
    batch = u.shape[0]
    out_caps, _, out_dim, _ = weight.shape
    s_all = u.new_empty(batch, iterations, out_caps, out_dim, dtype=dtype)
    v_out = u.new_empty(batch, out_caps, out_dim, dtype=dtype)
    for rows in _chunks(batch, weight):
        v_out[rows] = route_chunk(_predictions(u_c[rows], weight_c), bias_c, iterations, leaky, s_all[rows])
    return v_out.to(u.dtype), s_all, s_all.new_empty(0)


def route_chunk(u_hat: Tensor, bias: Optional[Tensor], iterations: int, leaky: bool, s_out: Tensor) -> Tensor:
    """The forward's iterations for a chunk's predictions u_hat (b, J, I, D): returns v (b, J, D)
    and writes each iteration's s into s_out (b, r, J, D)."""
    v_sum = None  # V_{t-1} = v_1 + ... + v_{t-1}; None stands for V_0 = 0
    for t in range(iterations):
        c = _couplings(u_hat, v_sum, leaky)
        s = torch.einsum("bji,bjid->bjd", c, u_hat)
        if bias is not None:
            s = s + bias
        s_out[:, t] = s
        v = squash_forward(s)
        v_sum = v if v_sum is None else v_sum + v
    return v


def routing_backward(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    s_all: Tensor,
    kept_u_hat: Tensor,
    iterations: int,
    detach_routing: bool,
    leaky: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_u, grad_weight, grad_bias); grad_bias is (J, D) even without a bias."""
    dtype = s_all.dtype
    u_c, weight_c, grad_v_c = u.to(dtype), weight.to(dtype), grad_v.to(dtype)
    out_caps, _, out_dim, _ = weight.shape
    grad_u = torch.empty_like(u_c)
    grad_weight = torch.zeros_like(weight_c)
    grad_bias = weight_c.new_zeros(out_caps, out_dim)
    for rows in _chunks(u.shape[0], weight):
        u_chunk = u_c[rows]
        u_hat = _predictions(u_chunk, weight_c)
        grad_u_hat = prediction_gradients(u_hat, s_all[rows], grad_v_c[rows], iterations, detach_routing, leaky,
                                          grad_bias)
        grad_u[rows] = torch.einsum("jide,bjid->bie", weight_c, grad_u_hat)
        grad_weight += torch.einsum("bjid,bie->jide", grad_u_hat, u_chunk)
    return grad_u.to(u.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def prediction_gradients(u_hat: Tensor, s: Tensor, grad_v: Tensor, iterations: int, detach_routing: bool,
                         leaky: bool, grad_bias: Tensor) -> Tensor:
    """dL/du_hat (b, J, I, D) for a chunk's predictions u_hat, its s (b, r, J, D) and grad_v
    (b, J, D): DESIGN.md section 3. Adds the chunk's dL/dbias into grad_bias (J, D)."""
    # With detach_routing only the last iteration carries gradient; its couplings are constants.
    first_differentiable = iterations - 1 if detach_routing else 0
    # v_sum[:, t] = V_{t-1} = v_1 + ... + v_{t-1}, the state that iteration t routes by.
    v = squash_forward(s)
    # An exclusive running sum, added in the forward's order so the couplings match it.
    v_sum = torch.cat([torch.zeros_like(v[:, :1]), torch.cumsum(v[:, :-1], dim=1)], dim=1)
    grad_u_hat = torch.zeros_like(u_hat)
    grad_v_sum = torch.zeros_like(grad_v)  # G = dL/dV_t, flowing backwards
    for t in reversed(range(first_differentiable, iterations)):
        grad_v_t = grad_v_sum + grad_v if t == iterations - 1 else grad_v_sum
        sigma = squash_backward(s[:, t], grad_v_t)  # dL/ds_t, (b, J, D)
        grad_bias += sigma.sum(dim=0)
        c = _couplings(u_hat, v_sum[:, t] if t > 0 else None, leaky)
        grad_u_hat += c.unsqueeze(-1) * sigma.unsqueeze(2)
        if t > 0 and not detach_routing:
            gamma = torch.einsum("bjid,bjd->bji", u_hat, sigma)  # dL/dc
            # The same with leaky: the orphan's gamma is 0 and it is not a j.
            delta = c * (gamma - (c * gamma).sum(dim=1, keepdim=True))  # dL/dlogits
            grad_v_sum = grad_v_sum + torch.einsum("bji,bjid->bjd", delta, u_hat)
            grad_u_hat += delta.unsqueeze(-1) * v_sum[:, t].unsqueeze(2)
    return grad_u_hat


KERNELS = RoutingKernels(routing_forward, routing_backward, keeps_nothing)
