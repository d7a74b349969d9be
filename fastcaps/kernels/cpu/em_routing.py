"""Launchers of the fused C++ EM-routing kernels (csrc/em_routing/), the "cpu" backend of
``fastcaps::em_routing``.

Per chunk of whole samples, ``EMLayer`` gathers each window's child poses and activations
(F.unfold for a convolutional layer: C x P^2 values per window, the size of the poses, not of
the votes), and the kernels form the votes, route and, in the backward, take every gradient
without the votes ever reaching memory: each thread holds one window's votes at a time. grad
poses and activations go back to the grid by ``EMLayer.scatter`` (F.fold, a sum per input
location in a fixed order); grad W, beta_u and beta_a are summed over chunks in chunk order.
The chunks depend on the shapes alone and the kernels sum in a fixed order, so the results
are bitwise the same for any thread count. Half inputs compute in float32.

Layouts: as the op's (fastcaps/ops/em_routing.py); the kernels' arguments in
csrc/em_routing/kernels.h.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import compute_dtype, row_chunks
from ..em_layer import EMKernels, EMLayer, Gradients, Options, cotangent_rows, outputs

# Gathered children (and, per child, the logits and cotangents of R the kernels keep between
# sweeps) held at once: 2^22 values per chunk, or one sample's.
_CHUNK_ELEMENTS = 1 << 22


class _Launch:
    """One call's layer, its inputs in the compute dtype, and the kernels' shared arguments."""

    def __init__(self, poses, activations, weight, beta_u, beta_a, lambdas, options: Options):
        self.dtype = compute_dtype(poses.dtype)
        self.layer = layer = EMLayer(poses.shape, weight.shape, options)
        self.poses, self.activations = poses.to(self.dtype), activations.to(self.dtype)
        self.child_weight = layer.child_weight(weight.to(self.dtype)).contiguous()
        offsets = layer.offsets(self.dtype, poses.device)
        self.offsets = poses.new_empty(0, dtype=self.dtype) if offsets is None else offsets.contiguous()
        self.beta_u, self.beta_a = beta_u.to(self.dtype).contiguous(), beta_a.to(self.dtype).contiguous()
        index = layer.child_index
        self.child_index = (torch.empty(0, dtype=torch.long) if index is None else index.contiguous())
        self.child_range = layer.child_count + 1 if index is not None else 0
        self.lambdas = [float(x) for x in lambdas]

    def chunks(self) -> List[slice]:
        layer = self.layer
        # per child, the kernels keep per slot and parent the logits of every iteration but the first
        # and grad R (backward), or the next logits (forward): r + 1 values at most
        kept = (len(self.lambdas) + 1) * layer.out_caps if layer.child_index is not None else 0
        per_window = layer.children * (layer.entries + kept)
        return list(row_chunks(layer.batch, layer.windows * per_window, _CHUNK_ELEMENTS))

    def gathered(self, rows: slice):
        m, a = self.layer.gather(self.poses[rows], self.activations[rows])
        return m.contiguous(), a.contiguous()

    def weights(self):
        """The kernels' (weight, offsets, beta_u, beta_a) arguments."""
        return self.child_weight, self.offsets, self.beta_u, self.beta_a

    def routing(self):
        """The kernels' (lambdas, per_sample, child_index, child_count) arguments."""
        return self.lambdas, self.layer.windows, self.child_index, self.child_range


def em_forward(poses, activations, weight, beta_u, beta_a, lambdas, options: Options):
    """(poses_out, activations_out, state) as the op returns them."""
    launch = _Launch(poses, activations, weight, beta_u, beta_a, lambdas, options)
    layer = launch.layer
    mus, log_as, states = [], [], []
    for rows in launch.chunks():
        m, a = launch.gathered(rows)
        mu, log_a, state = torch.ops.fastcaps.em_cpu_forward(m, a, *launch.weights(), *launch.routing(),
                                                             options.eps, options.variance_floor)
        mus.append(mu)
        log_as.append(log_a)
        states.append(state)
    return (*outputs(layer, mus, log_as, poses.shape[0], poses.dtype), torch.cat(states))


def em_backward(grad_poses_out, grad_acts_out, poses, activations, weight, beta_u, beta_a, state, lambdas,
                options: Options):
    """(grad poses, grad activations, grad weight, grad beta_u, grad beta_a), in the inputs' dtypes."""
    launch = _Launch(poses, activations, weight, beta_u, beta_a, lambdas, options)
    layer, dtype = launch.layer, launch.dtype
    grad_mu_rows, grad_a_rows = cotangent_rows(layer, grad_poses_out, grad_acts_out, dtype)
    gradients = Gradients(layer, launch.poses, launch.activations, launch.child_weight, launch.beta_u, launch.beta_a)
    for rows in launch.chunks():
        windows = slice(rows.start * layer.windows, rows.stop * layer.windows)
        m, a = launch.gathered(rows)
        gradients.add(rows, *torch.ops.fastcaps.em_cpu_backward(
            grad_mu_rows[windows].contiguous(), grad_a_rows[windows].contiguous(), m, a, *launch.weights(),
            state[windows].contiguous(), *launch.routing(), options.detach_routing, options.eps,
            options.variance_floor))
    return gradients.result(poses, activations, weight, beta_u, beta_a)


KERNELS = EMKernels(em_forward, em_backward)
