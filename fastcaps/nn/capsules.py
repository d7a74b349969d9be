"""Capsule layers: PrimaryCaps (a convolution grouped into squashed capsules), DigitCaps
(fully connected, with routing-by-agreement) and ConvCaps2d (routing at every position of a
grid, from the capsules of its window). They hold parameters and call ``fastcaps.functional``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from ..validation import describe, pair

__all__ = ["DigitCaps", "PrimaryCaps", "ConvCaps2d"]


def _routing_layer_init(layer: nn.Module, name: str, in_caps, in_dim, out_caps, out_dim, iterations, bias: bool,
                        detach_routing: bool, leaky: bool, backend: str, weight_shape, children: int,
                        factory) -> None:
    """What DigitCaps and ConvCaps2d share: checked sizes, the routing options, weight (and
    bias, or a registered None), initialised. ``children``: capsules each parent routes from."""
    for arg, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim),
                       ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be an int >= 1, got {describe(value)}")
    layer.in_caps, layer.in_dim, layer.out_caps, layer.out_dim = in_caps, in_dim, out_caps, out_dim
    layer.iterations, layer.detach_routing, layer.leaky, layer.backend = iterations, detach_routing, leaky, backend
    layer._routed_children = children
    layer.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
    if bias:
        layer.bias = nn.Parameter(torch.empty(out_caps, out_dim, **factory))
    else:
        layer.register_parameter("bias", None)
    layer.reset_parameters()


def _reset_routing_parameters(layer: nn.Module) -> None:
    """weight ~ Normal(0, out_caps / sqrt(children * out_dim)) (DigitCaps' docstring says why);
    bias 0."""
    nn.init.normal_(layer.weight, std=layer.out_caps / math.sqrt(layer._routed_children * layer.out_dim))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class DigitCaps(nn.Module):
    """Fully connected capsule layer with routing-by-agreement (the paper's DigitCaps).

    Maps (B, in_caps, in_dim) to (B, out_caps, out_dim); ``weight`` has shape
    (out_caps, in_caps, out_dim, in_dim) and u_hat[b, i, j] = weight[j, i] @ u[b, i].

    Initialisation: weight ~ Normal(0, std) with std = out_caps / sqrt(in_caps * out_dim).
    With the first iteration's uniform coupling 1/out_caps and unit-length inputs in random
    directions, this gives E|s_j|^2 = 1, so output capsules start near length 0.5 after the
    first iteration (about 0.7 after three at the MNIST shape), where squash has a useful
    slope and the margin loss sees both margins. A std of 1 (as in
    several public implementations) makes |s_j| ~ 10 at the MNIST shape: every output
    starts at length ~ 1 and the margin loss cannot separate the classes. The bias, when
    present, starts at zero.
    """

    def __init__(
        self,
        in_caps: int = 1152,
        in_dim: int = 8,
        out_caps: int = 10,
        out_dim: int = 16,
        iterations: int = 3,
        bias: bool = False,
        detach_routing: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        leaky: bool = False,
    ) -> None:
        super().__init__()
        _routing_layer_init(self, "DigitCaps", in_caps, in_dim, out_caps, out_dim, iterations, bias, detach_routing,
                            leaky, backend, (out_caps, in_caps, out_dim, in_dim), in_caps,
                            {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        _reset_routing_parameters(self)

    def forward(self, u: Tensor) -> Tensor:
        return F.dynamic_routing(
            u, self.weight, self.bias, self.iterations, self.detach_routing, self.backend, leaky=self.leaky
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, bias={self.bias is not None}, "
            f"detach_routing={self.detach_routing}, leaky={self.leaky}, backend={self.backend!r}"
        )


class PrimaryCaps(nn.Module):
    """Convolutional capsules: a conv whose channels are grouped into capsule vectors, squashed.

    For MNIST: Conv2d(256, 32 * 8, 9, stride=2) on 20x20 features gives 32 capsule channels
    on a 6x6 grid, i.e. 1152 capsules of 8 dims.

    Capsule ordering: conv channel ``k * caps_dim + d`` is dimension d of capsule channel
    k, and capsule index ``(k * H + h) * W + w``, i.e. the (caps_channels, H, W) grid
    flattened in C order (channel-major). Implementations that flatten (H, W, channels)
    instead order the same capsules differently; permute their DigitCaps weight along
    in_caps when importing it.

    ``grid=True`` returns the capsules on their grid instead, (B, caps_channels, caps_dim, H, W):
    the convolution's output viewed without a copy, squashed over dim 2, the layout
    ``ConvCaps2d`` takes.
    """

    def __init__(
        self,
        in_channels: int = 256,
        caps_channels: int = 32,
        caps_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        device=None,
        dtype=None,
        *,
        grid: bool = False,
    ) -> None:
        super().__init__()
        self.caps_channels, self.caps_dim, self.grid = caps_channels, caps_dim, grid
        self.conv = nn.Conv2d(
            in_channels, caps_channels * caps_dim, kernel_size, stride, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x)
        batch, _, height, width = features.shape
        capsules = features.view(batch, self.caps_channels, self.caps_dim, height, width)
        if self.grid:
            return F.squash(capsules, dim=2)
        capsules = capsules.permute(0, 1, 3, 4, 2).reshape(batch, -1, self.caps_dim)
        return F.squash(capsules)

    def extra_repr(self) -> str:
        return f"caps_channels={self.caps_channels}, caps_dim={self.caps_dim}, grid={self.grid}"


class ConvCaps2d(nn.Module):
    """Convolutional capsules: dynamic routing at every output position, from the
    kernel_size x kernel_size x in_caps capsules of its window (``conv_dynamic_routing``).

    Maps u (B, in_caps, in_dim, H, W) to v (B, out_caps, out_dim, H', W'), H' and W' as
    nn.Conv2d computes them; ``weight`` has shape (out_caps, in_caps, Kh, Kw, out_dim, in_dim),
    one D x Din transform per window offset, input and output type, shared across positions.
    kernel_size, stride, padding and dilation are ints or pairs, as nn.Conv2d takes them.
    Stacked layers chain: v is the next layer's u. A window over the whole grid (kernel_size
    = (H, W), padding 0) is DigitCaps on the flattened grid, with
    ``DigitCaps.weight = weight.reshape(out_caps, in_caps * H * W, out_dim, in_dim)``.

    Initialisation: as DigitCaps with in_caps * Kh * Kw children: std = out_caps /
    sqrt(children * out_dim).
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        iterations: int = 3,
        bias: bool = False,
        detach_routing: bool = False,
        leaky: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size", "ConvCaps2d")
        if min(self.kernel_size) < 1:
            raise ValueError(f"ConvCaps2d: kernel_size must be at least 1, got {self.kernel_size}")
        self.stride = pair(stride, "stride", "ConvCaps2d")
        self.padding = pair(padding, "padding", "ConvCaps2d")
        self.dilation = pair(dilation, "dilation", "ConvCaps2d")
        _routing_layer_init(self, "ConvCaps2d", in_caps, in_dim, out_caps, out_dim, iterations, bias, detach_routing,
                            leaky, backend, (out_caps, in_caps, *self.kernel_size, out_dim, in_dim),
                            in_caps * self.kernel_size[0] * self.kernel_size[1], {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        _reset_routing_parameters(self)

    def forward(self, u: Tensor) -> Tensor:
        return F.conv_dynamic_routing(u, self.weight, self.bias, self.iterations, self.stride, self.padding,
                                      self.dilation, self.detach_routing, self.leaky, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, out_dim={self.out_dim}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, iterations={self.iterations}, bias={self.bias is not None}, "
            f"detach_routing={self.detach_routing}, leaky={self.leaky}, backend={self.backend!r}"
        )
