"""The papers' losses: the margin loss (eq. 4) and the reconstruction loss (section 4.1) of
Sabour et al. 2017; the spread loss of Hinton et al. 2018 (matrix capsules)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import describe

__all__ = ["margin_loss", "reconstruction_loss", "spread_loss"]


_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample: Tensor, reduction: str, name: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def margin_loss(
    lengths: Tensor,
    target: Tensor,
    positive_margin: float = 0.9,
    negative_margin: float = 0.1,
    negative_weight: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """The paper's margin loss, eq. (4), summed over classes and averaged over the batch.

        L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

    with m+ = 0.9, m- = 0.1, lambda = 0.5. The official TensorFlow code
    (Sarasra/models, ``capsule_model.py``) multiplies both terms by a further 0.5, so its
    loss is half of this one; with the same 0.0005 reconstruction weight it therefore
    weighs reconstruction twice as much relative to the margin term.

    Args:
        lengths: (B, K) capsule lengths |v_k|.
        target: (B,) integer class labels, or (B, K) floating targets T_k in [0, 1]
            (one-hot, or multi-hot for several digits).
        reduction: "mean" over the batch (default), "sum", or "none" for (B,).
    """
    if not isinstance(lengths, Tensor) or lengths.dim() != 2 or not lengths.is_floating_point():
        raise ValueError(
            f"margin_loss: lengths must be a floating (batch, classes) tensor, got {describe(lengths)}"
        )
    target = _class_targets(target, lengths, "margin_loss")
    present = target * torch.relu(positive_margin - lengths).pow(2)
    absent = negative_weight * (1 - target) * torch.relu(lengths - negative_margin).pow(2)
    return _reduce((present + absent).sum(dim=1), reduction, "margin_loss")


def _class_targets(target: Tensor, lengths: Tensor, name: str) -> Tensor:
    """(B, K) float targets from class indices or a (B, K) tensor."""
    batch, classes = lengths.shape
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: target must be a tensor, got {describe(target)}")
    if target.device != lengths.device:
        raise ValueError(f"{name}: target is on {target.device} but lengths is on {lengths.device}")
    if target.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if target.shape != (batch,):
            raise ValueError(
                f"{name}: integer target must be class labels of shape ({batch},), got {describe(target)}"
            )
        if batch and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise ValueError(f"{name}: labels must lie in [0, {classes}), got {describe(target)}")
        return torch.nn.functional.one_hot(target.long(), classes).to(lengths.dtype)
    if target.is_floating_point():
        if target.shape != lengths.shape:
            raise ValueError(
                f"{name}: floating target must have the shape of lengths {tuple(lengths.shape)}, "
                f"got {describe(target)}"
            )
        return target.to(lengths.dtype)
    raise TypeError(f"{name}: target must be integer labels or floating targets, got {describe(target)}")


def reconstruction_loss(reconstruction: Tensor, images: Tensor, reduction: str = "mean") -> Tensor:
    """Sum of squared differences between each reconstruction and its image (paper section 4.1),
    averaged over the batch. The paper scales this by 0.0005 in the total loss.

    Args:
        reconstruction: (B, ...) decoder output.
        images: (B, ...) with as many elements per sample (e.g. (B, 1, 28, 28) vs (B, 784)).
    """
    for name, value in (("reconstruction", reconstruction), ("images", images)):
        if not isinstance(value, Tensor) or value.dim() < 1 or not value.is_floating_point():
            raise ValueError(
                f"reconstruction_loss: {name} must be a floating (batch, ...) tensor, got {describe(value)}"
            )
    batch = reconstruction.shape[0]
    if images.shape[0] != batch or images.numel() != reconstruction.numel():
        raise ValueError(
            "reconstruction_loss: images and reconstruction must hold the same number of "
            f"samples and pixels, got {tuple(images.shape)} and {tuple(reconstruction.shape)}"
        )
    difference = reconstruction.reshape(batch, -1) - images.reshape(batch, -1).to(reconstruction.dtype)
    return _reduce(difference.pow(2).sum(dim=1), reduction, "reconstruction_loss")


def spread_loss(activations: Tensor, target: Tensor, margin: float | Tensor = 0.2, reduction: str = "mean") -> Tensor:
    """The spread loss of matrix capsules (Hinton, Sabour & Frosst 2018, section 3):

        L = sum over classes i != t of max(0, m - (a_t - a_i))^2

    per sample, for the target class t; the paper grows the margin m from 0.2 to 0.9
    during training (``fastcaps.SpreadLoss`` steps that schedule).

    Args:
        activations: (B, K) class capsule activations.
        target: (B,) integer class labels.
        margin: m, a number or a 0-d tensor.
        reduction: "mean" over the batch (default), "sum", or "none" for (B,).
    """
    if not isinstance(activations, Tensor) or activations.dim() != 2 or not activations.is_floating_point():
        raise ValueError(f"spread_loss: activations must be a floating (batch, classes) tensor, "
                         f"got {describe(activations)}")
    if not isinstance(target, Tensor) or target.is_floating_point() or target.is_complex():
        raise TypeError(f"spread_loss: target must be integer class labels, got {describe(target)}")
    one_hot = _class_targets(target, activations, "spread_loss")
    a_target = (activations * one_hot).sum(dim=1, keepdim=True)
    spread = torch.relu(margin - (a_target - activations)).pow(2) * (1 - one_hot)
    return _reduce(spread.sum(dim=1), reduction, "spread_loss")
