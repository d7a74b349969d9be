"""Capsule layers: PrimaryCaps (a convolution grouped into squashed capsules) and DigitCaps
(fully connected, with routing-by-agreement). They hold parameters and call
``fastcaps.functional``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from ..validation import describe

__all__ = ["DigitCaps", "PrimaryCaps"]


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
    ) -> None:
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps),
                            ("out_dim", out_dim), ("iterations", iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DigitCaps: {name} must be an int >= 1, got {describe(value)}")
        factory = {"device": device, "dtype": dtype}
        self.in_caps, self.in_dim = in_caps, in_dim
        self.out_caps, self.out_dim = out_caps, out_dim
        self.iterations = iterations
        self.detach_routing = detach_routing
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_caps, in_caps, out_dim, in_dim, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_caps, out_dim, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.out_caps / math.sqrt(self.in_caps * self.out_dim))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, u: Tensor) -> Tensor:
        return F.dynamic_routing(
            u, self.weight, self.bias, self.iterations, self.detach_routing, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, bias={self.bias is not None}, "
            f"detach_routing={self.detach_routing}, backend={self.backend!r}"
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
    ) -> None:
        super().__init__()
        self.caps_channels, self.caps_dim = caps_channels, caps_dim
        self.conv = nn.Conv2d(
            in_channels, caps_channels * caps_dim, kernel_size, stride, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x)
        batch, _, height, width = features.shape
        capsules = features.view(batch, self.caps_channels, self.caps_dim, height, width)
        capsules = capsules.permute(0, 1, 3, 4, 2).reshape(batch, -1, self.caps_dim)
        return F.squash(capsules)

    def extra_repr(self) -> str:
        return f"caps_channels={self.caps_channels}, caps_dim={self.caps_dim}"
