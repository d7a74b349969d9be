"""Launcher for the fused C++ CPU kernels (csrc/routing_cpu.cpp), the "cpu" backend.

The kernels' schemas are defined here and implemented in C++ for the CPU dispatch key.
The kernels take weight in the DigitCaps layout (J, I, D, Din) and repack it themselves;
half inputs are computed in float32. The launcher returns tensors in the layouts of the
"torch" kernel (fastcaps/_routing_torch.py), whose contract it shares.

Small batches keep the forward's u_hat for the backward (``predictions_numel``): there
the call's cost is moving W (5.9 MB at the MNIST shape, against 0.7 MB of u_hat per
sample). With u_hat at hand the backward packs W at most once instead of twice, and at
B = 1 reads it once in its own layout. Larger batches keep nothing and recompute u_hat, as
DESIGN.md section 3 says.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import compute_dtype

_LIBRARY = torch.library.Library("fastcaps", "FRAGMENT")
SCHEMAS = (
    "routing_cpu_forward(Tensor u, Tensor weight, Tensor bias, int iterations, Tensor(a!) predictions) "
    "-> (Tensor, Tensor)",
    "routing_cpu_backward(Tensor grad_v, Tensor u, Tensor weight, Tensor s, Tensor predictions, int iterations, "
    "bool detach) -> (Tensor, Tensor, Tensor)",
)


def define_schemas() -> None:
    """Define the kernels' schemas, once fastcaps._C has registered its kernels. torch then
    checks each kernel's C++ signature against its schema and raises RuntimeError on a
    mismatch (an extension built from other fastcaps sources). Defined first, the same
    mismatch is found while the library loads, where it aborts the process."""
    for schema in SCHEMAS:
        _LIBRARY.define(schema)


# Batches of at most this many samples keep u_hat: up to 2.9 MB at the MNIST shape, half of W.
KEEP_PREDICTIONS_SAMPLES = 4
# The kernels' SIMD width: a block of input capsules is 64 bytes of one compute-dtype value each.
_VECTOR_BYTES = 64


def predictions_numel(u: Tensor, weight: Tensor) -> int:
    """Elements of the kept u_hat for this call: batch x blocks of input capsules x J x D
    vectors, the C++ kernels' layout; 0 when the batch is too large to keep it."""
    batch, in_caps, _ = u.shape
    out_caps, _, out_dim, _ = weight.shape
    if batch > KEEP_PREDICTIONS_SAMPLES:
        return 0
    lanes = _VECTOR_BYTES // compute_dtype(u.dtype).itemsize
    return batch * -(-in_caps // lanes) * lanes * out_caps * out_dim


def routing_forward(
    u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int, detach: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(u.dtype)
    bias_flat = u.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    predictions = u.new_empty(predictions_numel(u, weight), dtype=dtype)
    v, s = torch.ops.fastcaps.routing_cpu_forward(
        u.to(dtype).contiguous(), weight.to(dtype).contiguous(), bias_flat, iterations, predictions
    )
    return v.to(u.dtype), s, predictions


def routing_backward(
    grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], s: Tensor, predictions: Tensor,
    iterations: int, detach: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = s.dtype
    grad_u, grad_weight, grad_bias = torch.ops.fastcaps.routing_cpu_backward(
        grad_v.to(dtype).contiguous(), u.to(dtype).contiguous(), weight.to(dtype).contiguous(), s.contiguous(),
        predictions, iterations, detach,
    )
    return grad_u.to(u.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
