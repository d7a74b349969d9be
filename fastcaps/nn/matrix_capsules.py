"""Matrix-capsule layers (Hinton, Sabour & Frosst 2018): PrimaryMatCaps (a 1x1 convolution to
pose matrices and activations), ConvMatCaps2d (EM routing at every position of a grid) and
ClassMatCaps (every position into the class capsules, with coordinate addition). They hold
parameters and call ``fastcaps.functional``.

Layouts: poses (B, types, P, P, H, W) and activations (B, types, H, W); ClassMatCaps returns
(B, classes, P, P) and (B, classes). Every layer passes (poses, activations) on, as a pair.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..validation import describe, inverse_temperatures, pair

__all__ = ["PrimaryMatCaps", "ConvMatCaps2d", "ClassMatCaps"]

Lambda = Union[float, Sequence[float]]


def _positive_int(where: str, **sizes) -> None:
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {arg} must be an int >= 1, got {describe(value)}")


class PrimaryMatCaps(nn.Module):
    """A convolution (1x1 by default) to ``caps_types`` pose matrices (P x P, no nonlinearity)
    and ``caps_types`` sigmoid activations at every position.

    Maps (B, in_channels, H, W) to poses (B, caps_types, P, P, H', W') and activations
    (B, caps_types, H', W'). One convolution computes both: its first caps_types * P * P
    channels, viewed without a copy, are the poses (channel (k * P + a) * P + c is entry
    (a, c) of type k), the last caps_types the activations' logits.
    """

    def __init__(self, in_channels: int, caps_types: int, pose_size: int = 4, kernel_size=1, stride=1,
                 device=None, dtype=None) -> None:
        super().__init__()
        _positive_int("PrimaryMatCaps", in_channels=in_channels, caps_types=caps_types, pose_size=pose_size)
        self.caps_types, self.pose_size = caps_types, pose_size
        self.conv = nn.Conv2d(in_channels, caps_types * (pose_size * pose_size + 1), kernel_size, stride,
                              device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        features = self.conv(x)
        batch, _, height, width = features.shape
        split = self.caps_types * self.pose_size * self.pose_size
        poses = features[:, :split].view(batch, self.caps_types, self.pose_size, self.pose_size, height, width)
        return poses, torch.sigmoid(features[:, split:])

    def extra_repr(self) -> str:
        return f"caps_types={self.caps_types}, pose_size={self.pose_size}"


def _em_layer_init(layer: nn.Module, where: str, in_caps: int, out_caps: int, pose_size: int, iterations: int,
                   inverse_temperature: Lambda, detach_routing: bool, eps: float, variance_floor: float,
                   backend: str, weight_shape, factory) -> None:
    """What ConvMatCaps2d and ClassMatCaps share: checked sizes and options, weight, beta_u
    and beta_a, initialised."""
    _positive_int(where, in_caps=in_caps, out_caps=out_caps, pose_size=pose_size, iterations=iterations)
    inverse_temperatures(inverse_temperature, iterations, where)
    layer.in_caps, layer.out_caps, layer.pose_size, layer.iterations = in_caps, out_caps, pose_size, iterations
    layer.inverse_temperature = inverse_temperature
    layer.detach_routing, layer.eps, layer.variance_floor, layer.backend = detach_routing, eps, variance_floor, backend
    layer.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
    layer.beta_u = nn.Parameter(torch.empty(out_caps, **factory))
    layer.beta_a = nn.Parameter(torch.empty(out_caps, **factory))
    layer.reset_parameters()


def _reset_em_parameters(layer: nn.Module) -> None:
    """weight ~ Normal(0, 1 / sqrt(P)): a vote entry sums P products, so unit-variance pose
    entries give unit-variance votes. beta_u = beta_a = 0."""
    nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.pose_size))
    nn.init.zeros_(layer.beta_u)
    nn.init.zeros_(layer.beta_a)


def _em_repr(layer: nn.Module) -> str:
    return (f"in_caps={layer.in_caps}, out_caps={layer.out_caps}, pose_size={layer.pose_size}, "
            f"iterations={layer.iterations}, inverse_temperature={layer.inverse_temperature}, "
            f"detach_routing={layer.detach_routing}, backend={layer.backend!r}")


class ConvMatCaps2d(nn.Module):
    """Convolutional matrix capsules: EM routing at every output position from the
    kernel_size x kernel_size x in_caps capsules of its window (``conv_em_routing``).

    Maps (poses (B, in_caps, P, P, H, W), activations (B, in_caps, H, W)) to (B, out_caps,
    P, P, H', W') and (B, out_caps, H', W'), H' and W' as nn.Conv2d computes them. ``weight``
    (out_caps, in_caps, Kh, Kw, P, P): one P x P transform per kernel offset, input and
    output type, shared across positions; ``beta_u``, ``beta_a`` (out_caps,).
    ``normalization``: "per_child" (the paper; default) or "per_window" (docs/em.md).
    """

    def __init__(self, in_caps: int, out_caps: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 pose_size: int = 4, iterations: int = 3, inverse_temperature: Lambda = 0.01,
                 normalization: str = "per_child", detach_routing: bool = False, eps: float = 1e-8,
                 variance_floor: float = 1e-6, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        where = "ConvMatCaps2d"
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        if min(self.kernel_size) < 1:
            raise ValueError(f"{where}: kernel_size must be at least 1, got {self.kernel_size}")
        self.stride, self.padding = pair(stride, "stride", where), pair(padding, "padding", where)
        self.dilation = pair(dilation, "dilation", where)
        if normalization not in ("per_child", "per_window"):
            raise ValueError(f"{where}: normalization must be 'per_child' or 'per_window', got {describe(normalization)}")
        self.normalization = normalization
        _em_layer_init(self, where, in_caps, out_caps, pose_size, iterations, inverse_temperature, detach_routing, eps,
                       variance_floor, backend, (out_caps, in_caps, *self.kernel_size, pose_size, pose_size),
                       {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        _reset_em_parameters(self)

    def forward(self, poses: Tensor, activations: Tensor) -> Tuple[Tensor, Tensor]:
        return F.conv_em_routing(poses, activations, self.weight, self.beta_u, self.beta_a, self.iterations,
                                 self.stride, self.padding, self.dilation, self.inverse_temperature,
                                 self.normalization, self.detach_routing, eps=self.eps,
                                 variance_floor=self.variance_floor, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{_em_repr(self)}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, normalization={self.normalization!r}")


class ClassMatCaps(nn.Module):
    """Class capsules: EM routing from the capsules at every position of a grid into
    ``num_classes`` capsules, one P x P transform per input type shared across positions
    (``em_routing`` on a grid), with the paper's coordinate addition (the scaled position
    of each child added to the first two entries of the last column of its votes).

    Maps (poses (B, in_caps, P, P, H, W), activations (B, in_caps, H, W)) to (B, num_classes,
    P, P) and (B, num_classes). ``weight`` (num_classes, in_caps, P, P).
    """

    def __init__(self, in_caps: int, num_classes: int, pose_size: int = 4, iterations: int = 3,
                 inverse_temperature: Lambda = 0.01, coordinate_addition: bool = True, detach_routing: bool = False,
                 eps: float = 1e-8, variance_floor: float = 1e-6, backend: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__()
        if coordinate_addition and pose_size < 2:
            raise ValueError(f"ClassMatCaps: coordinate_addition needs pose_size >= 2, got {describe(pose_size)}")
        self.coordinate_addition = coordinate_addition
        _em_layer_init(self, "ClassMatCaps", in_caps, num_classes, pose_size, iterations, inverse_temperature,
                       detach_routing, eps, variance_floor, backend, (num_classes, in_caps, pose_size, pose_size),
                       {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        _reset_em_parameters(self)

    def forward(self, poses: Tensor, activations: Tensor) -> Tuple[Tensor, Tensor]:
        return F.em_routing(poses, activations, self.weight, self.beta_u, self.beta_a, self.iterations,
                            self.inverse_temperature, self.detach_routing, self.coordinate_addition, eps=self.eps,
                            variance_floor=self.variance_floor, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{_em_repr(self)}, coordinate_addition={self.coordinate_addition}"
