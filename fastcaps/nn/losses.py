"""The papers' losses as modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validation import describe

from .. import functional as F
from .capsnet import CapsNetOutput

__all__ = ["MarginLoss", "CapsuleLoss", "SpreadLoss"]


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


class SpreadLoss(nn.Module):
    """``fastcaps.functional.spread_loss`` with the paper's margin schedule: m grows linearly
    from ``margin_start`` (0.2) to ``margin_end`` (0.9) over ``steps`` calls of ``step()``
    (the caller steps it, e.g. once per epoch or per batch), then stays there.

    The count of steps taken is a buffer, so it travels with ``state_dict()`` and a resumed
    run continues the schedule where it stopped. ``margin`` is the current m.
    """

    def __init__(self, margin_start: float = 0.2, margin_end: float = 0.9, steps: int = 10,
                 reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SpreadLoss: steps must be an int >= 1, got {describe(steps)}")
        for name, value in (("margin_start", margin_start), ("margin_end", margin_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"SpreadLoss: {name} must be a finite number >= 0, got {describe(value)}")
        self.margin_start, self.margin_end, self.steps, self.reduction = margin_start, margin_end, steps, reduction
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))

    @property
    def margin(self) -> float:
        done = min(int(self.steps_taken), self.steps) / self.steps
        return self.margin_start + (self.margin_end - self.margin_start) * done

    def step(self) -> None:
        self.steps_taken += 1

    def forward(self, activations: Tensor, target: Tensor) -> Tensor:
        return F.spread_loss(activations, target, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return (f"margin_start={self.margin_start}, margin_end={self.margin_end}, steps={self.steps}, "
                f"margin={self.margin:.4g}, reduction={self.reduction!r}")
