"""The children of EM routing's windows, for every backend's EM kernels: ``EMLayer`` gathers
each window's child poses and activations from a call's inputs and scatters their gradients
back (a convolutional layer's windows through ``windows.Geometry``: F.unfold, and F.fold for
the gradient, a sum per input location in a fixed order; a class layer's one window of every
capsule of a sample, W shared across positions), and ``votes`` forms V = M W.

The chunks (``EMLayer.chunks``) are ranges of whole samples, so that per-child normalisation,
which couples the windows of a sample, sees all of them, and depend on the shapes alone.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference.em_routing import coordinate_offsets, window_children
from . import row_chunks
from .windows import Geometry

# Votes formed at once: 2^22 values (16 MiB of float32), or one sample's.
_CHUNK_ELEMENTS = 1 << 22


class EMKernels(NamedTuple):
    """The contract of an EM kernel pair (``KERNELS`` of fastcaps/kernels/<backend>/em_routing.py):
    inputs as the op takes them, in any layout; outputs and gradients in the inputs' dtypes,
    half inputs computed in float32; state in the compute dtype, of the fake's shape."""
    forward: object   # (poses, activations, weight, beta_u, beta_a, lambdas, options) -> (poses_out, a_out, state)
    backward: object  # (grad_poses_out, grad_a_out, poses, ..., state, lambdas, options) -> 5 gradients


class Options(NamedTuple):
    """What the op passes besides tensors (stride, padding, dilation: pairs; conv calls only)."""
    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    normalization: str
    coordinate_addition: bool
    detach_routing: bool
    eps: float
    variance_floor: float


class EMLayer:
    """How a call's children are gathered per window and their gradients scattered back."""

    def __init__(self, poses_shape, weight_shape, options: Options) -> None:
        self.conv = len(weight_shape) == 6
        self.batch, self.in_caps, self.side = poses_shape[:3]
        self.out_caps = weight_shape[0]
        self.entries = self.side * self.side
        if self.conv:
            height, width = poses_shape[4:]
            self.grid = (height, width)
            self.poses_geometry = Geometry((self.batch, self.in_caps, self.entries, height, width), weight_shape,
                                           options.stride, options.padding, options.dilation)
            self.act_geometry = Geometry((self.batch, self.in_caps, 1, height, width), weight_shape,
                                         options.stride, options.padding, options.dilation)
            self.windows, self.children = self.poses_geometry.positions, self.poses_geometry.children
            overlapping = options.normalization == "per_child"
            self.child_index = (window_children(self.in_caps, self.grid, self.poses_geometry.kernel, options.stride,
                                                options.padding, options.dilation, "cpu") if overlapping else None)
            self.child_count = self.in_caps * height * width
        else:
            self.grid = tuple(poses_shape[4:])
            self.positions = math.prod(self.grid)
            self.windows, self.children = 1, self.in_caps * self.positions
            self.child_index, self.child_count = None, 0
        self.coordinate_addition = options.coordinate_addition

    def chunks(self) -> List[slice]:
        return list(row_chunks(self.batch, self.windows * self.children * self.out_caps * self.entries,
                               _CHUNK_ELEMENTS))

    def gather(self, poses: Tensor, activations: Tensor) -> Tuple[Tensor, Tensor]:
        """Children of every window of a chunk: M (b * windows, C, P, P), a (b * windows, C)."""
        batch = poses.shape[0]
        if self.conv:
            m = self.poses_geometry.gather(poses.reshape(batch, self.in_caps, self.entries, *self.grid))
            a = self.act_geometry.gather(activations.reshape(batch, self.in_caps, 1, *self.grid))
            return m.view(-1, self.children, self.side, self.side), a.view(-1, self.children)
        m = poses.reshape(batch, self.in_caps, self.side, self.side, self.positions).permute(0, 1, 4, 2, 3)
        return m.reshape(batch, self.children, self.side, self.side), activations.reshape(batch, self.children)

    def scatter(self, grad_m: Tensor, grad_a: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
        """The adjoint of gather: grad poses and grad activations in their layouts."""
        if self.conv:
            grad_poses = self.poses_geometry.scatter(grad_m.reshape(-1, self.children, self.entries), batch)
            grad_acts = self.act_geometry.scatter(grad_a.reshape(-1, self.children, 1), batch)
            return (grad_poses.view(batch, self.in_caps, self.side, self.side, *self.grid),
                    grad_acts.view(batch, self.in_caps, *self.grid))
        grad_poses = grad_m.view(batch, self.in_caps, self.positions, self.side, self.side).permute(0, 1, 3, 4, 2)
        return (grad_poses.reshape(batch, self.in_caps, self.side, self.side, *self.grid),
                grad_a.reshape(batch, self.in_caps, *self.grid))

    def child_weight(self, weight: Tensor) -> Tensor:
        """(J, C, P, P): the transform of each child slot."""
        if self.conv:
            return weight.reshape(self.out_caps, self.children, self.side, self.side)
        return weight[:, :, None].expand(-1, -1, self.positions, -1, -1).reshape(
            self.out_caps, self.children, self.side, self.side)

    def weight_gradient(self, grad_child_weight: Tensor, weight_shape) -> Tensor:
        if self.conv:
            return grad_child_weight.view(weight_shape)
        return grad_child_weight.view(self.out_caps, self.in_caps, self.positions, self.side, self.side).sum(2)

    def offsets(self, dtype, device) -> Optional[Tensor]:
        """(C, P, P) added to every vote of a child slot (coordinate addition), or None."""
        if not self.coordinate_addition:
            return None
        per_position = coordinate_offsets(self.grid, self.side, dtype, device)
        return per_position.repeat(self.in_caps, 1, 1)

    def shaped(self, rows: Tensor, batch: int) -> Tensor:
        """(b * windows, J, ...) -> (b, J, ..., H', W') for conv calls, (b, J, ...) otherwise."""
        if not self.conv:
            return rows
        g = self.poses_geometry
        rows = rows.view(batch, g.out_h, g.out_w, *rows.shape[1:])
        return rows.permute(0, 3, *range(4, rows.dim()), 1, 2)

    def rows(self, grid: Tensor) -> Tensor:
        """The adjoint view of ``shaped``: (b, J, ..., H', W') -> (b * windows, J, ...)."""
        if not self.conv:
            return grid
        trailing = grid.dim() - 4
        grid = grid.permute(0, grid.dim() - 2, grid.dim() - 1, 1, *range(2, 2 + trailing))
        return grid.reshape(-1, self.out_caps, *grid.shape[4:])

    def per_sample(self, rows: Tensor) -> Tensor:
        """(b * windows, C, ...) -> (b, windows, C, ...) for per-child normalisation."""
        return rows.view(-1, self.windows, *rows.shape[1:])


def outputs(layer: EMLayer, mu_rows: List[Tensor], log_a_rows: List[Tensor], batch: int, dtype: torch.dtype):
    """The op's (poses_out, activations_out) from every chunk's mu (windows, J, P * P or P, P)
    and log a (windows, J), in ``dtype``."""
    mu = torch.cat(mu_rows).view(-1, layer.out_caps, layer.side, layer.side)
    return (layer.shaped(mu, batch).contiguous().to(dtype),
            layer.shaped(torch.cat(log_a_rows).exp(), batch).contiguous().to(dtype))


def cotangent_rows(layer: EMLayer, grad_poses_out: Tensor, grad_acts_out: Tensor, dtype: torch.dtype):
    """The cotangents of the outputs per window: of mu (windows, J, P * P) and of a (windows, J)."""
    grad_mu = layer.rows(grad_poses_out.to(dtype)).reshape(-1, layer.out_caps, layer.entries)
    return grad_mu, layer.rows(grad_acts_out.to(dtype)[:, :, None]).reshape(-1, layer.out_caps)


class Gradients:
    """A backward's results, filled chunk by chunk: grad poses and activations of each chunk of
    samples scattered back to their layout, grad W (per child slot) and grad beta summed in
    chunk order; ``result`` gives them in the inputs' dtypes and W's layout."""

    def __init__(self, layer: EMLayer, poses: Tensor, activations: Tensor, child_weight: Tensor, beta_u: Tensor,
                 beta_a: Tensor):
        self.layer = layer
        self.poses, self.activations = torch.empty_like(poses), torch.empty_like(activations)
        self.child_weight = torch.zeros_like(child_weight)
        self.beta_u, self.beta_a = torch.zeros_like(beta_u), torch.zeros_like(beta_a)

    def add(self, rows: slice, grad_m: Tensor, grad_a: Tensor, grad_child_weight: Tensor, grad_beta_u: Tensor,
            grad_beta_a: Tensor) -> None:
        """A chunk's: grad_m (windows, C, P, P) and grad_a (windows, C) of the gathered children."""
        self.poses[rows], self.activations[rows] = self.layer.scatter(grad_m, grad_a, rows.stop - rows.start)
        self.child_weight += grad_child_weight
        self.beta_u += grad_beta_u
        self.beta_a += grad_beta_a

    def result(self, poses: Tensor, activations: Tensor, weight: Tensor, beta_u: Tensor, beta_a: Tensor):
        return (self.poses.to(poses.dtype), self.activations.to(activations.dtype),
                self.layer.weight_gradient(self.child_weight, weight.shape).to(weight.dtype),
                self.beta_u.to(beta_u.dtype), self.beta_a.to(beta_a.dtype))


def votes(m: Tensor, child_weight: Tensor, offsets: Optional[Tensor]) -> Tensor:
    """V (n, C, J, P * P) = M @ W (+ offsets)."""
    v = torch.einsum("ncab,jcbd->ncjad", m, child_weight)
    if offsets is not None:
        v = v + offsets[None, :, None]
    return v.reshape(*v.shape[:3], -1)
