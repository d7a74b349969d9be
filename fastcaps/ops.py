"""The routing custom ops: ``fastcaps::routing`` and its backward ``fastcaps::routing_backward``.

One schema, one fake implementation (for torch.compile and meta tensors), one autograd
registration; the ``backend`` argument picks the kernel, from ``KERNELS``. Callers resolve
"auto" before calling (``fastcaps.functional.dynamic_routing`` does), so the op always
receives a concrete kernel name, and the backward runs the same kernel family as the
forward.

    routing(u, weight, bias?, iterations, detach, backend) -> (v, s, predictions)
        u (B, I, Din), weight (J, I, D, Din), bias (J, D) or None
        v (B, J, D) in u's dtype; s (B, r, J, D), each iteration's pre-squash sum, in the
        compute dtype (float32 for half inputs); predictions, the kernel's u_hat kept for
        the backward in its own layout (only the "cpu" kernel at small batches, see
        fastcaps/_routing_cpu.py), else empty. s and predictions are saved for the backward
        and are not differentiable.
    routing_backward(grad_v, u, weight, bias?, s, predictions, iterations, detach, backend)
        -> (grad_u, grad_weight, grad_bias); grad_bias is (J, D) even without a bias.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _extension, _routing_cpu, _routing_torch
from ._validation import compute_dtype


class Kernels(NamedTuple):
    forward: Callable[..., Tuple[Tensor, Tensor, Tensor]]  # (u, weight, bias, r, detach) -> v, s, predictions
    backward: Callable[..., Tuple[Tensor, Tensor, Tensor]]  # (grad_v, u, weight, bias, s, predictions, r, detach)
    predictions_numel: Callable[[Tensor, Tensor], int]  # (u, weight) -> elements of the kept u_hat


def recomputing_kernels(forward: Callable, backward: Callable) -> Kernels:
    """Kernels whose backward keeps nothing from the forward but s: empty predictions."""

    def forward_keeping_nothing(u, weight, bias, iterations, detach):
        v, s = forward(u, weight, bias, iterations, detach)
        return v, s, s.new_empty(0)

    def backward_from_s(grad_v, u, weight, bias, s, predictions, iterations, detach):
        return backward(grad_v, u, weight, bias, s, iterations, detach)

    return Kernels(forward_keeping_nothing, backward_from_s, lambda u, weight: 0)


KERNELS: Dict[str, Kernels] = {
    "torch": recomputing_kernels(_routing_torch.routing_forward, _routing_torch.routing_backward),
}
if _extension.problem() is None:
    KERNELS["cpu"] = Kernels(_routing_cpu.routing_forward, _routing_cpu.routing_backward,
                             _routing_cpu.predictions_numel)


def _kernels(backend: str) -> Kernels:
    if backend == "triton" and backend not in KERNELS:
        # Imported on first use: importing triton takes a while, and CPU users rarely need it.
        from . import _routing_triton

        KERNELS["triton"] = recomputing_kernels(_routing_triton.routing_forward, _routing_triton.routing_backward)
    try:
        return KERNELS[backend]
    except KeyError:
        raise ValueError(
            f"fastcaps::routing: backend={backend!r} has no kernel; expected one of "
            f"{', '.join(repr(name) for name in KERNELS)}"
        ) from None


@torch.library.custom_op("fastcaps::routing", mutates_args=())
def routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    iterations: int,
    detach: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).forward(u, weight, bias, iterations, detach)


@routing.register_fake
def _routing_fake(u, weight, bias, iterations, detach, backend):
    out_caps, _, out_dim, _ = weight.shape
    dtype = compute_dtype(u.dtype)
    v = u.new_empty(u.shape[0], out_caps, out_dim)
    s = u.new_empty(u.shape[0], iterations, out_caps, out_dim, dtype=dtype)
    predictions = u.new_empty(_kernels(backend).predictions_numel(u, weight), dtype=dtype)
    return v, s, predictions


@torch.library.custom_op("fastcaps::routing_backward", mutates_args=())
def routing_backward(
    grad_v: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    s: Tensor,
    predictions: Tensor,
    iterations: int,
    detach: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).backward(grad_v, u, weight, bias, s, predictions, iterations, detach)


@routing_backward.register_fake
def _routing_backward_fake(grad_v, u, weight, bias, s, predictions, iterations, detach, backend):
    out_caps, _, out_dim, _ = weight.shape
    return torch.empty_like(u), torch.empty_like(weight), weight.new_empty(out_caps, out_dim)


def _setup_context(ctx, inputs, output):
    u, weight, bias, iterations, detach, backend = inputs
    _, s, predictions = output
    ctx.mark_non_differentiable(s, predictions)
    ctx.save_for_backward(u, weight, bias, s, predictions)
    ctx.iterations, ctx.detach, ctx.backend = iterations, detach, backend


def _backward(ctx, grad_v, _grad_s, _grad_predictions):
    u, weight, bias, s, predictions = ctx.saved_tensors
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.routing_backward(
        grad_v, u, weight, bias, s, predictions, ctx.iterations, ctx.detach, ctx.backend
    )
    return grad_u, grad_weight, (None if bias is None else grad_bias), None, None, None


routing.register_autograd(_backward, setup_context=_setup_context)
