"""The paper's smallNORB network of matrix capsules (Hinton, Sabour & Frosst 2018, figure 1)."""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor, nn

from ..validation import describe
from .matrix_capsules import ClassMatCaps, ConvMatCaps2d, PrimaryMatCaps

__all__ = ["MatrixCapsNet", "MatrixCapsNetOutput"]

Lambda = Union[float, Sequence[float]]


class MatrixCapsNetOutput(NamedTuple):
    activations: Tensor   # (B, classes): the class capsules' activations, what the spread loss takes
    poses: Tensor         # (B, classes, P, P)


class MatrixCapsNet(nn.Module):
    """ReLU Conv1 (5x5, stride 2, A channels) -> PrimaryMatCaps (1x1, B types) -> ConvCaps1
    (3x3, stride 2, C types) -> ConvCaps2 (3x3, stride 1, D types) -> class capsules (one W
    per type, coordinate addition), with 4x4 poses and EM routing.

    The paper's model is A = B = C = D = 32 (the defaults; 316,394 parameters, "310K" in the
    paper) on 32 x 32 smallNORB crops (14 x 14, 6 x 6 and 4 x 4 grids); its small variant
    A = 64, B = 8, C = D = 16 has 67,154 ("68K"). On 28 x 28 digits the grids are 12 x 12,
    5 x 5 and 3 x 3. No padding anywhere, as the paper's figure 1 shows.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, A: int = 32, B: int = 32, C: int = 32,
                 D: int = 32, pose_size: int = 4, iterations: int = 3, inverse_temperature: Lambda = 0.01,
                 normalization: str = "per_child", detach_routing: bool = False, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("A", A), ("B", B),
                           ("C", C), ("D", D)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MatrixCapsNet: {arg} must be an int >= 1, got {describe(value)}")
        factory = {"device": device, "dtype": dtype}
        routing = dict(pose_size=pose_size, iterations=iterations, inverse_temperature=inverse_temperature,
                       detach_routing=detach_routing, backend=backend, **factory)
        self.conv1 = nn.Conv2d(in_channels, A, 5, stride=2, **factory)
        self.primary = PrimaryMatCaps(A, B, pose_size, **factory)
        self.conv_caps1 = ConvMatCaps2d(B, C, 3, stride=2, normalization=normalization, **routing)
        self.conv_caps2 = ConvMatCaps2d(C, D, 3, stride=1, normalization=normalization, **routing)
        self.class_caps = ClassMatCaps(D, num_classes, coordinate_addition=True, **routing)

    def forward(self, images: Tensor) -> MatrixCapsNetOutput:
        poses, activations = self.primary(torch.relu(self.conv1(images)))
        poses, activations = self.conv_caps1(poses, activations)
        poses, activations = self.conv_caps2(poses, activations)
        poses, activations = self.class_caps(poses, activations)
        return MatrixCapsNetOutput(activations, poses)
