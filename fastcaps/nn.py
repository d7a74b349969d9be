"""Drop-in torch.nn modules: they hold parameters and call ``fastcaps.functional``."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._validation import describe

__all__ = [
    "DigitCaps",
    "PrimaryCaps",
    "Decoder",
    "CapsNet",
    "CapsNetOutput",
    "MarginLoss",
    "CapsuleLoss",
    "convert_weight",
]


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


_AXES = ("out_caps", "in_caps", "out_dim", "in_dim")


def convert_weight(weight: Tensor, layout: Union[str, Sequence[str]]) -> Tensor:
    """Bring a DigitCaps weight saved in another layout into fastcaps' (out_caps, in_caps,
    out_dim, in_dim).

    ``layout`` names the axes of ``weight`` in order, as a space-separated string or a
    sequence, from "out_caps", "in_caps", "out_dim", "in_dim", plus "1" for a singleton axis
    to drop. Examples of public layouts:

        (J, I, Din, D)      "out_caps in_caps in_dim out_dim"     e.g. gram-ai/capsule-networks
        (1, I, J, D, Din)   "1 in_caps out_caps out_dim in_dim"   e.g. higgsfield/Capsule-Network-Tutorial

    Use it as ``caps.weight.data.copy_(convert_weight(w, layout))``; a shape mismatch then
    raises in copy_.
    """
    names = layout.split() if isinstance(layout, str) else list(layout)
    if sorted(n for n in names if n != "1") != sorted(_AXES):
        raise ValueError(
            f"convert_weight: layout must name each of {_AXES} once (and '1' for singleton "
            f"axes), got {names}"
        )
    if len(names) != weight.dim():
        raise ValueError(
            f"convert_weight: layout {names} names {len(names)} axes but weight has "
            f"{weight.dim()} ({describe(weight)})"
        )
    for axis, name in enumerate(names):
        if name == "1" and weight.shape[axis] != 1:
            raise ValueError(
                f"convert_weight: axis {axis} is marked '1' but has size {weight.shape[axis]}"
            )
    kept = [axis for axis, name in enumerate(names) if name != "1"]
    squeezed = weight.reshape([weight.shape[axis] for axis in kept])
    kept_names = [names[axis] for axis in kept]
    return squeezed.permute([kept_names.index(name) for name in _AXES]).contiguous()


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


class Decoder(nn.Module):
    """The paper's reconstruction network: masked DigitCaps -> 512 -> 1024 -> pixels, sigmoid."""

    def __init__(self, in_features: int = 160, out_features: int = 784, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.layers = nn.Sequential(
            nn.Linear(in_features, 512, **factory),
            nn.ReLU(inplace=True),
            nn.Linear(512, 1024, **factory),
            nn.ReLU(inplace=True),
            nn.Linear(1024, out_features, **factory),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class CapsNetOutput(NamedTuple):
    lengths: Tensor  # (B, classes): |v_k|, the class scores
    capsules: Tensor  # (B, classes, digit_dim): v
    reconstruction: Optional[Tensor]  # (B, channels, H, W), or None without a decoder


class CapsNet(nn.Module):
    """The paper's MNIST CapsNet (section 4): Conv1 (256, 9x9, ReLU) -> PrimaryCaps (32 x 8D,
    9x9 stride 2) -> DigitCaps (classes x 16D, routing) -> decoder (512-1024-pixels, sigmoid).

    The decoder sees DigitCaps masked to one capsule: the label's when ``labels`` are given
    in training mode, the longest capsule's otherwise (evaluation, or training without
    labels). At 28x28x1 and 10 classes it has 8,215,568 parameters, 6,804,224 without the
    decoder, as in the paper.
    """

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        conv_channels: int = 256,
        primary_channels: int = 32,
        primary_dim: int = 8,
        digit_dim: int = 16,
        iterations: int = 3,
        routing_bias: bool = False,
        detach_routing: bool = False,
        reconstruction: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if image_size < 17:
            raise ValueError(f"CapsNet: image_size must be at least 17 for two 9x9 convs, got {image_size}")
        grid = (image_size - 8 - 9) // 2 + 1  # 9x9 conv, then 9x9 conv with stride 2
        factory = {"device": device, "dtype": dtype}
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, conv_channels, 9, **factory)
        self.primary = PrimaryCaps(conv_channels, primary_channels, primary_dim, 9, 2, **factory)
        self.digits = DigitCaps(
            in_caps=primary_channels * grid * grid,
            in_dim=primary_dim,
            out_caps=num_classes,
            out_dim=digit_dim,
            iterations=iterations,
            bias=routing_bias,
            detach_routing=detach_routing,
            backend=backend,
            **factory,
        )
        pixels = in_channels * image_size * image_size
        self.decoder = Decoder(num_classes * digit_dim, pixels, **factory) if reconstruction else None

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> CapsNetOutput:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"CapsNet: images must have shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {describe(images)}"
            )
        features = torch.relu(self.conv1(images))
        capsules = self.digits(self.primary(features))
        lengths = torch.linalg.vector_norm(capsules, dim=-1)
        if self.decoder is None:
            return CapsNetOutput(lengths, capsules, None)
        chosen = labels if (labels is not None and self.training) else lengths.argmax(dim=1)
        mask = torch.nn.functional.one_hot(chosen, self.num_classes).to(capsules.dtype)
        reconstruction = self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))
        return CapsNetOutput(lengths, capsules, reconstruction.view(-1, *expected))


class MarginLoss(nn.Module):
    """``fastcaps.functional.margin_loss`` as a module."""

    def __init__(self, positive_margin=0.9, negative_margin=0.1, negative_weight=0.5, reduction="mean"):
        super().__init__()
        self.positive_margin, self.negative_margin = positive_margin, negative_margin
        self.negative_weight, self.reduction = negative_weight, reduction

    def forward(self, lengths: Tensor, target: Tensor) -> Tensor:
        return F.margin_loss(lengths, target, self.positive_margin, self.negative_margin,
                             self.negative_weight, self.reduction)

    def extra_repr(self) -> str:
        return (f"positive_margin={self.positive_margin}, negative_margin={self.negative_margin}, "
                f"negative_weight={self.negative_weight}, reduction={self.reduction!r}")


class CapsuleLoss(nn.Module):
    """The paper's total loss: margin loss + 0.0005 * reconstruction loss (sum of squared
    pixel errors), both averaged over the batch.

    ``forward(output, images, labels)`` takes a ``CapsNetOutput``; without a reconstruction
    it is the margin loss alone.
    """

    def __init__(self, reconstruction_weight: float = 0.0005) -> None:
        super().__init__()
        self.reconstruction_weight = reconstruction_weight
        self.margin = MarginLoss()

    def forward(self, output: CapsNetOutput, images: Tensor, labels: Tensor) -> Tensor:
        loss = self.margin(output.lengths, labels)
        if output.reconstruction is not None:
            loss = loss + self.reconstruction_weight * F.reconstruction_loss(output.reconstruction, images)
        return loss

    def extra_repr(self) -> str:
        return f"reconstruction_weight={self.reconstruction_weight}"
