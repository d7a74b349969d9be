"""Convolutional routing on any backend's dense kernels (DESIGN.md section 7).

Each output position (b, y, x) is dense routing over the Kh * Kw * I children of its
window, with the dense weight ``weight.reshape(J, I * Kh * Kw, D, Din)`` shared by every
position. So every backend serves ``fastcaps::conv_routing`` with its dynamic-routing
kernels (its ``RoutingKernels``), one chunk of whole samples at a time:

- forward: the chunk's windows are gathered (``F.unfold``: zeros where the window leaves
  the grid, which vote 0) into (positions, children, Din) and routed as if each position
  were a sample; the kernels keep their routing state s per position, never the votes;
- backward: the windows are gathered again, the dense backward gives grad windows, grad W
  and grad bias, and grad u is ``F.fold`` of grad windows: a sum per input location over
  the windows that cover it (a gather, in a fixed order), not a scatter with atomics.
  grad W and grad bias are summed over the chunks in chunk order.

The chunks depend on the shapes alone, so results are the same for any thread count
whenever the dense kernels' are. Memory: one chunk's windows (at most ``_CHUNK_ELEMENTS``
values, or one sample's), Kh * Kw / (sh * sw) times the chunk's input, against the
J * D / Din times more that its votes would take. Half inputs are computed in float32, the
windows and their gradient included (grad u sums Kh * Kw windows per location).

Layouts: u (B, I, Din, H, W); weight (J, I, Kh, Kw, D, Din); v (B, J, D, H', W');
s (B * H' * W', r, J, D), row b * H' * W' + y * W' + x.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import conv_output_size
from . import RoutingKernels, compute_dtype, row_chunks

# Window values gathered at once: 2^21 float32 = 8 MiB (at least one sample).
_CHUNK_ELEMENTS = 1 << 21


class Geometry:
    """Kernel, stride, padding and dilation (pairs) of a call, and the output grid they give."""

    def __init__(self, u_shape: Sequence[int], weight_shape: Sequence[int], stride, padding, dilation) -> None:
        _, self.in_caps, self.in_dim, self.height, self.width = u_shape
        self.out_caps, _, kh, kw, self.out_dim, _ = weight_shape
        self.kernel, self.stride, self.padding, self.dilation = (kh, kw), tuple(stride), tuple(padding), tuple(dilation)
        self.out_h, self.out_w = (conv_output_size(*axis) for axis in zip(
            (self.height, self.width), self.kernel, self.stride, self.padding, self.dilation))

    @property
    def positions(self) -> int:
        return self.out_h * self.out_w

    @property
    def taps(self) -> int:
        """Offsets in a window: Kh * Kw."""
        return self.kernel[0] * self.kernel[1]

    @property
    def children(self) -> int:
        return self.in_caps * self.taps

    def chunks(self, batch: int) -> Iterator[slice]:
        """Ranges of whole samples whose windows hold at most _CHUNK_ELEMENTS values (or one sample)."""
        return row_chunks(batch, self.positions * self.children * self.in_dim, _CHUNK_ELEMENTS)

    def gather(self, u: Tensor) -> Tensor:
        """The windows of u (b, I, Din, H, W) as dense routing inputs: (b * H' * W', I * Kh * Kw, Din)."""
        batch = u.shape[0]
        columns = F.unfold(u.reshape(batch, self.in_caps * self.in_dim, self.height, self.width), self.kernel,
                           self.dilation, self.padding, self.stride)  # (b, (i, e, kh, kw), position)
        columns = columns.view(batch, self.in_caps, self.in_dim, self.taps, self.positions)
        return columns.permute(0, 4, 1, 3, 2).reshape(batch * self.positions, self.children, self.in_dim)

    def scatter(self, grad_windows: Tensor, batch: int) -> Tensor:
        """The adjoint of gather: grad u (b, I, Din, H, W), each location the sum over its windows."""
        columns = grad_windows.view(batch, self.positions, self.in_caps, self.taps, self.in_dim).permute(0, 2, 4, 3, 1)
        columns = columns.reshape(batch, self.in_caps * self.in_dim * self.taps, self.positions)
        grad_u = F.fold(columns, (self.height, self.width), self.kernel, self.dilation, self.padding, self.stride)
        return grad_u.view(batch, self.in_caps, self.in_dim, self.height, self.width)

    def to_positions(self, grid: Tensor) -> Tensor:
        """(b, J, D, H', W') -> (b * H' * W', J, D)."""
        return grid.permute(0, 3, 4, 1, 2).reshape(-1, self.out_caps, self.out_dim)

    def to_grid(self, rows: Tensor, batch: int) -> Tensor:
        """(b * H' * W', J, D) -> (b, J, D, H', W'), a view."""
        return rows.view(batch, self.out_h, self.out_w, self.out_caps, self.out_dim).permute(0, 3, 4, 1, 2)

    def dense_weight(self, weight: Tensor) -> Tensor:
        """(J, I, Kh, Kw, D, Din) -> (J, I * Kh * Kw, D, Din): children in (i, kh, kw) order."""
        return weight.reshape(self.out_caps, self.children, self.out_dim, self.in_dim)


def conv_forward(dense: RoutingKernels, u: Tensor, weight: Tensor, bias: Optional[Tensor], iterations: int,
                 stride, padding, dilation, leaky: bool) -> Tuple[Tensor, Tensor]:
    """(v, s): v (B, J, D, H', W') in u's dtype, s (B * H' * W', r, J, D) in the compute dtype."""
    geometry = Geometry(u.shape, weight.shape, stride, padding, dilation)
    dtype = compute_dtype(u.dtype)
    batch = u.shape[0]
    u_c, weight_c = u.to(dtype), geometry.dense_weight(weight.to(dtype)).contiguous()
    bias_c = None if bias is None else bias.to(dtype)
    positions = geometry.positions
    v = u.new_empty(batch, geometry.out_caps, geometry.out_dim, geometry.out_h, geometry.out_w)
    s = u.new_empty(batch * positions, iterations, geometry.out_caps, geometry.out_dim, dtype=dtype)
    for rows in geometry.chunks(batch):
        count = rows.stop - rows.start
        v_rows, s_rows, _ = dense.forward(geometry.gather(u_c[rows]), weight_c, bias_c, iterations, False, leaky)
        v[rows] = geometry.to_grid(v_rows, count)
        s[rows.start * positions:rows.stop * positions] = s_rows
    return v, s


def conv_backward(dense: RoutingKernels, grad_v: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor],
                  s: Tensor, iterations: int, stride, padding, dilation, detach_routing: bool,
                  leaky: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_u, grad_weight, grad_bias) in the dtypes of u, weight and weight; grad_bias (J, D)."""
    geometry = Geometry(u.shape, weight.shape, stride, padding, dilation)
    dtype = s.dtype
    batch = u.shape[0]
    u_c, weight_c = u.to(dtype), geometry.dense_weight(weight.to(dtype)).contiguous()
    bias_c = None if bias is None else bias.to(dtype)
    grad_v_c = grad_v.to(dtype)
    positions = geometry.positions
    grad_u = torch.empty_like(u_c)
    grad_weight = torch.zeros_like(weight_c)
    grad_bias = weight_c.new_zeros(geometry.out_caps, geometry.out_dim)
    no_kept = s.new_empty(0)
    for rows in geometry.chunks(batch):
        count = rows.stop - rows.start
        windows = geometry.gather(u_c[rows])
        grad_windows, grad_weight_rows, grad_bias_rows = dense.backward(
            geometry.to_positions(grad_v_c[rows]).contiguous(), windows, weight_c, bias_c,
            s[rows.start * positions:rows.stop * positions], no_kept, iterations, detach_routing, leaky)
        grad_u[rows] = geometry.scatter(grad_windows, count)
        grad_weight += grad_weight_rows
        grad_bias += grad_bias_rows
    return (grad_u.to(u.dtype), grad_weight.view(weight.shape).to(weight.dtype), grad_bias.to(weight.dtype))
