"""Launchers of the fused Triton dynamic-routing kernels (routing_jit.py), the "triton" backend.

They meet the contract of fastcaps/kernels/__init__.py; the backward recomputes u_hat, so
they keep nothing of it (kept_u_hat is empty).

Launches. A pass splits the input capsules into chunks, one program per (sample block,
chunk), and writes per-chunk partial sums; a small reduction kernel adds the partials in
chunk order. That is deterministic (no atomics) and fills the GPU at batch 1. Forward: per
iteration a pass and a reduction (2r launches). Backward: a prologue (V_{t-1} for every t
and sigma_r), then per iteration r..2 a pass and a reduction giving the next sigma
(DESIGN.md section 3, phase A), then one final kernel, one program per input capsule
(and per split of the batch where the capsules alone would leave the GPU idle), that walks
its samples in order, 16 at a time on tl.dot from 16 samples up, and writes grad u and that
capsule's grad W, or the split's partial of it, added by torch.sum (2r launches, 2 with
detach_routing, and the sum when split). Capsules too large to keep W[:, i] in registers
(configs.w_resident) stream it, and their grad W goes through a compute-dtype buffer even
with one split. grad bias is the sum of sigma over samples and iterations. Every
launch's compile-time arguments and compile options come from configs.py. Every launch is
made on u's device (``torch.cuda.device(u.device)``), whichever GPU is current, and nothing
here waits for the GPU (no host sync), so that forward+backward can be captured in a CUDA
graph (tests/test_triton_kernels.py checks the launchers for syncing calls).

The iterations and the backward's state (forward_iterations, backward_state) also serve
routing from given votes (route_votes.py), which adds its own phase B.

Under TRITON_INTERPRET=1 (set before triton is imported) the same kernels run on CPU
tensors, which is how CI checks them. The interpreter has no bfloat16: there bfloat16
inputs are widened to float32 before the launch, which computes the same products (a
bfloat16 product is exact in float32) that the GPU's bfloat16 path accumulates in float32.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...cases import RoutingShape
from .. import RoutingKernels, compute_dtype, keeps_nothing
from . import configs
from .routing_jit import INTERPRETED


def _run(launch: configs.Launch, grid, *arguments) -> None:
    launch.kernel[grid](*arguments, **launch.constexprs, **launch.compile_options)


def _on_device(u: Tensor):
    """Launches on u's GPU, not on the current one (a tensor on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _launch_pass(shape: RoutingShape, plan: configs.PassPlan, u: Tensor, weight: Tensor, v_sum: Tensor,
                 v_sum_stride: int, v_sum_rows: int, sigma: Optional[Tensor], sigma_stride: int,
                 partial_dtype: torch.dtype, backward: bool, leaky: bool, votes: bool) -> Tensor:
    """One pass over the input capsules for shape.batch samples; returns the
    (shape.batch, chunks, J, D) partials. With votes, u holds them (weight is not read: u
    stands in for its pointer)."""
    partial = u.new_empty(shape.batch, plan.chunks, shape.out_caps, shape.out_dim, dtype=partial_dtype)
    _run(configs.pass_launch(plan.config, u.dtype, shape, backward, votes=votes), plan.grid(shape.batch),
         u, u if votes else weight, v_sum, v_sum if sigma is None else sigma, partial,
         shape.batch, shape.in_caps, shape.out_caps, shape.out_dim, shape.in_dim,
         v_sum_stride, sigma_stride, v_sum_rows, plan.per_chunk, plan.chunks, int(leaky))
    return partial


def _prepare(u: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    if INTERPRETED and u.dtype == torch.bfloat16:
        return u.float().contiguous(), weight.float().contiguous()
    return u.contiguous(), weight.contiguous()


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool, leaky: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """(v, s, kept_u_hat): v (B, J, D) in u's dtype, s (B, r, J, D) in the compute dtype,
    kept_u_hat empty. ``detach_routing`` changes only the backward."""
    batch, in_caps, in_dim = u.shape
    out_caps, _, out_dim, _ = weight.shape
    whole = RoutingShape(batch, in_caps, in_dim, out_caps, out_dim)
    v, s = forward_iterations(whole, u, weight, bias, iterations, leaky, votes=False)
    return v, s, s.new_empty(0)


def forward_iterations(whole: RoutingShape, u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int,
                       leaky: bool, votes: bool) -> Tuple[Tensor, Tensor]:
    """(v, s) of ``iterations`` passes and reductions over whole.batch rows: of u with W, or,
    with votes, of the given votes (B, I, J, D) in u (weight is then not read)."""
    acc = compute_dtype(u.dtype)
    batch, out_caps, out_dim = whole.batch, whole.out_caps, whole.out_dim
    s = u.new_empty(batch, iterations, out_caps, out_dim, dtype=acc)
    v = u.new_empty(batch, out_caps, out_dim)
    if batch == 0:
        return v, s
    with _on_device(u):
        u_k, weight_k = _prepare(u, weight)
        bias_k = s if bias is None else bias.contiguous()
        plan = configs.pass_plan(whole, u_k.dtype, configs.processors(u.device), votes)
        for start, stop in configs.launch_ranges(batch, plan.config.block_b):
            rows = stop - start
            shape = whole.with_batch(rows)
            reduce = configs.forward_reduce_launch(shape, bias is not None, acc)
            v_sum = u.new_empty(rows, out_caps, out_dim, dtype=acc)
            rows_k = u_k[start:stop]
            for t in range(iterations):
                # v_sum holds V_{t-1} for every row once t > 0; V_0 = 0 is not stored.
                v_sum_rows = rows if t > 0 else 0
                partial = _launch_pass(shape, plan, rows_k, weight_k, v_sum,
                                       out_caps * out_dim, v_sum_rows, None, 0, acc, backward=False, leaky=leaky,
                                       votes=votes)
                _run(reduce, configs.reduce_grid(rows), partial, bias_k, s[start:stop], v_sum, v[start:stop],
                     rows, out_caps, out_dim, iterations, t, plan.chunks, v_sum_rows)
    return v, s


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, kept_u_hat: Tensor,
    iterations: int, detach_routing: bool, leaky: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_u, grad_weight, grad_bias); grad_bias is (J, D) even without a bias."""
    batch, in_caps, in_dim = u.shape
    out_caps, _, out_dim, _ = weight.shape
    if batch == 0:
        return torch.empty_like(u), torch.zeros_like(weight), weight.new_zeros(out_caps, out_dim)
    whole = RoutingShape(batch, in_caps, in_dim, out_caps, out_dim)
    with _on_device(u):
        u_k, weight_k = _prepare(u, weight)
        v_sum, sigma, first_differentiable = backward_state(whole, grad_v, u_k, weight_k, s, iterations,
                                                            detach_routing, leaky, votes=False)
        # Phase B. Every element is written: program (i, split) writes grad u[split's rows, i]
        # and the split's grad W[:, i], straight into grad W when there is one split and W is
        # resident (a streamed grad W is summed in memory: in the compute dtype).
        final_plan = configs.final_plan(whole, u_k.dtype, configs.processors(u.device))
        final = configs.final_launch(whole, detach_routing, final_plan.config, u_k.dtype)
        grad_u_k = torch.empty_like(u_k)
        splits = final_plan.splits
        direct = splits == 1 and final_plan.w_resident
        acc = s.dtype
        grad_w_k = torch.empty_like(weight_k) if direct else weight_k.new_empty(splits, *weight_k.shape, dtype=acc)
        for first, last in configs.launch_ranges(in_caps):
            _run(final, (last - first, splits), u_k, weight_k, v_sum, sigma, grad_u_k, grad_w_k,
                 batch, in_caps, out_caps, out_dim, in_dim, iterations, first_differentiable, first,
                 final_plan.samples_per_split, weight_k.numel() if splits > 1 else 0, int(leaky))
        # The splits' partials: torch.sum, no atomics, so the same bits every run.
        grad_weight_k = grad_w_k if direct else grad_w_k.sum(dim=0)
        grad_bias = sigma[:, first_differentiable:].sum(dim=(0, 1))
    return grad_u_k.to(u.dtype), grad_weight_k.to(weight.dtype), grad_bias.to(weight.dtype)


def backward_state(whole: RoutingShape, grad_v: Tensor, u_k: Tensor, weight_k: Tensor, s: Tensor, iterations: int,
                   detach_routing: bool, leaky: bool, votes: bool) -> Tuple[Tensor, Tensor, int]:
    """(v_sum, sigma, first_differentiable): V_{t-1} and dL/ds_t for every row and iteration
    (B, r, J, D), from the prologue and phase A's r - 1 reverse passes (of u with W, or with
    votes of the given votes in u_k), and the first iteration that carries gradient."""
    acc = s.dtype
    batch, out_caps, out_dim = whole.batch, whole.out_caps, whole.out_dim
    s = s.contiguous()
    grad_v_k = grad_v.to(acc).contiguous()
    jd = out_caps * out_dim
    v_sum = u_k.new_empty(batch, iterations, out_caps, out_dim, dtype=acc)  # V_{t-1} for every t
    sigma = torch.empty_like(v_sum)
    # With detach_routing only the last iteration carries gradient and c_r is a constant.
    first_differentiable = iterations - 1 if detach_routing else 0
    plan = configs.pass_plan(whole, u_k.dtype, configs.processors(u_k.device), votes)
    for start, stop in configs.launch_ranges(batch, plan.config.block_b):
        rows = stop - start
        shape = whole.with_batch(rows)
        # This launch's samples: views into the batch's buffers.
        s_part, grad_v_part = s[start:stop], grad_v_k[start:stop]
        v_sum_part, sigma_part = v_sum[start:stop], sigma[start:stop]
        rows_k = u_k[start:stop]
        carried = u_k.new_empty(rows, out_caps, out_dim, dtype=acc)
        _run(configs.backward_reduce_launch(shape, True, acc), configs.reduce_grid(rows),
             s_part, s_part, grad_v_part, carried, v_sum_part, sigma_part, rows, out_caps, out_dim,
             iterations, iterations - 1, 0)
        # Phase A: the r - 1 reverse passes, each a pass and a reduction giving the next sigma.
        reduce = configs.backward_reduce_launch(shape, False, acc)
        for t in range(iterations - 1, first_differentiable, -1):
            partial = _launch_pass(shape, plan, rows_k, weight_k, v_sum_part[:, t],
                                   iterations * jd, rows, sigma_part[:, t], iterations * jd, acc, backward=True,
                                   leaky=leaky, votes=votes)
            _run(reduce, configs.reduce_grid(rows), partial, s_part, grad_v_part, carried, v_sum_part,
                 sigma_part, rows, out_caps, out_dim, iterations, t - 1, plan.chunks)
    return v_sum, sigma, first_differentiable


KERNELS = RoutingKernels(routing_forward, routing_backward, keeps_nothing)
