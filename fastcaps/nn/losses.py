"""The paper's losses as modules."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .capsnet import CapsNetOutput

__all__ = ["MarginLoss", "CapsuleLoss"]


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
