"""Launchers of the fused C++ dynamic-routing kernels (csrc/dynamic_routing/), the "cpu" backend.

The kernels' schemas are defined here and implemented in C++ for the CPU dispatch key.
The kernels take weight in the DigitCaps layout (J, I, D, Din) and repack it themselves;
half inputs are computed in float32. The launchers meet the contract of
fastcaps/kernels/__init__.py.

Small batches keep the forward's u_hat for the backward (``kept_numel``): there the call's
cost is moving W (5.9 MB at the MNIST shape, against 0.7 MB of u_hat per sample). With
u_hat at hand the backward packs W at most once instead of twice, and at B = 1 reads it
once in its own layout. Larger batches keep nothing and recompute u_hat, as DESIGN.md
section 3 says. When to keep, and the kept tensor's layout, are the C++ kernels' own
(csrc/dynamic_routing/tuning.h), read through ``fastcaps::_routing_cpu_kept_layout``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import RoutingKernels, compute_dtype

_LIBRARY = torch.library.Library("fastcaps", "FRAGMENT")
SCHEMAS = (
    "routing_cpu_forward(Tensor u, Tensor weight, Tensor bias, int iterations, bool leaky, Tensor(a!) kept_u_hat) "
    "-> (Tensor, Tensor)",
    "routing_cpu_backward(Tensor grad_v, Tensor u, Tensor weight, Tensor s, Tensor kept_u_hat, int iterations, "
    "bool detach_routing, bool leaky) -> (Tensor, Tensor, Tensor)",
    # route_votes' kernels (route_votes.py): votes (N, I, J, D) are u_hat, nothing predicts
    "votes_cpu_forward(Tensor votes, Tensor bias, int iterations, bool leaky) -> (Tensor, Tensor)",
    "votes_cpu_backward(Tensor grad_v, Tensor votes, Tensor s, int iterations, bool detach_routing, bool leaky) "
    "-> (Tensor, Tensor)",
    # EM routing's kernels (em_routing.py, csrc/em_routing/): the children of N windows gathered
    "em_cpu_forward(Tensor poses, Tensor activations, Tensor weight, Tensor offsets, Tensor beta_u, Tensor beta_a, "
    "float[] lambdas, int per_sample, Tensor child_index, int child_count, float eps, float variance_floor) "
    "-> (Tensor, Tensor, Tensor)",
    "em_cpu_backward(Tensor grad_mu, Tensor grad_a, Tensor poses, Tensor activations, Tensor weight, Tensor offsets, "
    "Tensor beta_u, Tensor beta_a, Tensor state, float[] lambdas, int per_sample, Tensor child_index, "
    "int child_count, bool detach_routing, float eps, float variance_floor) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def define_schemas() -> None:
    """Define the kernels' schemas, once fastcaps._C has registered its kernels. torch then
    checks each kernel's C++ signature against its schema and raises RuntimeError on a
    mismatch (an extension built from other fastcaps sources). Defined first, the same
    mismatch is found while the library loads, where it aborts the process."""
    for schema in SCHEMAS:
        _LIBRARY.define(schema)


# compute dtype -> (lanes, samples): a kept u_hat holds ceil(in_caps / lanes) * lanes capsules
# per sample, for batches of at most `samples`. Read from the extension once it has loaded
# (read_kept_layout), not while torch.compile traces the op's fake.
_KEPT_LAYOUT: Dict[torch.dtype, Tuple[int, int]] = {}


def read_kept_layout() -> None:
    for dtype in (torch.float32, torch.float64):
        lanes, samples = torch.ops.fastcaps._routing_cpu_kept_layout(dtype)
        _KEPT_LAYOUT[dtype] = (int(lanes), int(samples))


def kept_numel(batch: int, in_caps: int, out_caps: int, out_dim: int, dtype: torch.dtype) -> int:
    """Elements of the kept u_hat for this call: batch x blocks of input capsules x J x D
    vectors, the C++ kernels' layout; 0 when the batch is too large to keep it."""
    lanes, samples = _KEPT_LAYOUT[compute_dtype(dtype)]
    if batch > samples:
        return 0
    return batch * -(-in_caps // lanes) * lanes * out_caps * out_dim


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach_routing: bool, leaky: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(u.dtype)
    bias_flat = u.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    out_caps, in_caps, out_dim, _ = weight.shape
    kept_u_hat = u.new_empty(kept_numel(u.shape[0], in_caps, out_caps, out_dim, dtype), dtype=dtype)
    v, s = torch.ops.fastcaps.routing_cpu_forward(
        u.to(dtype).contiguous(), weight.to(dtype).contiguous(), bias_flat, iterations, leaky, kept_u_hat
    )
    return v.to(u.dtype), s, kept_u_hat


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, kept_u_hat: Tensor,
    iterations: int, detach_routing: bool, leaky: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = s.dtype
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.routing_cpu_backward(
        grad_v.to(dtype).contiguous(), u.to(dtype).contiguous(), weight.to(dtype).contiguous(), s.contiguous(),
        kept_u_hat, iterations, detach_routing, leaky,
    )
    return grad_u.to(u.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


KERNELS = RoutingKernels(routing_forward, routing_backward, kept_numel)
