"""The paper's MNIST CapsNet (section 4) and its reconstruction decoder."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..validation import describe
from .capsules import ConvCaps2d, DigitCaps, PrimaryCaps

__all__ = ["Decoder", "CapsNet", "CapsNetOutput"]


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

    ``conv_caps=(types, dim)`` puts a convolutional capsule layer between PrimaryCaps and
    DigitCaps (not in the paper): ConvCaps2d from the primary capsules' grid to ``types``
    capsules of ``dim`` dimensions per position, 3x3 window, padding 1, routing at every
    position; DigitCaps then routes from its grid.
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
        *,
        conv_caps: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        if image_size < 17:
            raise ValueError(f"CapsNet: image_size must be at least 17 for two 9x9 convs, got {image_size}")
        grid = (image_size - 8 - 9) // 2 + 1  # 9x9 conv, then 9x9 conv with stride 2
        factory = {"device": device, "dtype": dtype}
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, conv_channels, 9, **factory)
        self.primary = PrimaryCaps(conv_channels, primary_channels, primary_dim, 9, 2, **factory,
                                   grid=conv_caps is not None)
        digit_inputs, digit_in_dim = primary_channels, primary_dim
        if conv_caps is not None:
            self.conv_caps = ConvCaps2d(primary_channels, primary_dim, *conv_caps, kernel_size=3, padding=1,
                                        iterations=iterations, detach_routing=detach_routing, backend=backend,
                                        **factory)
            digit_inputs, digit_in_dim = conv_caps
        else:
            self.register_module("conv_caps", None)
        self.digits = DigitCaps(
            in_caps=digit_inputs * grid * grid,
            in_dim=digit_in_dim,
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
        primary = self.primary(features)
        if self.conv_caps is not None:
            grid = self.conv_caps(primary)  # (B, types, dim, H, W), flattened channel-major as PrimaryCaps does
            primary = grid.permute(0, 1, 3, 4, 2).flatten(1, 3)
        capsules = self.digits(primary)
        lengths = torch.linalg.vector_norm(capsules, dim=-1)
        if self.decoder is None:
            return CapsNetOutput(lengths, capsules, None)
        chosen = labels if (labels is not None and self.training) else lengths.argmax(dim=1)
        mask = torch.nn.functional.one_hot(chosen, self.num_classes).to(capsules.dtype)
        reconstruction = self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))
        return CapsNetOutput(lengths, capsules, reconstruction.view(-1, *expected))
